"""Learn an AdapterFusion over published adapters for a new task (`fuse`).

The model is an `AdaptedModel` holding the constituents (frozen unless
`unfreeze_adapters`) and fresh fusion parameters (`deltahub.fusion.layer.add_fusion`),
activated as `Fuse(*adapters, name=fusion)`: one Q, K, V per transformer layer by default
(`scope="layer"`), or per fused module (`scope="module"`, whose size is said before
training: it can outgrow the base). Training runs through
`deltahub.training.engine` with the paper's value penalty `lambda * sum ||V - I||^2`
added to the loss. The published fusion pins every constituent by digest and records the
mean attention each adapter got on the evaluation set (`attention_summary`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from deltahub import artifact as af
from deltahub.compose.blocks import Fuse
from deltahub.errors import InvalidConfig, Unsupported
from deltahub.fusion.artifact import CONSTITUENT_ROLE
from deltahub.fusion.attention import attention_per_site
from deltahub.fusion.layer import add_fusion, fused_sites, fusion_size, fusions
from deltahub.methods.fusion.schema import SCOPES
from deltahub.training.checkpoint import Checkpoint, checkpoint_dir
from deltahub.training.data import Collator, Columns, Dataset
from deltahub.training.engine import (
    TaskModel,
    TrainResult,
    datasets,
    load_model,
    make_head,
    run,
)
from deltahub.training.epochs import stderr_log
from deltahub.training.publishing import check_publishable, data_extra, publish_artifact

__all__ = ["attention_summary", "fuse"]


def fuse(
    refs: Sequence[str],
    base: Any,
    data: Any,
    *,
    name: str,
    task: str = "classification",
    eval_data: Any = None,
    temperature: float = 1.0,
    fusion_reg: float = 0.01,
    unfreeze_adapters: bool = False,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 128,
    patience: int = 2,
    tokenizer: Any = None,
    registry: Any = None,
    publish: bool = True,
    output_dir: str | Path | None = None,
    version: str | None = None,
    tags: Sequence[str] = (),
    description: str = "",
    progress: bool = True,
    quantize: str | None = None,
    gradient_checkpointing: bool = False,
    scope: str = "layer",
    warmup_ratio: float = 0.0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    gradient_accumulation_steps: int = 1,
    eval_steps: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    problem_type: str = "single-label",
    base_model: str | None = None,
    resume: bool = False,
    checkpoint: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Learn an AdapterFusion over published adapters `refs` for a new task, and publish it.

    Only the fusion parameters and the task head train (and the adapters too with
    `unfreeze_adapters`; each tuned adapter is then published as `<name>.<adapter>` and
    the fusion pins those). `scope`: "layer" (one Q, K, V per transformer layer, the
    default) or "module" (one per fused module; its size goes to `log` before training).
    The manifest pins every constituent by digest and records the mean attention each
    received on the evaluation set (training set if none). Data, publishing, checkpoints
    and `resume` work as in `deltahub.training.train`.
    """
    from transformers import set_seed

    if len(refs) < 1:
        raise InvalidConfig("fuse needs at least one adapter reference")
    if scope not in SCOPES:
        raise InvalidConfig(f"fusion scope {scope!r} is not one of {', '.join(SCOPES)}")
    log = log or (stderr_log if progress else None)
    if registry is None:
        from deltahub.registry import Registry

        registry = Registry()
    # Fail now, not after training, on what the publish would refuse.
    check_publishable(registry if publish else None, name, version, tags)
    set_seed(seed)
    model, tokenizer, base_id = load_model(base, tokenizer, registry, quantize, gradient_checkpointing)
    columns = Columns(text_column, label_column, text_pair_column)
    train_ds, eval_ds = datasets(task, data, eval_data, tokenizer, max_length, columns, problem_type)
    pinned = [registry.resolve(ref) for ref in refs]
    names = []
    for v in pinned:
        if v.method == "fusion":
            raise Unsupported(f"{v.ref} is a fusion; fuse adapters, not fusions")
        names.append(model.load(f"{v.full_name}@{v.digest}", name=v.full_name))
    if len(set(names)) != len(names):
        raise InvalidConfig(f"the adapters {list(refs)} name one adapter twice; fuse distinct adapters")
    size = fusion_size(model.base, fused_sites(model, names), scope)
    if scope == "module" and log is not None:
        per_layer = fusion_size(model.base, fused_sites(model, names), "layer")["ratio"]
        log(
            f"per-module fusion: {size['parameters']:,} parameters, {size['bytes'] / 1e6:.1f} MB "
            f"({100 * size['ratio']:.0f}% of the base; per layer it would be {100 * per_layer:.0f}%)"
        )
    fusion = add_fusion(model, name, names, temperature, scope)
    model.activate(Fuse(*names, name=name))
    if unfreeze_adapters:
        for n in names:
            model.get_adapter(n).requires_grad_(True)
    head = make_head(model, task, train_ds.label_map, problem_type)
    task_model = TaskModel(model, task, head, fusion, fusion_reg, problem_type)
    hyper = {
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "max_length": max_length,
        "patience": patience, "temperature": temperature, "fusion_reg": fusion_reg,
        "unfreeze_adapters": unfreeze_adapters, "scope": scope, "warmup_ratio": warmup_ratio,
        "warmup_steps": warmup_steps, "weight_decay": weight_decay,
        "gradient_accumulation_steps": gradient_accumulation_steps, "eval_steps": eval_steps,
    }  # fmt: skip
    if task == "classification":
        hyper.update(problem_type=problem_type, columns=vars(columns))
    data_info = data_extra(train_ds, eval_ds)
    ckpt = Checkpoint(checkpoint or checkpoint_dir(name, output_dir, getattr(registry, "home", None)))
    identity = {
        "kind": "fuse", "name": name, "hyperparameters": hyper, "data": data_info,
        "constituents": [v.digest for v in pinned],
    }  # fmt: skip
    metrics = run(
        task_model, train_ds, eval_ds, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        patience=patience, progress=progress, output_dir=None, warmup_ratio=warmup_ratio,
        warmup_steps=warmup_steps, weight_decay=weight_decay,
        gradient_accumulation_steps=gradient_accumulation_steps, eval_steps=eval_steps, checkpoint=ckpt,
        resume=resume, identity=identity, log=log,
    )  # fmt: skip
    attention = attention_summary(task_model, eval_ds or train_ds, tokenizer, batch_size)
    per_site = attention_per_site(task_model, eval_ds or train_ds, tokenizer, batch_size)

    constituents = []
    parents = []
    for n, v in zip(names, pinned, strict=True):
        ref, digest = v.ref, v.digest
        if unfreeze_adapters and publish:
            tuned = _publish_tuned(model, n, v, name, base_model or base_id, task, registry)
            parents.append(af.Parent(ref=v.ref, digest=v.digest, role="trained-from"))
            ref, digest = tuned.ref, tuned.digest
        constituents.append({"name": n, "ref": ref, "digest": digest})
        parents.append(af.Parent(ref=ref, digest=digest, role=CONSTITUENT_ROLE))
    extra: dict[str, Any] = {
        "fusion": {
            "constituents": constituents, "attention": attention, "attention_per_site": per_site,
            "attention_on": "eval" if eval_ds else "train", "scope": scope, "parameters": size["parameters"],
        },
        "hyperparameters": hyper,
        "data": data_info,
    }  # fmt: skip
    tensors = dict(fusion.tensors())
    if head is not None and train_ds.label_map is not None:
        extra["head"] = head.describe(train_ds.label_map.labels)
        tensors.update(head.tensors())
    manifest = af.Manifest(
        name=name, method="fusion", base_model=base_model or base_id, base_fingerprint=model.fingerprint,
        task=task, metrics=metrics, description=description, parents=parents, extra=extra,
    )  # fmt: skip
    config = {"method": "fusion", "adapters": names, "temperature": float(temperature), "scope": scope}
    published, path = publish_artifact(
        tensors, config, manifest, registry, publish, output_dir, version, tags
    )
    return TrainResult(metrics, task_model, published, path, extra)


