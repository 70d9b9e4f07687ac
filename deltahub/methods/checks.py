"""Small torch-free checks that the method schemas share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.patterns import MAX_TOTAL_STATES, PatternError, check_pattern, pattern_size


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


def short(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_regex(field: str, pattern: Any) -> None:
    """A pattern from the config that is matched against module names: it must be one that
    `deltahub.patterns` matches in linear time (`InvalidArtifact("config-pattern")`)."""
    try:
        check_pattern(pattern)
    except PatternError as e:
        raise InvalidArtifact("config-pattern", f"{field} pattern {short(pattern)}: {e}") from None


def check_pattern_map(config: dict[str, Any], field: str, value_ok: Callable[[Any], bool], what: str) -> None:
    """`config[field]`, PEFT's {module pattern: value} map (rank_pattern, alpha_pattern)."""
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise bad(f"config field {field!r} must be an object")
    states = 0
    for key, value in patterns.items():
        check_regex(field, key)
        states += pattern_size(key)
        if states > MAX_TOTAL_STATES:
            raise InvalidArtifact(
                "config-pattern", f"{field}: its regex keys need more than {MAX_TOTAL_STATES} states together"
            )
        if not value_ok(value):
            raise bad(f"{field}[{short(key)}] must be {what}, got {short(value)}")
