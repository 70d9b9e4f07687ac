"""Small torch-free checks that the method schemas share."""

from __future__ import annotations

from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TASK_HEAD_PREFIX, TensorInfo


def bad(msg: str) -> InvalidArtifact:
    """A config that breaks its method's schema."""
    return InvalidArtifact("config-schema", msg)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def need(config: dict[str, Any], key: str, types: tuple[type, ...], what: str) -> Any:
    """`config[key]`, which must be one of `types` (a bool is a number only if bool is listed)."""
    value = config.get(key)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise bad(f"config field {key!r} must be {what}, got {value!r}")
    return value


def str_or_list(config: dict[str, Any], key: str, required: bool) -> None:
    """`config[key]` is a module name list or a regex (or absent, unless `required`)."""
    value = config.get(key)
    if value is None and not required:
        return
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise bad(f"{key} must be a module name list or a regex, got {value!r}")


def check_known(config: dict[str, Any], known: set[str], method: str) -> None:
    """No fields beyond `known`; `base_model_type` a string or null."""
    unknown = set(config) - known
    if unknown:
        raise bad(f"unknown {method} config fields {sorted(unknown)} (known: {sorted(known)})")
    if config.get("base_model_type") is not None and not isinstance(config["base_model_type"], str):
        raise bad("base_model_type must be a string or null")


def delta_tensors(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The adapter's own tensors: everything but a trained task head's."""
    return {n: t for n, t in tensors.items() if not n.startswith(TASK_HEAD_PREFIX)}
