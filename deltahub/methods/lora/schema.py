"""LoRA's artifact schema (PEFT's format unchanged), torch-free.

adapter_config.json is PEFT's LoraConfig: `{"peft_type": "LORA", "r": 8, "lora_alpha": 16,
"target_modules": [...] | regex, "use_rslora": bool, "use_dora": bool, "rank_pattern": {...},
"alpha_pattern": {...}, ...}` (other PEFT fields pass through). Tensors, per module `<m>`:

    <m>.lora_A.weight (r_m, d_in)   <m>.lora_B.weight (d_out, r_m)   [<m>.lora_magnitude_vector (d_out,)]

with r_m from `rank_pattern` (PEFT's lookup, `deltahub.patterns.pattern_value`), else `r`.
"""

from __future__ import annotations

from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TensorInfo
from deltahub.methods.checks import check_pattern_map, is_int, is_num, need
from deltahub.patterns import lora_scaling, pattern_value

__all__ = ["check_config", "lora_scaling", "module_of", "pattern_value"]


def module_of(tensor_name: str, marker: str) -> str | None:
    """`a.b.lora_A.weight` -> `a.b` for marker `lora_A`; None if the marker is absent."""
    parts = tensor_name.split(".")
    if marker not in parts:
        return None
    return ".".join(parts[: parts.index(marker)])


def check_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """PEFT LoRA: field types, and every lora_A/lora_B pair consistent with `r`."""
    r = need(config, "r", (int,), "a positive integer")
    if r <= 0:
        raise InvalidArtifact("config-schema", f"config field 'r' must be positive, got {r}")
    need(config, "lora_alpha", (int, float), "a number")
    tm = config.get("target_modules")
    if tm is not None and not (
        isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))
    ):
        raise InvalidArtifact("config-schema", f"target_modules must be a string or a list, got {tm!r}")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if key in config and not isinstance(config[key], bool):
            raise InvalidArtifact("config-schema", f"config field {key!r} must be true or false")
    # Their keys are regexes matched against module names at load, merge and diff.
    check_pattern_map(config, "rank_pattern", lambda v: is_int(v) and v > 0, "a positive integer")
    check_pattern_map(config, "alpha_pattern", is_num, "a number")
    rank_pattern = config.get("rank_pattern") or {}
    a_shapes: dict[str, tuple[int, ...]] = {}
    b_shapes: dict[str, tuple[int, ...]] = {}
    for name, info in tensors.items():
        for marker, shapes in (("lora_A", a_shapes), ("lora_B", b_shapes)):
            module = module_of(name, marker)
            if module is not None and name.endswith(".weight"):
                if len(info.shape) < 2:
                    raise InvalidArtifact(
                        "shape-mismatch", f"{name} has shape {list(info.shape)}, expected 2-D"
                    )
                shapes[module] = info.shape
    if not a_shapes:
        raise InvalidArtifact("config-shape", "a LoRA artifact needs at least one lora_A weight")
    if set(a_shapes) != set(b_shapes):
        missing = sorted(set(a_shapes) ^ set(b_shapes))[0]
        raise InvalidArtifact("shape-mismatch", f"module {missing} lacks its lora_A or lora_B weight")
    for module, a in a_shapes.items():
        b = b_shapes[module]
        expected = pattern_value(rank_pattern, module, r)
        if a[0] != expected or b[1] != expected:
            raise InvalidArtifact(
                "shape-mismatch",
                f"module {module}: lora_A {list(a)} and lora_B {list(b)} do not have rank r={expected}",
            )
