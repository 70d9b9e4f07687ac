"""The training engine: the task model, transformers' Trainer, early stopping, publishing.

`deltahub.training.train` (one adapter of any method) and `deltahub.fusion.fuse` (an
AdapterFusion) both run through it; they differ only in which parameters require a
gradient.

`TaskModel` wraps an `AdaptedModel` (compose's injection; nothing re-implemented here)
with the task head and the loss:

- classification: cross-entropy over the head's logits (`deltahub.training.head`);
- causal-lm: next-token cross-entropy on the labelled positions (-100 marks the prompt
  and the padding);
- plus `lambda * R` when the trainable part has a penalty `R = regularization()` (a
  fusion's `sum ||V - I||^2`, the paper's value regularization).

`run` trains whatever parameters require a gradient with transformers' `Trainer` (so
multi-GPU, mixed precision and the progress bar come from the existing engine),
evaluating every epoch and stopping early on the evaluation metric (accuracy, or the loss
for causal-lm). The best epoch's trainable weights are kept in memory and restored at the
end: no checkpoint files, since Trainer's resume state is pickled and we never write
pickles.
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
from deltahub.errors import AlreadyExists, InvalidConfig, NotFound, Unsupported
from deltahub.training.data import TASKS, Collator, Dataset, LabelMap, load_dataset
from deltahub.training.head import TaskHead, default_pooling

METHODS = ("lora", "houlsby", "pfeiffer", "parallel", "ia3", "bitfit", "ssf", "prompt", "prefix", "ptuning-v2")  # fmt: skip


class TaskModel(nn.Module):
    """An `AdaptedModel` plus a task head and the task's loss; Trainer's model.

    `fusion` is any resident adapter with a `regularization()` penalty (a fusion), added
    to the loss with weight `fusion_reg` while training.
    """

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
    final metrics, the artifact directory (when one was written: not published, or an
    `output_dir` given) and the live model."""

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
    if method in ("ia3", "bitfit", "ssf"):  # defaults per model type (compose.methods)
        return {"method": method, **({"target_modules": list(target_modules)} if target_modules else {})}
    if method in ("prompt", "prefix", "ptuning-v2"):  # prefix: Li & Liang's MLP while training
        cfg = {"method": method, "num_virtual_tokens": 20}
        return {**cfg, "prefix_projection": True} if method == "prefix" else cfg
    raise InvalidConfig(f"method {method!r} is not one of {', '.join(METHODS)}")


def load_model(
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


def datasets(
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


def make_head(model: Any, task: str, labels: LabelMap | None) -> TaskHead | None:
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


def _quiet_progress() -> type:
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        """One training bar: no log dict per epoch, no nested evaluation bars (the caller
        reports the metrics once)."""

        def on_log(self, *args: Any, **kwargs: Any) -> None:
            pass

        def on_prediction_step(self, *args: Any, **kwargs: Any) -> None:
            pass

    return QuietProgress


def run(
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
        else:
            from transformers.trainer_callback import ProgressCallback

            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(_quiet_progress())
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


def check_publishable(registry: Any, name: str, version: str | None, tags: Sequence[str]) -> None:
    """Refuse, before any training, what the publish at the end would refuse: a bad name,
    version or tag, or (given the `registry` to publish to) a version that exists already."""
    from deltahub.registry.refs import check_name, check_tag, check_version

    check_name(name)
    if version is not None:
        check_version(str(version))
    for tag in tags:
        check_tag(tag)
    if version is None or registry is None:
        return
    try:
        registry.resolve(f"{name}@{version}")
    except NotFound:
        return
    raise AlreadyExists(
        f"{name}@{version} already exists; versions are immutable (train without a version for the "
        "next number, or pick a new one)"
    )


def publish_artifact(
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    manifest: af.Manifest,
    registry: Any,
    publish: bool,
    output_dir: str | Path | None,
    version: str | None,
    tags: Sequence[str],
) -> tuple[Any, Path | None]:
    """Write the artifact to `output_dir` (a fresh temporary directory when not publishing
    and none is given) and/or publish it; returns (version or None, directory or None)."""
    if output_dir is not None or not publish:
        path = Path(output_dir or tempfile.mkdtemp(prefix="deltahub-adapter-"))
        af.write_dir(path, tensors, config, manifest)
        if not publish:
            return None, path
        return registry_or_default(registry).publish(path, manifest.name, version=version, tags=tags), path
    with tempfile.TemporaryDirectory(prefix="deltahub-publish-") as tmp:
        af.write_dir(tmp, tensors, config, manifest)
        return registry_or_default(registry).publish(tmp, manifest.name, version=version, tags=tags), None


def registry_or_default(registry: Any) -> Any:
    if registry is not None:
        return registry
    from deltahub.registry import Registry

    return Registry()


def data_extra(train_ds: Dataset, eval_ds: Dataset | None) -> dict[str, Any]:
    data = {"train": train_ds.describe()}
    if eval_ds is not None:
        data["eval"] = eval_ds.describe()
    return data
