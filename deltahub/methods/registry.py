"""The method registry: which schema validates, and which runtime runs, each adapter method.

A method is one folder under `deltahub/methods/` whose `__init__.py` holds one line:

    register_method(
        "lora",
        schema="deltahub.methods.lora.schema:check_config",
        runtime="deltahub.methods.lora.runtime:LoraAdapter",
    )

Both are "module:attribute" strings, imported on first use of each: the artifact layer and
the registry ask for a schema (torch-free) without importing any runtime, and `import
deltahub` imports neither. A schema is a function `check(config, tensors)` that raises
`InvalidArtifact` naming the rule an artifact broke; a runtime is an `AdapterModule`
subclass (see `deltahub.methods.common`). A name may have a runtime only (a training name
such as `ptuning-v2`, whose artifacts are prefix-tuning ones) or a schema only.

Every folder under `deltahub/methods/` is imported (running its registration line) on the
first lookup that misses, so adding one needs no other edit; a method outside the package
registers when its package is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltahub.errors import InvalidArtifact, Unsupported
from deltahub.fileformat import TensorInfo

ConfigCheck = Callable[[dict[str, Any], dict[str, TensorInfo]], None]


@dataclass
class MethodSpec:
    """One registered method: its schema and runtime, as references or resolved objects."""

    name: str
    schema: str | ConfigCheck | None = None
    runtime: str | type | None = None


_METHODS: dict[str, MethodSpec] = {}
_builtins_loaded = False


def register_method(name: str, *, schema: str | ConfigCheck | None = None, runtime: Any = None) -> None:
    """Register method `name`: `schema` checks its artifacts, `runtime` runs them.

    Each is a "module:attribute" string (imported on first use) or the object itself.
    Registering a name again replaces what the new call gives and keeps the rest.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a method name must be a non-empty string, got {name!r}")
    for ref in (schema, runtime):
        if isinstance(ref, str) and ref.count(":") != 1:
            raise ValueError(f"{ref!r} must be 'module:attribute'")
    spec = _METHODS.setdefault(name, MethodSpec(name))
    if schema is not None:
        spec.schema = schema
    if runtime is not None:
        spec.runtime = runtime


def builtin_folders() -> list[str]:
    """The method folders of this package (every subpackage of `deltahub.methods`)."""
    here = Path(__file__).parent
    return [f"deltahub.methods.{m.name}" for m in pkgutil.iter_modules([str(here)]) if m.ispkg]


def _load_builtins() -> None:
    # Importing a folder runs its registration line (torch-free), so a new folder needs
    # no edit anywhere else.
    global _builtins_loaded
    if not _builtins_loaded:
        for module in builtin_folders():
            importlib.import_module(module)
        _builtins_loaded = True  # only once all imported: a failing folder fails every lookup


def _resolve(ref: Any) -> Any:
    if not isinstance(ref, str):
        return ref
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _spec(name: str, part: str) -> MethodSpec | None:
    spec = _METHODS.get(name)
    if spec is None or getattr(spec, part) is None:
        _load_builtins()
        spec = _METHODS.get(name)
    return spec if spec is not None and getattr(spec, part) is not None else None


def get_schema(name: str) -> ConfigCheck:
    """The config check of method `name` (torch-free); `InvalidArtifact("unknown-method")`
    if no method of that name has one."""
    spec = _spec(name, "schema")
    if spec is None:
        known = sorted(n for n, s in _METHODS.items() if s.schema is not None)
        raise InvalidArtifact("unknown-method", f"method {name!r} is not known (known: {known})")
    spec.schema = _resolve(spec.schema)
    return spec.schema  # type: ignore[return-value]


def get_method(name: str) -> Any:
    """The runtime class of method `name` (imports torch); `Unsupported` if there is none."""
    spec = _spec(name, "runtime")
    if spec is None:
        known = sorted(n for n, s in _METHODS.items() if s.runtime is not None)
        raise Unsupported(f"no runtime for adapter method {name!r} (known: {known})")
    spec.runtime = _resolve(spec.runtime)
    return spec.runtime


def known_methods() -> list[str]:
    """Every method name that has a runtime (artifact methods and training names)."""
    _load_builtins()
    return sorted(n for n, s in _METHODS.items() if s.runtime is not None)


def schema_methods() -> list[str]:
    """Every method name whose artifacts can be validated."""
    _load_builtins()
    return sorted(n for n, s in _METHODS.items() if s.schema is not None)
