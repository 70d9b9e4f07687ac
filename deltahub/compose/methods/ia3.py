"""Deprecated alias of `deltahub.methods.ia3.runtime` (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

import deltahub.methods.ia3.runtime as _new

warnings.warn(
    "deltahub.compose.methods.ia3 moved to deltahub.methods.ia3.runtime", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
