"""Deprecated alias of `deltahub.methods.common` (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

import deltahub.methods.common as _new

warnings.warn(
    "deltahub.compose.methods.common moved to deltahub.methods.common", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
