"""Deprecated alias of `deltahub.methods.prompt.runtime` (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

import deltahub.methods.prompt.runtime as _new

warnings.warn(
    "deltahub.compose.methods.prompt moved to deltahub.methods.prompt.runtime",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
