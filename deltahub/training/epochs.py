"""Per-epoch bookkeeping of a training run: the best evaluation, its checkpoint, early
stopping, the line printed per epoch (loss, eval metric, best so far), and the metrics.

`BestEpoch` is a transformers `TrainerCallback` (through `callback()`): it keeps the
best evaluation's trainable weights in memory (restored at the end) and in the
checkpoint (`deltahub.training.checkpoint`), and stops after `patience` evaluations
without improvement. `deltahub.training.engine.run` uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.training.checkpoint import Checkpoint


class BestEpoch:
    """Trainer callback: early stopping on an eval metric, the best trainable weights kept in
    memory and in the checkpoint, and one line per epoch."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        metric: str,
        greater: bool,
        patience: int,
        epochs: int,
        has_eval: bool,
        per_epoch_eval: bool,
        checkpoint: Checkpoint | None,
        identity: dict[str, Any],
        log: Callable[[str], None] | None,
    ) -> None:
        self.params, self.metric, self.greater, self.patience = params, metric, greater, patience
        self.epochs, self.has_eval, self.per_epoch_eval = epochs, has_eval, per_epoch_eval
        self.checkpoint, self.identity, self.log = checkpoint, identity, log
        self.best: float | None = None
        self.best_epoch: float | None = None
        self.snapshot: dict[str, Tensor] | None = None
        self.bad = 0
        self.loss: float | None = None  # the last epoch's training loss
        self.last: float | None = None  # the last evaluation's metric
        self.active = True  # off for the evaluation after training

    def resume_from(self, info: dict[str, Any], weights: dict[str, Tensor]) -> None:
        self.best, self.best_epoch, self.bad = (
            info.get("best"),
            info.get("best_epoch"),
            int(info.get("bad", 0)),
        )
        if self.best is not None:  # the best evaluation's weights; without evaluation, none to go back to
            self.snapshot = {k: v.to(self.params[k].device) for k, v in weights.items()}

    def save(self, state: Any, optimizer: Any, scheduler: Any) -> None:
        if self.checkpoint is None or optimizer is None or scheduler is None:
            return
        info = {
            "identity": self.identity, "best": self.best, "best_epoch": self.best_epoch, "bad": self.bad,
            "metric": self.metric, "global_step": state.global_step, "epoch": state.epoch,
        }  # fmt: skip
        self.checkpoint.save(self.params, optimizer, scheduler, state, info)

    def line(self, epoch: float | None) -> None:
        if self.log is None:
            return
        parts = [f"epoch {round(epoch or 0)}/{self.epochs}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.last is not None:
            parts.append(f"{self.metric} {self.last:.4f}")
        if self.best is not None:
            parts.append(f"best {self.metric} {self.best:.4f} (epoch {self.best_epoch or 0:.3g})")
        self.log("  ".join(parts))

    def callback(self) -> Any:
        from transformers import TrainerCallback

        keeper = self

        class Callback(TrainerCallback):
            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if keeper.active and logs and "loss" in logs:
                    keeper.loss = float(logs["loss"])
                    if not keeper.per_epoch_eval:  # no evaluation to wait for at this epoch's end
                        keeper.line(state.epoch)

            def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                if keeper.active and not keeper.has_eval:  # the latest epoch is the best known
                    keeper.save(state, kw.get("optimizer"), kw.get("lr_scheduler"))

            def on_evaluate(
                self, args: Any, state: Any, control: Any, metrics: Any = None, **kw: Any
            ) -> None:
                value = (metrics or {}).get(f"eval_{keeper.metric}")
                if value is None or not keeper.active:
                    return
                keeper.last = float(value)
                better = keeper.best is None or (
                    value > keeper.best if keeper.greater else value < keeper.best
                )
                if better:
                    keeper.best, keeper.best_epoch, keeper.bad = float(value), state.epoch, 0
                    keeper.snapshot = {k: p.detach().clone() for k, p in keeper.params.items()}
                    keeper.save(state, kw.get("optimizer"), kw.get("lr_scheduler"))
                else:
                    keeper.bad += 1
                    if keeper.patience > 0 and keeper.bad >= keeper.patience:
                        control.should_training_stop = True
                if keeper.per_epoch_eval:
                    keeper.line(state.epoch)

        return Callback()

    def restore(self) -> None:
        if self.snapshot is not None:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(self.snapshot[k])


def quiet_progress() -> type:
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        """One training bar: no log dict per epoch, no nested evaluation bars (the caller
        reports the metrics once)."""

        def on_log(self, *args: Any, **kwargs: Any) -> None:
            pass

        def on_prediction_step(self, *args: Any, **kwargs: Any) -> None:
            pass

    return QuietProgress


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compute_metrics(problem_type: str) -> Callable[[Any], dict[str, float]]:
    import numpy as np

    def compute(pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = pred.label_ids
        if problem_type == "regression":
            return {"mse": float(((logits.reshape(-1) - labels.reshape(-1)) ** 2).mean())}
        if problem_type == "multi-label":
            guess, truth = logits > 0, labels > 0.5
            tp = float(np.logical_and(guess, truth).sum())
            denom = float(guess.sum() + truth.sum())
            return {"f1": 2 * tp / denom if denom else 1.0}
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    return compute
