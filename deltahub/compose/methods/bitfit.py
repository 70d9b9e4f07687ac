"""Deprecated alias of `deltahub.methods.bitfit.runtime` (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

import deltahub.methods.bitfit.runtime as _new

warnings.warn(
    "deltahub.compose.methods.bitfit moved to deltahub.methods.bitfit.runtime",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
