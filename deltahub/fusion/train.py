"""Training: one adapter for a task (`train`), or an AdapterFusion over published ones (`fuse`).

Both run through transformers' `Trainer` (see `deltahub.fusion.trainer`: the task model,
the loss, early stopping). Here:

- the model is an `AdaptedModel` with one trainable adapter, or frozen constituents plus
  trainable fusion parameters;
- determinism: `transformers.set_seed(seed)` before any weight is created, and the same
  seed for Trainer's data order;
- the result is published to the registry with its metrics, hyperparameters, the data
  files' digests, the label map and (for a fusion) each constituent pinned by digest and
  the average attention each adapter got on the evaluation set.

Why single-adapter training lives in `deltahub.fusion`: DESIGN.md gives this part
"fusion training, data loading for training"; training one adapter and training a fusion
share everything but the trainable parameters, so they share this module.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from deltahub import artifact as af
from deltahub.errors import InvalidConfig, Unsupported
from deltahub.fusion.artifact import CONSTITUENT_ROLE
from deltahub.fusion.head import TaskHead
from deltahub.fusion.trainer import (
    METHODS,
    TaskModel,
    TrainResult,
    adapter_config,
    attention_summary,
    data_extra,
    datasets,
    load_model,
    make_head,
    publish_artifact,
    run,
)

__all__ = ["METHODS", "TaskModel", "TrainResult", "fuse", "load_task_model", "train"]


# --------------------------------------------------------------------------- train


def train(
    base: Any,
    data: Any,
    *,
    name: str,
    method: str = "lora",
    task: str = "classification",
    eval_data: Any = None,
    r: int = 16,
    alpha: float = 32,
    target_modules: Sequence[str] | str | None = None,
    reduction_factor: float | None = 16,
    bottleneck_size: int | None = None,
    epochs: int = 3,
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
) -> TrainResult:
    """Train one adapter (`method`: lora | houlsby | pfeiffer | parallel) on `data` and publish it.

    `base` is a model directory or hub id (its tokenizer is loaded from there), or a
    built module with `tokenizer=`. `data` / `eval_data` are JSON Lines or CSV files (see
    `deltahub.fusion.data`). With `publish=False` the artifact is written to `output_dir`.
    """
    from transformers import set_seed

    set_seed(seed)
    model, tokenizer, base_id = load_model(base, tokenizer, registry, quantize, gradient_checkpointing)
    train_ds, eval_ds = datasets(task, data, eval_data, tokenizer, max_length)
    config = adapter_config(method, r, alpha, target_modules, reduction_factor, bottleneck_size)
    model.add_adapter(name, config)
    model.activate(name)
    head = make_head(model, task, train_ds.label_map)
    task_model = TaskModel(model, task, head)
    metrics = run(
        task_model, train_ds, eval_ds, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        patience=patience, progress=progress, output_dir=None,
    )  # fmt: skip
    hyper = {
        "method": method, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "max_length": max_length, "patience": patience,
    }  # fmt: skip
    if method == "lora":
        hyper.update(r=r, alpha=alpha, target_modules=config["target_modules"])
    elif method in ("houlsby", "pfeiffer", "parallel"):
        hyper.update(reduction_factor=reduction_factor, bottleneck_size=bottleneck_size)
    extra: dict[str, Any] = {"hyperparameters": hyper, "data": data_extra(train_ds, eval_ds)}
    tensors = dict(model.adapter_state_dict(name))
    if head is not None and train_ds.label_map is not None:
        extra["head"] = head.describe(train_ds.label_map.labels)
        tensors.update(head.tensors())
    adapter = model.get_adapter(name)
    manifest = af.Manifest(
        name=name, method=adapter.method, base_model=base_id, base_fingerprint=model.fingerprint, task=task,
        metrics=metrics, description=description, extra=extra,
    )  # fmt: skip
    published, path = publish_artifact(
        tensors, model.adapter_config(name), manifest, registry, publish, output_dir, version, tags
    )
    return TrainResult(metrics, task_model, published, path, extra)


# --------------------------------------------------------------------------- fuse


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
) -> TrainResult:
    """Learn an AdapterFusion over published adapters `refs` for a new task, and publish it.

    Only the fusion parameters and the task head train (and the adapters too with
    `unfreeze_adapters`; each tuned adapter is then published as `<name>.<adapter>` and
    the fusion pins those). The manifest pins every constituent by digest and records the
    mean attention each received on the evaluation set (training set if none).
    """
    from transformers import set_seed

    from deltahub.compose.blocks import Fuse
    from deltahub.fusion.layer import add_fusion

    if len(refs) < 1:
        raise InvalidConfig("fuse needs at least one adapter reference")
    if registry is None:
        from deltahub.registry import Registry

        registry = Registry()
    set_seed(seed)
    model, tokenizer, base_id = load_model(base, tokenizer, registry, quantize, gradient_checkpointing)
    train_ds, eval_ds = datasets(task, data, eval_data, tokenizer, max_length)
    pinned = [registry.resolve(ref) for ref in refs]
    names = []
    for v in pinned:
        if v.method == "fusion":
            raise Unsupported(f"{v.ref} is a fusion; fuse adapters, not fusions")
        names.append(model.load(f"{v.full_name}@{v.digest}", name=v.full_name))
    if len(set(names)) != len(names):
        raise InvalidConfig(f"the adapters {list(refs)} name one adapter twice; fuse distinct adapters")
    fusion = add_fusion(model, name, names, temperature)
    model.activate(Fuse(*names, name=name))
    if unfreeze_adapters:
        for n in names:
            model.get_adapter(n).requires_grad_(True)
    head = make_head(model, task, train_ds.label_map)
    task_model = TaskModel(model, task, head, fusion, fusion_reg)
    metrics = run(
        task_model, train_ds, eval_ds, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        patience=patience, progress=progress, output_dir=None,
    )  # fmt: skip
    attention = attention_summary(task_model, eval_ds or train_ds, tokenizer, batch_size)

    constituents = []
    parents = []
    for n, v in zip(names, pinned, strict=True):
        ref, digest = v.ref, v.digest
        if unfreeze_adapters and publish:
            tuned = _publish_tuned(model, n, v, name, base_id, task, registry)
            parents.append(af.Parent(ref=v.ref, digest=v.digest, role="trained-from"))
            ref, digest = tuned.ref, tuned.digest
        constituents.append({"name": n, "ref": ref, "digest": digest})
        parents.append(af.Parent(ref=ref, digest=digest, role=CONSTITUENT_ROLE))
    extra: dict[str, Any] = {
        "fusion": {"constituents": constituents, "attention": attention, "attention_on": "eval" if eval_ds else "train"},
        "hyperparameters": {
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "max_length": max_length,
            "patience": patience, "temperature": temperature, "fusion_reg": fusion_reg,
            "unfreeze_adapters": unfreeze_adapters,
        },
        "data": data_extra(train_ds, eval_ds),
    }  # fmt: skip
    tensors = dict(fusion.tensors())
    if head is not None and train_ds.label_map is not None:
        extra["head"] = head.describe(train_ds.label_map.labels)
        tensors.update(head.tensors())
    manifest = af.Manifest(
        name=name, method="fusion", base_model=base_id, base_fingerprint=model.fingerprint, task=task,
        metrics=metrics, description=description, parents=parents, extra=extra,
    )  # fmt: skip
    config = {"method": "fusion", "adapters": names, "temperature": float(temperature)}
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


# --------------------------------------------------------------------------- inference


def load_task_model(base: Any, ref: str, registry: Any = None) -> TaskModel:
    """A ready-to-run `TaskModel` for a trained adapter or fusion (its head included)."""
    from deltahub.compose.base import load_base
    from deltahub.compose.model import AdaptedModel

    if registry is None:
        from deltahub.registry import Registry

        registry = Registry()
    module = load_base(base) if not isinstance(base, nn.Module) else base
    model = AdaptedModel(module, registry=registry)
    version = registry.resolve(ref)
    name = model.load(ref)
    model.activate(name)
    artifact = registry.open(version)
    task = version.task or "classification"
    head = None
    if task == "classification":
        width = getattr(module.config, "hidden_size", None) or getattr(module.config, "n_embd", None)
        head = TaskHead.from_artifact(artifact, int(width)).to(next(module.parameters()).device)
    fusion = model.get_adapter(name) if version.method == "fusion" else None
    return TaskModel(model, task, head, fusion).eval()
