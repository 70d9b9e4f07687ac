"""Deprecated: each method's schema moved to `deltahub/methods/<name>/schema.py` (kept for
one release)."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

warnings.warn(
    "deltahub.method_schemas moved to deltahub.methods.<name>.schema", DeprecationWarning, stacklevel=2
)

_MOVED = {
    "HEAD_PREFIX": ("deltahub.fileformat", "TASK_HEAD_PREFIX"),
    "BOTTLENECK_VARIANTS": ("deltahub.methods.bottleneck.schema", "BOTTLENECK_VARIANTS"),
    "BOTTLENECK_PARTS": ("deltahub.methods.bottleneck.schema", "BOTTLENECK_PARTS"),
    "NON_LINEARITIES": ("deltahub.methods.bottleneck.schema", "NON_LINEARITIES"),
    "BottleneckConfig": ("deltahub.methods.bottleneck.schema", "BottleneckConfig"),
    "check_bottleneck_config": ("deltahub.methods.bottleneck.schema", "check_config"),
    "FUSION_PARTS": ("deltahub.methods.fusion.schema", "FUSION_PARTS"),
    "FusionConfig": ("deltahub.methods.fusion.schema", "FusionConfig"),
    "check_fusion_config": ("deltahub.methods.fusion.schema", "check_config"),
    "check_ia3_config": ("deltahub.methods.ia3.schema", "check_config"),
    "check_bitfit_config": ("deltahub.methods.bitfit.schema", "check_config"),
    "check_ssf_config": ("deltahub.methods.ssf.schema", "check_config"),
    "TensorInfo": ("deltahub.fileformat", "TensorInfo"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'deltahub.method_schemas' has no attribute {name!r}")
    module, attr = _MOVED[name]
    return getattr(importlib.import_module(module), attr)
