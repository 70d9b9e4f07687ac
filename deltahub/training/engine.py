"""The training engine: the task model, transformers' Trainer, early stopping, publishing.

`deltahub.training.train` (one adapter of any method) and `deltahub.fusion.fuse` (an
AdapterFusion) both run through it; they differ only in which parameters require a
gradient.

`TaskModel` wraps an `AdaptedModel` (compose's injection; nothing re-implemented here)
with the task head and the loss:

- classification: cross-entropy over the head's logits (`deltahub.training.head`);
  with `problem_type="regression"` the mean squared error of its one output against a
  float label, with `"multi-label"` binary cross-entropy over one logit per label;
- causal-lm: next-token cross-entropy on the labelled positions (-100 marks the prompt
  and the padding);
- plus `lambda * R` when the trainable part has a penalty `R = regularization()` (a
  fusion's `sum ||V - I||^2`, the paper's value regularization).

`run` trains whatever parameters require a gradient with transformers' `Trainer` (so
multi-GPU, mixed precision, warmup, weight decay and gradient accumulation come from the
existing engine), evaluating every epoch (or every `eval_steps`) and stopping early on the
evaluation metric (accuracy, mse for regression, micro-F1 for multi-label, the loss for
causal-lm). The best evaluation's trainable weights are kept in memory and restored at the
end, and saved as a checkpoint (`deltahub.training.checkpoint`: safetensors and JSON, no
pickle) that `resume=True` continues from; Ctrl-C raises `TrainingInterrupted` with the
checkpoint kept. One line per epoch goes to `log`: loss, eval metric, best so far.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.errors import InvalidConfig, Unsupported
from deltahub.training.checkpoint import Checkpoint, TrainingInterrupted, checkpoint_trainer
from deltahub.training.data import PROBLEM_TYPES, TASKS, Collator, Columns, Dataset, LabelMap, load_dataset
from deltahub.training.epochs import BestEpoch, compute_metrics, quiet_progress
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
        problem_type: str = "single-label",
    ) -> None:
        super().__init__()
        if problem_type not in PROBLEM_TYPES:
            raise InvalidConfig(f"problem_type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        self.model = model
        self.task = task
        self.problem_type = problem_type
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
            loss = None if labels is None else self.classification_loss(logits.float(), labels)
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

    def classification_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.problem_type == "regression":
            return F.mse_loss(logits.squeeze(-1), labels.float())  # (B,) against float labels
        if self.problem_type == "multi-label":
            return F.binary_cross_entropy_with_logits(logits, labels.float())  # (B, K) multi-hot
        return F.cross_entropy(logits, labels.long())


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
    *,
    use_dora: bool = False,
    use_rslora: bool = False,
    lora_dropout: float = 0.0,
    num_virtual_tokens: int | None = None,
) -> dict[str, Any]:
    """The `add_adapter` config for a `--method` name."""
    if method != "lora" and (use_dora or use_rslora or lora_dropout):
        raise InvalidConfig(f"DoRA, rsLoRA and LoRA dropout are LoRA options; method {method!r} has none")
    if num_virtual_tokens is not None and method not in ("prompt", "prefix", "ptuning-v2"):
        raise InvalidConfig(f"num_virtual_tokens is for prompt, prefix and ptuning-v2, not {method!r}")
    if method == "lora":
        if not 0.0 <= lora_dropout < 1.0:
            raise InvalidConfig(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        tm: Any = target_modules or "all-linear"
        if isinstance(tm, (list, tuple)):
            tm = list(tm)
        cfg: dict[str, Any] = {"method": "lora", "r": int(r), "lora_alpha": alpha, "target_modules": tm}
        if use_dora:
            cfg["use_dora"] = True
        if use_rslora:
            cfg["use_rslora"] = True
        if lora_dropout:
            cfg["lora_dropout"] = float(lora_dropout)
        return cfg
    if method in ("houlsby", "pfeiffer", "parallel"):
        cfg = {"method": "bottleneck", "variant": method}
        if bottleneck_size is not None:
            cfg["bottleneck_size"] = int(bottleneck_size)
        else:
            cfg["reduction_factor"] = reduction_factor or 16
        return cfg
    if method in ("ia3", "bitfit", "ssf"):  # defaults per model type (compose.methods)
        return {"method": method, **({"target_modules": list(target_modules)} if target_modules else {})}
    if method in ("prompt", "prefix", "ptuning-v2"):  # prefix: Li & Liang's MLP while training
        tokens = 20 if num_virtual_tokens is None else int(num_virtual_tokens)
        if tokens <= 0:
            raise InvalidConfig(f"num_virtual_tokens must be positive, got {tokens}")
        cfg = {"method": method, "num_virtual_tokens": tokens}
        return {**cfg, "prefix_projection": True} if method == "prefix" else cfg
    raise InvalidConfig(f"method {method!r} is not one of {', '.join(METHODS)}")


def load_model(
    base: Any, tokenizer: Any, registry: Any, quantize: str | None = None, checkpointing: bool = False
) -> tuple[Any, Any, str | None]:
    """(AdaptedModel, tokenizer, base id) from a path/hub id or an already-built module.

    With `quantize` the base is 4/8-bit and set up for QLoRA (`compose.quant.prepare_for_training`).
    `tokenizer` may be a tokenizer, or a directory or hub id to load one from.
    """
    from deltahub.compose.base import base_model_id, load_base
    from deltahub.compose.model import AdaptedModel

    base_id = None
    if isinstance(tokenizer, (str, Path)):
        tokenizer = _load_tokenizer(tokenizer)
    if isinstance(base, nn.Module):
        module = load_base(base, device="cpu" if not torch.cuda.is_available() else None, quantize=quantize)
        base_id = base_model_id(base)
        if tokenizer is None:
            raise InvalidConfig("pass tokenizer= when the base is a module rather than a path")
    else:
        module = load_base(base, quantize=quantize)
        base_id = base_model_id(base)  # a hub id, never a local path
        if tokenizer is None:
            tokenizer = _load_tokenizer(base)
    if quantize is not None:
        from deltahub.compose.quant import prepare_for_training

        prepare_for_training(module, checkpointing)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers often have none
    if tokenizer.pad_token_id is None:
        raise InvalidConfig("the tokenizer has neither a pad nor an eos token; give it a pad_token")
    return AdaptedModel(module, registry=registry), tokenizer, base_id


def _load_tokenizer(source: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as e:
        raise InvalidConfig(f"cannot load a tokenizer from {source}: {e}") from None


def datasets(
    task: str,
    data: Any,
    eval_data: Any,
    tokenizer: Any,
    max_length: int,
    columns: Columns | None = None,
    problem_type: str = "single-label",
) -> tuple[Dataset, Dataset | None]:
    """Tokenized training and evaluation sets from files or `datasets.Dataset`s."""
    if task not in TASKS:
        raise InvalidConfig(f"task {task!r} is not one of {', '.join(TASKS)}")

    def load(source: Any, label_map: LabelMap | None) -> Dataset:
        if isinstance(source, Dataset):
            return source
        return load_dataset(source, task, tokenizer, max_length, label_map, columns, problem_type)

    train_ds = load(data, None)
    eval_ds = None if eval_data is None else load(eval_data, train_ds.label_map)
    return train_ds, eval_ds


def make_head(
    model: Any, task: str, labels: LabelMap | None, problem_type: str = "single-label"
) -> TaskHead | None:
    if task != "classification":
        if getattr(model.base, "get_output_embeddings", lambda: None)() is None:
            raise Unsupported(
                f"causal-lm training needs a base with a language-model head; {type(model.base).__name__} has none"
            )
        return None
    width = getattr(model.base.config, "hidden_size", None) or getattr(model.base.config, "n_embd", None)
    outputs = 1 if problem_type == "regression" else len(labels.labels)  # type: ignore[union-attr]
    head = TaskHead(int(width), outputs, default_pooling(model.base), problem_type)
    return head.to(next(model.base.parameters()).device)


def training_arguments(**kwargs: Any) -> Any:
    """transformers' `TrainingArguments` (one place, so tests can see what training gets)."""
    from transformers import TrainingArguments

    return TrainingArguments(**kwargs)


