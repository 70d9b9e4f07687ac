"""Train one adapter of any method for a task (`train`), and load one back with its head.

The model is an `AdaptedModel` with one trainable adapter (compose's injection; the
method's config comes from `engine.adapter_config`). Training runs through
`deltahub.training.engine` (transformers' `Trainer`, early stopping). Determinism:
`transformers.set_seed(seed)` before any weight is created, and the same seed for
Trainer's data order. The result is published to the registry with its metrics,
hyperparameters, the data files' digests and the label map (and the task head's tensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from deltahub import artifact as af
from deltahub.training.engine import (
    TaskModel,
    TrainResult,
    adapter_config,
    check_publishable,
    data_extra,
    datasets,
    load_model,
    make_head,
    publish_artifact,
    registry_or_default,
    run,
)
from deltahub.training.head import TaskHead

__all__ = ["load_task_model", "train"]


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
    `deltahub.training.data`). With `publish=False` the artifact is written to `output_dir`
    (or a fresh temporary directory) only; with both it is written there and published.
    The name, version and tags are checked before training (`AlreadyExists` for a version
    that is taken).
    """
    from transformers import set_seed

    if publish:
        registry = registry_or_default(registry)
    check_publishable(registry if publish else None, name, version, tags)  # before training, not after
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
