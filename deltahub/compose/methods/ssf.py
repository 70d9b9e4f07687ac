"""Deprecated alias of `deltahub.methods.ssf.runtime` (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

import deltahub.methods.ssf.runtime as _new

warnings.warn(
    "deltahub.compose.methods.ssf moved to deltahub.methods.ssf.runtime", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
