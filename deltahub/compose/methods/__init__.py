"""Deprecated: adapter methods moved to `deltahub.methods` (kept for one release).

`register_method(name, cls)` here registers a runtime class as before; new methods use
`deltahub.methods.register_method(name, schema=..., runtime=...)`.
"""

from __future__ import annotations

import warnings
from typing import Any

from deltahub import methods as _methods

warnings.warn("deltahub.compose.methods moved to deltahub.methods", DeprecationWarning, stacklevel=2)


def register_method(name: str, cls: Any) -> None:
    """Make `cls` the runtime of adapters whose config says method `name`."""
    _methods.register_method(name, runtime=cls)


def get_method(name: str) -> Any:
    return _methods.get_method(name)


def known_methods() -> list[str]:
    return _methods.known_methods()
