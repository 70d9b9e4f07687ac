"""Adapter methods: one module each, plugged in with one `register_method(...)` line.

A method is an `AdapterModule` subclass (see `deltahub.compose.methods.common`) with two
constructors:

    Method.create(base, config)            a fresh trainable adapter (identity at init)
    Method.from_tensors(base, config, get) an adapter read from an artifact's tensors

where `get(key)` returns one tensor of the artifact. The config is the artifact's
`adapter_config.json` object; `artifact.method_of(config)` names the method.
"""

from __future__ import annotations

import importlib
from typing import Any

from deltahub.errors import Unsupported

_METHODS: dict[str, Any] = {}
# Modules that register a method on import; loaded on first lookup.
_BUILTIN = (
    "deltahub.compose.methods.lora",
    "deltahub.compose.methods.bottleneck",
    "deltahub.compose.methods.ia3",
    "deltahub.compose.methods.bitfit",
    "deltahub.compose.methods.ssf",
    "deltahub.compose.methods.prompt",
    "deltahub.fusion.layer",
)


def register_method(name: str, cls: Any) -> None:
    """Make `cls` the runtime of adapters whose config says method `name`."""
    _METHODS[name] = cls


def get_method(name: str) -> Any:
    """The class registered for method `name`; `Unsupported` if there is none."""
    if name not in _METHODS:
        for module in _BUILTIN:
            importlib.import_module(module)
    if name not in _METHODS:
        raise Unsupported(f"no runtime for adapter method {name!r} (known: {sorted(_METHODS)})")
    return _METHODS[name]


def known_methods() -> list[str]:
    for module in _BUILTIN:
        importlib.import_module(module)
    return sorted(_METHODS)
