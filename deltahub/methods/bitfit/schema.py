"""BitFit's artifact schema, torch-free.

adapter_config.json: `{"method": "bitfit", "target_modules": [...] | regex | "all-linear" | null,
"base_model_type": str | null}`; tensors `<module>.bitfit_bias` (d,), the bias changes.
"""

from __future__ import annotations

from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TASK_HEAD_PREFIX, TensorInfo
from deltahub.methods.checks import check_known, str_or_list


def check_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Schema, and every tensor a 1-D `bitfit_bias`."""
    check_known(config, {"method", "target_modules", "base_model_type"}, "bitfit")
    str_or_list(config, "target_modules", required=False)
    names = [n for n in tensors if not n.startswith(TASK_HEAD_PREFIX)]
    if not names:
        raise InvalidArtifact("config-shape", "a BitFit artifact needs at least one bias")
    for name in names:
        if not name.endswith(".bitfit_bias"):
            raise InvalidArtifact(
                "config-shape", f"tensor {name!r} is not a BitFit bias (<module>.bitfit_bias)"
            )
        if len(tensors[name].shape) != 1:
            raise InvalidArtifact(
                "shape-mismatch", f"{name} has shape {list(tensors[name].shape)}, expected (d,)"
            )
