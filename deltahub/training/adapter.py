"""Train one adapter of any method for a task (`train`), and load one back with its head.

The model is an `AdaptedModel` with one trainable adapter (compose's injection; the
method's config comes from `engine.adapter_config`). Training runs through
`deltahub.training.engine` (transformers' `Trainer`, early stopping). Determinism:
`transformers.set_seed(seed)` before any weight is created, and the same seed for
Trainer's data order. The result is published to the registry with its metrics,
hyperparameters, the data files' digests and the label map (and the task head's tensors).
The best state so far is checkpointed (`deltahub.training.checkpoint`); `resume=True`
continues an interrupted run from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from deltahub import artifact as af
from deltahub.training.checkpoint import Checkpoint, checkpoint_dir
from deltahub.training.data import Columns
from deltahub.training.engine import (
    TaskModel,
    TrainResult,
    adapter_config,
    datasets,
    load_model,
    make_head,
    run,
)
from deltahub.training.epochs import stderr_log
from deltahub.training.head import TaskHead
from deltahub.training.publishing import check_publishable, data_extra, publish_artifact, registry_or_default

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
    use_dora: bool = False,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
    num_virtual_tokens: int | None = None,
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
    """Train one adapter (`method`: one of `METHODS`) on `data` and publish it.

    `base` is a model directory or hub id (its tokenizer is loaded from there, or from
    `tokenizer`: a tokenizer, directory or hub id), or a built module with `tokenizer=`.
    `data` / `eval_data` are local files (JSON Lines, CSV, Parquet) or `datasets.Dataset`s
    (see `deltahub.training.data`; columns renamed by `text_column`, `label_column`,
    `text_pair_column`). `base_model` is the base id recorded in the manifest (default: the
    base's own `_name_or_path`). With `publish=False` the artifact is written to
    `output_dir` (or a fresh temporary directory) only; with both it is written there and
    published. The name, version and tags are checked before training (`AlreadyExists`
    for a version that is taken). The best state so far is checkpointed in `checkpoint`
    (default: `<output_dir>/checkpoint`, else `$DELTAHUB_HOME/checkpoints/<name>`);
    `resume=True` continues from it. One line per epoch goes to `log` (default: stderr
    when `progress`).
    """
    from transformers import set_seed

    if publish:
        registry = registry_or_default(registry)
    check_publishable(registry if publish else None, name, version, tags)  # before training, not after
    config = adapter_config(
        method, r, alpha, target_modules, reduction_factor, bottleneck_size, use_dora=use_dora,
        use_rslora=use_rslora, lora_dropout=lora_dropout, num_virtual_tokens=num_virtual_tokens,
    )  # fmt: skip
    set_seed(seed)
    model, tokenizer, base_id = load_model(base, tokenizer, registry, quantize, gradient_checkpointing)
    columns = Columns(text_column, label_column, text_pair_column)
    train_ds, eval_ds = datasets(task, data, eval_data, tokenizer, max_length, columns, problem_type)
    model.add_adapter(name, config)
    model.activate(name)
    head = make_head(model, task, train_ds.label_map, problem_type)
    task_model = TaskModel(model, task, head, problem_type=problem_type)
    hyper = {
        "method": method, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "max_length": max_length, "patience": patience, "warmup_ratio": warmup_ratio,
        "warmup_steps": warmup_steps, "weight_decay": weight_decay,
        "gradient_accumulation_steps": gradient_accumulation_steps, "eval_steps": eval_steps,
    }  # fmt: skip
    if method == "lora":
        hyper.update(r=r, alpha=alpha, target_modules=config["target_modules"], use_dora=use_dora,
                     use_rslora=use_rslora, lora_dropout=lora_dropout)  # fmt: skip
    elif method in ("houlsby", "pfeiffer", "parallel"):
        hyper.update(reduction_factor=reduction_factor, bottleneck_size=bottleneck_size)
    elif method in ("prompt", "prefix", "ptuning-v2"):
        hyper.update(num_virtual_tokens=config["num_virtual_tokens"])
    if task == "classification":
        hyper.update(problem_type=problem_type, columns=vars(columns))
    data_info = data_extra(train_ds, eval_ds)
    ckpt = Checkpoint(checkpoint or checkpoint_dir(name, output_dir, getattr(registry, "home", None)))
    identity = {"kind": "train", "name": name, "hyperparameters": hyper, "data": data_info}
    metrics = run(
        task_model, train_ds, eval_ds, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        patience=patience, progress=progress, output_dir=None, warmup_ratio=warmup_ratio,
        warmup_steps=warmup_steps, weight_decay=weight_decay,
        gradient_accumulation_steps=gradient_accumulation_steps, eval_steps=eval_steps, checkpoint=ckpt,
        resume=resume, identity=identity, log=log or (stderr_log if progress else None),
    )  # fmt: skip
    extra: dict[str, Any] = {"hyperparameters": hyper, "data": data_info}
    tensors = dict(model.adapter_state_dict(name))
    if head is not None and train_ds.label_map is not None:
        extra["head"] = head.describe(train_ds.label_map.labels)
        tensors.update(head.tensors())
    adapter = model.get_adapter(name)
    manifest = af.Manifest(
        name=name, method=adapter.method, base_model=base_model or base_id, base_fingerprint=model.fingerprint,
        task=task,
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
    problem_type = head.problem_type if head is not None else "single-label"
    return TaskModel(model, task, head, fusion, problem_type=problem_type).eval()
