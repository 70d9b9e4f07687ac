"""deltahub.training: train adapters of any method for a task.

`data.py` reads local files (JSON Lines, CSV, Parquet, through HF `datasets`) or a
`datasets.Dataset` into tokenized examples; `head.py` is the task head saved beside an
adapter's weights (single-label, multi-label, regression); `engine.py` is the task model
and the run over transformers' `Trainer`; `epochs.py` the per-epoch bookkeeping (best
evaluation, early stopping, the epoch line); `checkpoint.py` the best-so-far checkpoint
(no pickle) and resuming from it; `publishing.py` the checks before training and the
publish after; `adapter.py` holds `train()` (one adapter) and `load_task_model()` (a
trained adapter or fusion with its head, ready to run); `inference.py` holds `predict()`.
Fusion training (`deltahub.fusion.fuse`) uses this engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "train": "deltahub.training.adapter",
    "load_task_model": "deltahub.training.adapter",
    "predict": "deltahub.training.inference",
    "TaskModel": "deltahub.training.engine",
    "TrainResult": "deltahub.training.engine",
    "METHODS": "deltahub.training.engine",
    "TaskHead": "deltahub.training.head",
    "load_dataset": "deltahub.training.data",
}

if TYPE_CHECKING:
    from deltahub.training.adapter import load_task_model, train
    from deltahub.training.data import load_dataset
    from deltahub.training.engine import METHODS, TaskModel, TrainResult
    from deltahub.training.head import TaskHead
    from deltahub.training.inference import predict


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deltahub.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "METHODS", "TaskHead", "TaskModel", "TrainResult", "load_dataset", "load_task_model", "predict", "train",
]  # fmt: skip
