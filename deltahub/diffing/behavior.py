"""Behavioral diff: run both versions on probe inputs over one base and compare outputs.

Both adapters are loaded into one `AdaptedModel` on the base (never copied) and
activated in turn, so the two runs differ only in the adapter. For models with logits
(causal LMs: the next-token distribution at every position; classifiers: the class
distribution per input) we report the mean over predictions of

    KL(p_a || p_b) = sum_v p_a(v) (log p_a(v) - log p_b(v))     (nats)

and how many arg-max (top-1) predictions differ. For encoders without a head, the mean
cosine similarity of the last hidden states, token by token.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltahub.diffing.report import BehaviorDiff
from deltahub.errors import InvalidConfig, NotFound, Unsupported

MAX_PROBES = 10_000


def read_probe(path: str | os.PathLike[str]) -> list[str]:
    """Probe inputs: one per non-empty line of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"probe file {path} does not exist (give a text file, one input per line)")
    try:
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise InvalidConfig(f"probe file {path} is not UTF-8 text (one input per line)") from None
    if not texts:
        raise InvalidConfig(f"probe file {path} has no inputs: write one input per line")
    if len(texts) > MAX_PROBES:
        raise InvalidConfig(f"probe file {path} has {len(texts)} inputs; use at most {MAX_PROBES}")
    return texts


def _attach(model: Any, opened: Any, name: str) -> str:
    if opened.ref is not None:
        return model.load(opened.ref, name=name)
    if opened.directory is not None:
        return model.load_path(opened.directory, name=name)
    raise Unsupported(
        "a behavioral diff needs registry refs or artifact directories, not in-memory Artifacts"
    )


def behavior(
    oa: Any,
    ob: Any,
    base: str | os.PathLike[str],
    probe: str | os.PathLike[str],
    registry: Callable[[], Any],
) -> BehaviorDiff:
    """Run the two opened sides (`core.Opened`) on every probe input over `base`.

    `base` is a directory holding the base model and its tokenizer (save_pretrained).
    """
    import torch
    from transformers import AutoTokenizer

    from deltahub.compose import AdaptedModel, load_base

    texts = read_probe(probe)
    base_model = load_base(str(base))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base), local_files_only=True)
    except (OSError, ValueError) as e:
        raise NotFound(f"no tokenizer in {base}: save one beside the base model ({e})") from None
    model = AdaptedModel(base_model, registry=registry())
    name_a = _attach(model, oa, "diff-a")
    name_b = _attach(model, ob, "diff-b")
    accepted = set(inspect.signature(base_model.forward).parameters)

    kl_sum = cos_sum = 0.0
    positions = differ = 0
    kind: str | None = None
    with torch.no_grad():
        for text in texts:
            batch = tokenizer(text, return_tensors="pt").to(base_model.device)
            if "token_type_ids" in batch and "token_type_ids" not in accepted:
                batch.pop("token_type_ids")  # Llama/GPT-2 forwards do not take it
            outs = []
            for name in (name_a, name_b):
                model.activate(name)
                outs.append(model(**batch))
            model.deactivate()
            out_a, out_b = outs
            logits_a = getattr(out_a, "logits", None)
            if logits_a is not None:
                kind = "kl"
                la = logits_a[0].double().reshape(-1, logits_a.shape[-1])  # (T or 1, V)
                lb = out_b.logits[0].double().reshape(-1, logits_a.shape[-1])
                log_pa, log_pb = la.log_softmax(-1), lb.log_softmax(-1)
                kl_sum += float((log_pa.exp() * (log_pa - log_pb)).sum())
                differ += int((la.argmax(-1) != lb.argmax(-1)).sum())
                positions += la.shape[0]
            else:
                kind = "hidden_cosine"
                ha = out_a.last_hidden_state[0].double()  # (T, d)
                hb = out_b.last_hidden_state[0].double()
                cos_sum += float(torch.nn.functional.cosine_similarity(ha, hb, dim=-1).sum())
                positions += ha.shape[0]
    if kind is None or positions == 0:
        raise InvalidConfig(
            f"the probe inputs in {probe} tokenize to nothing: write words the tokenizer knows"
        )
    return BehaviorDiff(
        kind=kind,
        inputs=len(texts),
        positions=positions,
        mean_kl=kl_sum / positions if kind == "kl" else None,
        mean_cosine=cos_sum / positions if kind == "hidden_cosine" else None,
        top1_differ=differ if kind == "kl" else None,
    )
