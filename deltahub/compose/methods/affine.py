"""Deprecated alias of `deltahub.methods.affine` (kept for one release)."""

from __future__ import annotations

import warnings
from typing import Any

import deltahub.methods.affine as _new

warnings.warn(
    "deltahub.compose.methods.affine moved to deltahub.methods.affine", DeprecationWarning, stacklevel=2
)


def __getattr__(name: str) -> Any:
    return getattr(_new, name)
