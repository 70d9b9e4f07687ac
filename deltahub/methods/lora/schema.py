"""LoRA's artifact schema (PEFT's format unchanged), torch-free.

adapter_config.json is PEFT's LoraConfig: `{"peft_type": "LORA", "r": 8, "lora_alpha": 16,
"target_modules": [...] | regex, "use_rslora": bool, "use_dora": bool, "rank_pattern": {...},
"alpha_pattern": {...}, ...}` (other PEFT fields pass through). Tensors, per module `<m>`:

    <m>.lora_A.weight (r_m, d_in)   <m>.lora_B.weight (d_out, r_m)   [<m>.lora_magnitude_vector (d_out,)]

with r_m from `rank_pattern` (PEFT's lookup, `deltahub.patterns.pattern_value`), else `r`;
`<m>.lora_embedding_A` (r_m, V) / `<m>.lora_embedding_B` (d, r_m) on embeddings;
`<m>.lora_B.bias` (d_out,) with `lora_bias`. Every other tensor must be one the config
saves (`modules_to_save`, `bias`, embedding weights: `deltahub.methods.lora.extras`), and
PEFT options deltahub cannot run exactly are refused here, at publish, by name.
"""

from __future__ import annotations

from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TASK_HEAD_PREFIX, TensorInfo
from deltahub.methods.checks import check_pattern_map, is_int, is_num, need
from deltahub.methods.lora import extras as ex
from deltahub.patterns import lora_scaling, pattern_value

# (key suffix, which factor): PEFT names linear factors `lora_A.weight`, embedding ones
# `lora_embedding_A` (an nn.Parameter, no `.weight`).
FACTORS = (
    ("lora_A.weight", "A"),
    ("lora_B.weight", "B"),
    ("lora_embedding_A", "A"),
    ("lora_embedding_B", "B"),
)
MAGNITUDE = "lora_magnitude_vector"

__all__ = ["check_config", "lora_scaling", "module_of", "pattern_value", "unsupported_option"]

# PEFT LoraConfig options that change what the adapter computes and that deltahub does
# not run: refused at publish (and by `add_adapter`), naming the option.
UNSUPPORTED_OPTIONS = {
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
    "megatron_config": "Megatron-parallel layers (megatron_config)",
    "ensure_weight_tying": "tied copies of saved embeddings (ensure_weight_tying)",
    "use_mica": "MiCA (use_mica)",
}


def unsupported_option(config: dict[str, Any]) -> str | None:
    """A message naming the first PEFT option set in `config` that deltahub cannot run
    exactly, or None."""
    if config.get("lora_bias") and config.get("use_dora"):
        return "LoRA with both lora_bias and use_dora (DoRA) is not supported; retrain without one"
    for key, what in UNSUPPORTED_OPTIONS.items():
        value = config.get(key)
        if value not in (None, False, [], {}, ""):
            return (
                f"LoRA with {what} is not supported: deltahub would compute something other than PEFT "
                f"({key}={value!r}); retrain without it"
            )
    return None


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
    problem = unsupported_option(config)
    if problem:
        raise InvalidArtifact("unsupported-option", problem)
    rank_pattern = config.get("rank_pattern") or {}
    a_shapes: dict[str, tuple[int, ...]] = {}
    b_shapes: dict[str, tuple[int, ...]] = {}
    embedding: set[str] = set()
    rest: list[str] = []
    for name, info in tensors.items():
        if name.startswith(TASK_HEAD_PREFIX):
            continue
        for suffix, shapes in FACTORS:
            if name.endswith("." + suffix):
                module = name[: -len(suffix) - 1]
                if len(info.shape) != 2:
                    raise InvalidArtifact(
                        "shape-mismatch", f"{name} has shape {list(info.shape)}, expected 2-D"
                    )
                (a_shapes if shapes == "A" else b_shapes)[module] = info.shape
                if "embedding" in suffix:
                    embedding.add(module)
                break
        else:
            if name.endswith(".lora_B.bias"):
                if not config.get("lora_bias"):
                    raise InvalidArtifact("config-shape", f"{name} is a lora_B bias but lora_bias is false")
                if len(info.shape) != 1:
                    raise InvalidArtifact(
                        "shape-mismatch", f"{name} has shape {list(info.shape)}, expected 1-D"
                    )
                continue
            if name.endswith("." + MAGNITUDE):
                if not config.get("use_dora"):
                    raise InvalidArtifact("config-shape", f"{name} is a DoRA magnitude but use_dora is false")
                continue
            rest.append(name)
    if embedding and config.get("use_dora"):
        raise InvalidArtifact(
            "unsupported-option",
            f"DoRA on embedding layers ({sorted(embedding)[0]}) is not supported; retrain with use_dora=false "
            "or without the embedding in target_modules",
        )
    bare = {m.removeprefix(ex.PREFIX) for m in a_shapes}
    ex.classify(config, rest, bare, "lora")
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