def _metric_for(task_model: TaskModel) -> tuple[str, bool]:
    """(eval metric, whether greater is better)."""
    if task_model.task != "classification":
        return "loss", False
    return {"regression": ("mse", False), "multi-label": ("f1", True)}.get(
        task_model.problem_type, ("accuracy", True)
    )


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
    warmup_ratio: float = 0.0,
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    gradient_accumulation_steps: int = 1,
    eval_steps: int | None = None,
    checkpoint: Checkpoint | None = None,
    resume: bool = False,
    identity: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train the parameters of `task_model` that require grad; return the final metrics.

    `checkpoint` keeps the best state so far (`resume=True` continues from it, refusing one
    of another training: `identity` says what this one is); it is removed once training
    ends well. Ctrl-C raises `TrainingInterrupted` naming the checkpoint kept.
    """
    if epochs <= 0 or batch_size <= 0 or lr <= 0:
        raise InvalidConfig(f"epochs ({epochs}), batch size ({batch_size}) and lr ({lr}) must be positive")
    if gradient_accumulation_steps <= 0 or (eval_steps is not None and eval_steps <= 0):
        raise InvalidConfig("gradient accumulation steps and eval steps must be positive")
    if warmup_ratio and warmup_steps:
        raise InvalidConfig("give warmup as a ratio or as steps, not both")
    if not 0.0 <= warmup_ratio < 1.0 or warmup_steps < 0 or weight_decay < 0:
        raise InvalidConfig("warmup ratio must be in [0, 1), warmup steps and weight decay non-negative")
    if eval_steps is not None and eval_ds is None:
        raise InvalidConfig("eval steps need evaluation data (--eval)")
    params = {n: p for n, p in task_model.named_parameters() if p.requires_grad}
    if not params:
        raise InvalidConfig("nothing to train: no parameter requires a gradient")
    classification = task_model.task == "classification"
    metric, greater = _metric_for(task_model)
    identity = identity or {}
    keeper = BestEpoch(
        params, metric, greater, patience, epochs, eval_ds is not None, eval_ds is not None and eval_steps is None,
        checkpoint, identity, log,
    )  # fmt: skip
    resume_from = None
    if resume:
        if checkpoint is None:
            raise InvalidConfig("resume needs a checkpoint directory")
        info = checkpoint.check(identity)
        keeper.resume_from(info, checkpoint.load_weights(params))
        resume_from = str(checkpoint.path)

    with tempfile.TemporaryDirectory(prefix="deltahub-train-") as tmp:
        args = training_arguments(
            output_dir=output_dir or tmp,
            num_train_epochs=epochs,
            learning_rate=lr,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            eval_strategy="no" if eval_ds is None else ("steps" if eval_steps else "epoch"),
            eval_steps=eval_steps,
            save_strategy="no",
            logging_strategy="epoch",
            report_to="none",
            seed=seed,
            data_seed=seed,
            remove_unused_columns=False,
            disable_tqdm=not progress,
            weight_decay=weight_decay,
            warmup_steps=warmup_ratio or warmup_steps,  # below 1: a ratio of all steps
            gradient_accumulation_steps=gradient_accumulation_steps,
            dataloader_num_workers=0,
            prediction_loss_only=not classification,
            use_cpu=not torch.cuda.is_available(),
        )
        trainer = checkpoint_trainer()(
            model=task_model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=Collator(tokenizer.pad_token_id),
            compute_metrics=compute_metrics(task_model.problem_type) if classification else None,
            callbacks=[keeper.callback()],
        )
        trainer.checkpoint, trainer.trainable = checkpoint, params
        if not progress:
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # it prints each epoch's logs on stdout
        else:
            from transformers.trainer_callback import ProgressCallback

            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(quiet_progress())
        try:
            out = trainer.train(resume_from_checkpoint=resume_from)
        except KeyboardInterrupt:
            kept = checkpoint.path if checkpoint is not None and checkpoint.exists() else None
            raise TrainingInterrupted(kept) from None
        keeper.active = False
        keeper.restore()
        metrics: dict[str, float] = {
            "train_loss": float(out.training_loss),
            "epochs": float(trainer.state.epoch or 0),
        }
        if eval_ds is not None:
            final = trainer.evaluate()
            if classification:
                metrics[metric] = float(final[f"eval_{metric}"])
            metrics["eval_loss"] = float(final["eval_loss"])
            if keeper.best_epoch is not None:
                metrics["best_epoch"] = float(keeper.best_epoch)
    if checkpoint is not None:
        checkpoint.remove()
    task_model.eval()
    return metrics
