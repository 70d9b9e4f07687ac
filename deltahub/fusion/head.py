"""Deprecated: the task head moved to `deltahub.training.head`; this alias goes in the next release."""

import warnings

from deltahub.training.head import HEAD_PREFIX, TaskHead, default_pooling, has_head

warnings.warn("deltahub.fusion.head moved to deltahub.training.head", DeprecationWarning, stacklevel=2)

__all__ = ["HEAD_PREFIX", "TaskHead", "default_pooling", "has_head"]
