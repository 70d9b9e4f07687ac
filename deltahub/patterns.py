"""PEFT's per-module lookups, shared by validation, the runtimes and the diff.

`rank_pattern` and `alpha_pattern` map a pattern to a value; a module takes the value of
the first key that matches its name (PEFT's `get_pattern_key`). `lora_scaling` is PEFT's
scaling rule that the alpha lookup feeds. Torch-free.
"""

from __future__ import annotations

import math
import re
from typing import Any


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (`get_pattern_key`): the value of the first
    key k with re.match(rf"(.*\\.)?({k})$", module), else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict[str, Any], module: str, r: int) -> float:
    """PEFT's scaling s of one LoRA module: alpha / r, or alpha / sqrt(r) with rsLoRA
    (Kalajdzievski 2023), alpha taken per module from alpha_pattern."""
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
