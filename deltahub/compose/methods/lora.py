"""Deprecated alias of `deltahub.methods.lora.runtime` (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

import deltahub.methods.lora.runtime as _new

warnings.warn(
    "deltahub.compose.methods.lora moved to deltahub.methods.lora.runtime", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
