"""Deprecated: training data moved to `deltahub.training.data`; this alias goes in the next release."""

import warnings

from deltahub.training.data import (
    IGNORE_INDEX,
    TASKS,
    Collator,
    Dataset,
    LabelMap,
    file_digest,
    load_dataset,
    read_records,
)

warnings.warn("deltahub.fusion.data moved to deltahub.training.data", DeprecationWarning, stacklevel=2)

__all__ = [
    "IGNORE_INDEX", "TASKS", "Collator", "Dataset", "LabelMap", "file_digest", "load_dataset", "read_records",
]  # fmt: skip
