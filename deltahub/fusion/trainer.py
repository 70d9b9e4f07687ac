"""Deprecated: the training engine moved to `deltahub.training.engine` (and
`attention_summary` to `deltahub.fusion.learn`); this alias goes in the next release."""

import warnings

from deltahub.fusion.learn import attention_summary
from deltahub.training.engine import (
    METHODS,
    TaskModel,
    TrainResult,
    adapter_config,
    datasets,
    load_model,
    make_head,
    run,
)
from deltahub.training.publishing import data_extra, publish_artifact

warnings.warn("deltahub.fusion.trainer moved to deltahub.training.engine", DeprecationWarning, stacklevel=2)

__all__ = [
    "METHODS", "TaskModel", "TrainResult", "adapter_config", "attention_summary", "data_extra", "datasets",
    "load_model", "make_head", "publish_artifact", "run",
]  # fmt: skip
