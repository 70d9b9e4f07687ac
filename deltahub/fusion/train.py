"""Deprecated: `train` moved to `deltahub.training` and `fuse` to `deltahub.fusion`
(import both from `deltahub`); this alias goes in the next release."""

import warnings

from deltahub.fusion.learn import fuse
from deltahub.training.adapter import load_task_model, train
from deltahub.training.engine import METHODS, TaskModel, TrainResult

warnings.warn(
    "deltahub.fusion.train moved: train and load_task_model to deltahub.training, fuse to deltahub.fusion",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["METHODS", "TaskModel", "TrainResult", "fuse", "load_task_model", "train"]
