"""Adapter methods: one folder each, plugged in with one `register_method(...)` line.

    methods/<name>/__init__.py   register_method("<name>", schema="...schema:check_config",
                                                 runtime="...runtime:<Adapter>")
    methods/<name>/schema.py     config fields and artifact checks (torch-free)
    methods/<name>/runtime.py    the `AdapterModule` that runs it (torch)

The registry (`registry.py`) imports a schema or a runtime only when asked for it, so
validating an artifact never imports torch. The runtime contract (`common.py`):

    Adapter.create(base, config)                        a fresh trainable adapter (identity at init)
    Adapter.from_tensors(base, config, keys, get, name) an adapter read from an artifact's tensors
    adapter.tensors()                                   the artifact's tensors, by key

where `get(key)` returns one tensor of the artifact and `config` is its
`adapter_config.json` object (`deltahub.artifact.method_of(config)` names the method).
"""

from __future__ import annotations

from deltahub.methods.registry import (
    ConfigCheck,
    MethodSpec,
    builtin_folders,
    get_method,
    get_schema,
    known_methods,
    register_method,
    schema_methods,
)

__all__ = [
    "ConfigCheck",
    "MethodSpec",
    "builtin_folders",
    "get_method",
    "get_schema",
    "known_methods",
    "register_method",
    "schema_methods",
]