def _publish_tuned(
    model: Any, adapter: str, source: Any, fusion: str, base_id: Any, task: str, registry: Any
) -> Any:
    """Publish an adapter tuned inside a fusion (`--unfreeze-adapters`) as `<fusion>.<adapter>`."""
    manifest = af.Manifest(
        name=f"{fusion}.{adapter.replace('/', '-')}", method=source.method, base_model=base_id,
        base_fingerprint=model.fingerprint, task=task,
        parents=[af.Parent(ref=source.ref, digest=source.digest, role="trained-from")],
        extra={"tuned_in_fusion": fusion},
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="deltahub-publish-") as tmp:
        af.write_dir(tmp, model.adapter_state_dict(adapter), model.adapter_config(adapter), manifest)
        return registry.publish(tmp, manifest.name)


@torch.no_grad()
def attention_summary(
    task_model: TaskModel, dataset: Dataset, tokenizer: Any, batch_size: int = 32
) -> dict[str, float]:
    """The mean fusion attention each adapter got on `dataset`.

    Averaged over real (non-padding) tokens and over the sites where two or more adapters
    compete (at a site only one adapter changes, its weight is 1 by construction); over
    every site when there is no such site.
    """
    fused = list(fusions(task_model.model).values())
    collate = Collator(tokenizer.pad_token_id)
    device = next(task_model.parameters()).device
    sums: dict[bool, dict[str, float]] = {True: {}, False: {}}
    counts: dict[bool, float] = {True: 0.0, False: 0.0}
    task_model.eval()
    for fusion in fused:
        fusion.set_record(True)
    try:
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            mask = batch["attention_mask"].to(device)
            task_model(batch["input_ids"].to(device), mask)
            for fusion in fused:
                for layer in fusion.layers:
                    s, names = layer.last_attention, layer.last_names
                    if s is None or names is None:
                        continue
                    if s.shape[:-1] == mask.shape:
                        w = mask.to(s.dtype).unsqueeze(-1)  # (B, T, 1): real tokens only
                    else:
                        w = torch.ones(*s.shape[:-1], 1, dtype=s.dtype, device=s.device)  # e.g. a pooler
                    per = (s * w).flatten(0, -2).sum(0)  # (N,)
                    multi = len(names) > 1
                    for name, v in zip(names, per.tolist(), strict=True):
                        sums[multi][name] = sums[multi].get(name, 0.0) + v
                    counts[multi] += float(w.sum())
    finally:
        for fusion in fused:
            fusion.set_record(False)
    multi = counts[True] > 0
    return {k: v / counts[multi] for k, v in sums[multi].items()} if counts[multi] else {}
