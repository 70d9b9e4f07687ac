"""IA3's artifact schema (PEFT's format unchanged), torch-free.

adapter_config.json: `{"peft_type": "IA3", "target_modules": [...] | regex,
"feedforward_modules": [...] | regex | null, ...}`; one tensor per module,
`base_model.model.<module>.ia3_l`, shaped (d_out, 1) (output scaling) or (1, d_in)
(feed-forward modules: input scaling). `modules_to_save` modules (PEFT adds the
classification head for SEQ_CLS) are saved whole beside them
(`deltahub.methods.lora.extras`).
"""

from __future__ import annotations

from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TASK_HEAD_PREFIX, TensorInfo
from deltahub.methods.checks import bad, check_regex, str_or_list
from deltahub.methods.lora import extras as ex


def check_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Field types, and every tensor an `ia3_l` vector shaped (n, 1) or (1, n)."""
    str_or_list(config, "target_modules", required=True)
    str_or_list(config, "feedforward_modules", required=False)
    if isinstance(config.get("feedforward_modules"), str):  # a regex, matched at load
        check_regex("feedforward_modules", config["feedforward_modules"])
    targets, ff = config.get("target_modules"), config.get("feedforward_modules")
    if isinstance(targets, list) and isinstance(ff, list) and not set(ff) <= set(targets):
        # PEFT's IA3Config refuses it too: a feed-forward module that is not adapted
        raise bad(f"feedforward_modules {sorted(ff)} must be a subset of target_modules {sorted(targets)}")
    if "fan_in_fan_out" in config and not isinstance(config["fan_in_fan_out"], bool):
        raise bad("fan_in_fan_out must be true or false")
    found = 0
    rest: list[str] = []
    adapted: set[str] = set()
    for name, info in tensors.items():
        if name.startswith(TASK_HEAD_PREFIX):
            continue
        if not name.endswith(".ia3_l"):
            rest.append(name)
            continue
        adapted.add(name.removeprefix(ex.PREFIX).removesuffix(".ia3_l"))
        if len(info.shape) != 2 or 1 not in info.shape or min(info.shape) < 1:
            raise InvalidArtifact(
                "shape-mismatch", f"{name} has shape {list(info.shape)}, expected (n, 1) or (1, n)"
            )
        found += 1
    if not found:
        raise InvalidArtifact("config-shape", "an IA3 artifact needs at least one ia3_l vector")
    ex.classify(config, rest, adapted, "ia3")
