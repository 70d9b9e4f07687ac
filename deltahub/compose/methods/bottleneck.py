"""Deprecated alias of `deltahub.methods.bottleneck.runtime` (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

import deltahub.methods.bottleneck.runtime as _new

warnings.warn(
    "deltahub.compose.methods.bottleneck moved to deltahub.methods.bottleneck.runtime",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
