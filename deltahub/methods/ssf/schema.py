"""SSF's artifact schema, torch-free.

adapter_config.json: `{"method": "ssf", "target_modules": ..., "include_norms": bool,
"base_model_type": ...}`; tensors `<module>.ssf_scale` (d,) and optionally `<module>.ssf_shift` (d,).
"""

from __future__ import annotations

from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TASK_HEAD_PREFIX, TensorInfo
from deltahub.methods.checks import bad, check_known, str_or_list


def check_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Schema, and per module a (d,) scale and at most one (d,) shift of the same size."""
    check_known(config, {"method", "target_modules", "include_norms", "base_model_type"}, "ssf")
    str_or_list(config, "target_modules", required=False)
    if "include_norms" in config and not isinstance(config["include_norms"], bool):
        raise bad("include_norms must be true or false")
    sites: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in tensors.items():
        if name.startswith(TASK_HEAD_PREFIX):
            continue
        part = next((p for p in ("ssf_scale", "ssf_shift") if name.endswith("." + p)), None)
        if part is None:
            raise InvalidArtifact(
                "config-shape", f"tensor {name!r} is not an SSF vector (ssf_scale, ssf_shift)"
            )
        if len(info.shape) != 1:
            raise InvalidArtifact("shape-mismatch", f"{name} has shape {list(info.shape)}, expected (d,)")
        sites.setdefault(name[: -len(part) - 1], {})[part] = info.shape
    if not sites:
        raise InvalidArtifact("config-shape", "an SSF artifact needs at least one site")
    for site, parts in sites.items():
        if "ssf_scale" not in parts:
            raise InvalidArtifact("shape-mismatch", f"SSF site {site} lacks ssf_scale")
        if len(set(parts.values())) != 1:
            raise InvalidArtifact("shape-mismatch", f"SSF site {site}: scale and shift differ in size")
