"""Training: one adapter for a task (`train`), or an AdapterFusion over published ones (`fuse`).

Both run through transformers' `Trainer`, so multi-GPU (`torchrun`/`accelerate launch`),
mixed precision and the progress bar come from the existing engine. Around it:

- the model is an `AdaptedModel` (compose's injection; nothing re-implemented here) with
  one trainable adapter, or frozen constituents plus trainable fusion parameters, wrapped
  in `TaskModel`, which adds the task head and the loss;
- the loss: cross-entropy over the head's logits (classification), or next-token
  cross-entropy on the labelled positions (causal-lm; -100 marks prompt and padding);
  for a fusion, plus `lambda * sum ||V - I||^2` (the paper's value regularization);
- evaluation every epoch and early stopping on the evaluation metric (accuracy, or the
  loss for causal-lm) with the best epoch's trainable weights kept in memory and restored
  at the end (no checkpoint files: Trainer's resume state is pickled, which we never
  write);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub import artifact as af
from deltahub.errors import InvalidConfig, Unsupported
from deltahub.fusion.artifact import CONSTITUENT_ROLE
from deltahub.fusion.data import TASKS, Collator, Dataset, LabelMap, load_dataset
from deltahub.fusion.head import TaskHead, default_pooling

METHODS = ("lora", "houlsby", "pfeiffer", "parallel")


class TaskModel(nn.Module):
    """An `AdaptedModel` plus a task head and the task's loss; Trainer's model."""

    def __init__(
        self,
        model: Any,
        task: str,
        head: TaskHead | None = None,
        fusion: Any = None,
        fusion_reg: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.head = head
        # Not a submodule: its parameters are the model's already.
        object.__setattr__(self, "fusion", fusion)
        self.fusion_reg = fusion_reg

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Any:
        if self.task == "classification":
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]  # (B, T, d), after the final norm
            logits = self.head(hidden, attention_mask)  # type: ignore[misc]  # (B, K)
            loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        else:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            logits = out.logits  # (B, T, V)
            loss = None
            if labels is not None:
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
                )
        if loss is not None and self.fusion is not None and self.fusion_reg > 0 and self.training:
            loss = loss + self.fusion_reg * self.fusion.regularization()
        return {"loss": loss, "logits": logits}


@dataclass
class TrainResult:
    """What `train` / `fuse` made: the published version (None with publish=False), the
    final metrics, the artifact directory (only when not published) and the live model."""

    metrics: dict[str, float]
    model: TaskModel
    version: Any = None
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- pieces


def adapter_config(
    method: str,
    r: int = 16,
    alpha: float = 32,
    target_modules: Sequence[str] | str | None = None,
    reduction_factor: float | None = 16,
    bottleneck_size: int | None = None,
) -> dict[str, Any]:
    """The `add_adapter` config for a `--method` name."""
    if method == "lora":
        tm: Any = target_modules or "all-linear"
        if isinstance(tm, (list, tuple)):
            tm = list(tm)
        return {"method": "lora", "r": int(r), "lora_alpha": alpha, "target_modules": tm}
    if method in ("houlsby", "pfeiffer", "parallel"):
        cfg: dict[str, Any] = {"method": "bottleneck", "variant": method}
        if bottleneck_size is not None:
            cfg["bottleneck_size"] = int(bottleneck_size)
        else:
            cfg["reduction_factor"] = reduction_factor or 16
        return cfg
    raise InvalidConfig(f"method {method!r} is not one of {', '.join(METHODS)}")


def _load(
    base: Any, tokenizer: Any, registry: Any, quantize: str | None = None, checkpointing: bool = False
) -> tuple[Any, Any, str | None]:
    """(AdaptedModel, tokenizer, base id) from a path/hub id or an already-built module.

    With `quantize` the base is 4/8-bit and set up for QLoRA (`compose.quant.prepare_for_training`).
    """
    from deltahub.compose.base import load_base
    from deltahub.compose.model import AdaptedModel

    base_id = None
    if isinstance(base, nn.Module):
        module = load_base(base, device="cpu" if not torch.cuda.is_available() else None, quantize=quantize)
        base_id = getattr(getattr(base, "config", None), "_name_or_path", None) or None
        if tokenizer is None:
            raise InvalidConfig("pass tokenizer= when the base is a module rather than a path")
    else:
        module = load_base(base, quantize=quantize)
        base_id = str(base)
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(base))
            except (OSError, ValueError) as e:
                raise InvalidConfig(f"cannot load a tokenizer from {base}: {e}") from None
    if quantize is not None:
        from deltahub.compose.quant import prepare_for_training

        prepare_for_training(module, checkpointing)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers often have none
    if tokenizer.pad_token_id is None:
        raise InvalidConfig("the tokenizer has neither a pad nor an eos token; give it a pad_token")
    return AdaptedModel(module, registry=registry), tokenizer, base_id


def _datasets(
    task: str, data: Any, eval_data: Any, tokenizer: Any, max_length: int
) -> tuple[Dataset, Dataset | None]:
    if task not in TASKS:
        raise InvalidConfig(f"task {task!r} is not one of {', '.join(TASKS)}")
    train_ds = data if isinstance(data, Dataset) else load_dataset(data, task, tokenizer, max_length)
    eval_ds = None
    if eval_data is not None:
        eval_ds = (
            eval_data
            if isinstance(eval_data, Dataset)
            else load_dataset(eval_data, task, tokenizer, max_length, train_ds.label_map)
        )
    return train_ds, eval_ds


def _head(model: Any, task: str, labels: LabelMap | None) -> TaskHead | None:
    if task != "classification":
        if getattr(model.base, "get_output_embeddings", lambda: None)() is None:
            raise Unsupported(
                f"causal-lm training needs a base with a language-model head; {type(model.base).__name__} has none"
            )
        return None
    width = getattr(model.base.config, "hidden_size", None) or getattr(model.base.config, "n_embd", None)
    head = TaskHead(int(width), len(labels.labels), default_pooling(model.base))  # type: ignore[union-attr]
    return head.to(next(model.base.parameters()).device)


class _BestEpoch:
    """Trainer callback: early stopping on an eval metric, best trainable weights kept in memory."""

    def __init__(self, params: dict[str, nn.Parameter], metric: str, greater: bool, patience: int) -> None:
        self.params, self.metric, self.greater, self.patience = params, metric, greater, patience
        self.best: float | None = None
        self.best_epoch: float | None = None
        self.snapshot: dict[str, Tensor] | None = None
        self.bad = 0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        keeper = self

        class Callback(TrainerCallback):
            def on_evaluate(
                self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
            ) -> None:
                value = (metrics or {}).get(f"eval_{keeper.metric}")
                if value is None:
                    return
                better = keeper.best is None or (
                    value > keeper.best if keeper.greater else value < keeper.best
                )
                if better:
                    keeper.best, keeper.best_epoch, keeper.bad = value, state.epoch, 0
                    keeper.snapshot = {k: p.detach().clone() for k, p in keeper.params.items()}
                else:
                    keeper.bad += 1
                    if keeper.patience > 0 and keeper.bad >= keeper.patience:
                        control.should_training_stop = True

        return Callback()

    def restore(self) -> None:
        if self.snapshot is not None:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.snapshot[k])


def _run(
    task_model: TaskModel,
    train_ds: Dataset,
    eval_ds: Dataset | None,
    tokenizer: Any,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    patience: int,
    progress: bool,
    output_dir: str | None,
) -> dict[str, float]:
    """Train the parameters of `task_model` that require grad; return the final metrics."""
    from transformers import Trainer, TrainingArguments

    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise InvalidConfig(f"epochs ({epochs}), batch size ({batch_size}) and lr ({lr}) must be positive")
    params = {n: p for n, p in task_model.named_parameters() if p.requires_grad}
    if not params:
        raise InvalidConfig("nothing to train: no parameter requires a gradient")
    classification = task_model.task == "classification"
    metric = "accuracy" if classification else "loss"
    keeper = _BestEpoch(params, metric, greater=classification, patience=patience)

    def compute_metrics(pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return {"accuracy": float((logits.argmax(-1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory(prefix="deltahub-train-") as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp,
            num_train_epochs=epochs,
            learning_rate=lr,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            eval_strategy="epoch" if eval_ds is not None else "no",
            save_strategy="no",
            logging_strategy="epoch",
            report_to="none",
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            disable_tqdm=not progress,
            weight_decay=0.0,
            dataloader_num_workers=0,
            prediction_loss_only=not classification,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = Trainer(
            model=task_model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=Collator(tokenizer.pad_token_id),
            compute_metrics=compute_metrics if classification else None,
            callbacks=[keeper.callback()],
        )
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # it prints each epoch's logs on stdout
        out = trainer.train()
        keeper.restore()
        metrics: dict[str, float] = {
            "train_loss": float(out.training_loss),
            "epochs": float(trainer.state.epoch or 0),
        }
        if eval_ds is not None:
            final = trainer.evaluate()
            if classification:
                metrics["accuracy"] = float(final["eval_accuracy"])
            metrics["eval_loss"] = float(final["eval_loss"])
            if keeper.best_epoch is not None:
                metrics["best_epoch"] = float(keeper.best_epoch)
    task_model.eval()
    return metrics


@torch.no_grad()
def attention_summary(
    task_model: TaskModel, dataset: Dataset, tokenizer: Any, batch_size: int = 32
) -> dict[str, float]:
    """The mean fusion attention each adapter got on `dataset`.

    Averaged over real (non-padding) tokens and over the sites where two or more adapters
    compete (at a site only one adapter changes, its weight is 1 by construction); over
    every site when there is no such site.
    """
    from deltahub.fusion.layer import fusions

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


def _publish(
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    manifest: af.Manifest,
    registry: Any,
    publish: bool,
    output_dir: str | Path | None,
    version: str | None,
    tags: Sequence[str],
) -> tuple[Any, Path | None]:
    if not publish:
        path = Path(output_dir or tempfile.mkdtemp(prefix="deltahub-adapter-"))
        af.write_dir(path, tensors, config, manifest)
        return None, path
    if registry is None:
        from deltahub.registry import Registry

        registry = Registry()
    with tempfile.TemporaryDirectory(prefix="deltahub-publish-") as tmp:
        af.write_dir(tmp, tensors, config, manifest)
        return registry.publish(tmp, manifest.name, version=version, tags=tags), None


def _data_extra(train_ds: Dataset, eval_ds: Dataset | None) -> dict[str, Any]:
    data = {"train": train_ds.describe()}
    if eval_ds is not None:
        data["eval"] = eval_ds.describe()
    return data


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
    model, tokenizer, base_id = _load(base, tokenizer, registry, quantize, gradient_checkpointing)
    train_ds, eval_ds = _datasets(task, data, eval_data, tokenizer, max_length)
    config = adapter_config(method, r, alpha, target_modules, reduction_factor, bottleneck_size)
    model.add_adapter(name, config)
    model.activate(name)
    head = _head(model, task, train_ds.label_map)
    task_model = TaskModel(model, task, head)
    metrics = _run(
        task_model, train_ds, eval_ds, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        patience=patience, progress=progress, output_dir=None,
    )  # fmt: skip
    hyper = {
        "method": method, "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
        "max_length": max_length, "patience": patience,
    }  # fmt: skip
    if method == "lora":
        hyper.update(r=r, alpha=alpha, target_modules=config["target_modules"])
    else:
        hyper.update(reduction_factor=reduction_factor, bottleneck_size=bottleneck_size)
    extra: dict[str, Any] = {"hyperparameters": hyper, "data": _data_extra(train_ds, eval_ds)}
    tensors = dict(model.adapter_state_dict(name))
    if head is not None and train_ds.label_map is not None:
        extra["head"] = head.describe(train_ds.label_map.labels)
        tensors.update(head.tensors())
    adapter = model.get_adapter(name)
    manifest = af.Manifest(
        name=name, method=adapter.method, base_model=base_id, base_fingerprint=model.fingerprint, task=task,
        metrics=metrics, description=description, extra=extra,
    )  # fmt: skip
    published, path = _publish(
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
    model, tokenizer, base_id = _load(base, tokenizer, registry, quantize, gradient_checkpointing)
    train_ds, eval_ds = _datasets(task, data, eval_data, tokenizer, max_length)
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
    head = _head(model, task, train_ds.label_map)
    task_model = TaskModel(model, task, head, fusion, fusion_reg)
    metrics = _run(
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
        "data": _data_extra(train_ds, eval_ds),
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
    published, path = _publish(tensors, config, manifest, registry, publish, output_dir, version, tags)
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
