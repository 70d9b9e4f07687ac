"""A fusion's attention per fused site and constituent (what `show --plot` and the hub draw).

`attention_per_site` runs `dataset` through the fused model once and averages, at each
site (one fused module of the base: a layer's output, say), the softmax weight each
constituent got over real (non-padding) tokens. `fuse` records it in the fusion's
manifest as `extra["fusion"]["attention_per_site"]` = {site: {constituent: weight}};
each row sums to 1 over the constituents present at that site.
"""

from __future__ import annotations

from typing import Any

import torch

from deltahub.fusion.layer import fusions
from deltahub.training.data import Collator, Dataset


@torch.no_grad()
def attention_per_site(
    task_model: Any, dataset: Dataset, tokenizer: Any, batch_size: int = 32
) -> dict[str, dict[str, float]]:
    """{site path: {constituent: mean attention over real tokens}} for every fused site."""
    sites = [(path, layer) for f in fusions(task_model.model).values() for path, layer in zip(f.paths, f.layers, strict=True)]  # fmt: skip
    collate = Collator(tokenizer.pad_token_id)
    device = next(task_model.parameters()).device
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, float] = {}
    task_model.eval()
    for fusion in fusions(task_model.model).values():
        fusion.set_record(True)
    try:
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            mask = batch["attention_mask"].to(device)
            task_model(batch["input_ids"].to(device), mask)
            for path, layer in sites:
                s, names = layer.last_attention, layer.last_names
                if s is None or names is None:
                    continue
                if s.shape[:-1] == mask.shape:
                    w = mask.to(s.dtype).unsqueeze(-1)  # (B, T, 1): real tokens only
                else:
                    w = torch.ones(*s.shape[:-1], 1, dtype=s.dtype, device=s.device)  # e.g. a pooler
                per = (s * w).flatten(0, -2).sum(0)  # (N,)
                row = sums.setdefault(path, {})
                for name, v in zip(names, per.tolist(), strict=True):
                    row[name] = row.get(name, 0.0) + v
                counts[path] = counts.get(path, 0.0) + float(w.sum())
    finally:
        for fusion in fusions(task_model.model).values():
            fusion.set_record(False)
    return {p: {n: v / counts[p] for n, v in row.items()} for p, row in sums.items() if counts.get(p)}
