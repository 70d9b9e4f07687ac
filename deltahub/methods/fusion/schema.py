"""AdapterFusion's artifact schema (the layer: `deltahub.fusion.layer`), torch-free.

AdapterFusion (`"method": "fusion"`), adapter_config.json:

    {
      "method": "fusion",
      "adapters": ["sentiment", "topic"],   # the constituents' names (pinned by digest in
                                            # the manifest's parents, role "constituent")
      "temperature": 1.0,                   # T in softmax(q . k / T)
      "scope": "layer"                      # "layer": Q, K, V per transformer layer;
                                            # "module" (the default when absent, as
                                            # fusions made before scopes): per fused module
    }

Tensors, for each fused module `<site>` of width d ("module"), or each transformer layer
`<site>` (`encoder.layer.3`) of hidden size d ("layer"):

    <site>.fusion_query.weight (d, d)   <site>.fusion_query.bias (d,)
    <site>.fusion_key.weight   (d, d)   <site>.fusion_value.weight (d, d)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TASK_HEAD_PREFIX, TensorInfo
from deltahub.methods.checks import bad, is_num

FUSION_PARTS = ("fusion_query.weight", "fusion_query.bias", "fusion_key.weight", "fusion_value.weight")
SCOPES = ("layer", "module")


@dataclass
class FusionConfig:
    """An AdapterFusion's config: which adapters it attends over, and the temperature."""

    adapters: list[str]
    temperature: float = 1.0
    method: str = "fusion"
    scope: str = "module"

    def __post_init__(self) -> None:
        if self.method != "fusion":
            raise bad(f"method must be 'fusion', got {self.method!r}")
        if (
            not isinstance(self.adapters, list)
            or not self.adapters
            or not all(isinstance(a, str) and a for a in self.adapters)
        ):
            raise bad(f"adapters must be a non-empty list of adapter names, got {self.adapters!r}")
        if len(set(self.adapters)) != len(self.adapters):
            raise bad(f"adapters lists a name twice: {self.adapters!r}")
        if not is_num(self.temperature) or self.temperature <= 0:
            raise bad(f"temperature must be a positive number, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if self.scope not in SCOPES:
            raise bad(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> FusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise bad(f"unknown fusion config fields {sorted(unknown)} (known: {sorted(known)})")
        try:
            return cls(**config)
        except TypeError as e:
            raise bad(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Schema, and every site's Q (d, d) + bias (d,), K (d, d), V (d, d) with one d per site."""
    FusionConfig.from_dict(config)
    sites: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in tensors.items():
        if name.startswith(TASK_HEAD_PREFIX):
            continue
        part = next((p for p in FUSION_PARTS if name.endswith("." + p)), None)
        if part is None:
            raise InvalidArtifact(
                "config-shape", f"tensor {name!r} is not a fusion weight ({', '.join(FUSION_PARTS)})"
            )
        sites.setdefault(name[: -len(part) - 1], {})[part] = info.shape
    if not sites:
        raise InvalidArtifact("config-shape", "a fusion artifact needs at least one fused site")
    for site, parts in sites.items():
        missing = sorted(set(FUSION_PARTS) - set(parts))
        if missing:
            raise InvalidArtifact("shape-mismatch", f"fusion site {site} lacks {', '.join(missing)}")
        d = parts["fusion_query.bias"][0] if len(parts["fusion_query.bias"]) == 1 else -1
        for part, shape in parts.items():
            want = (d,) if part.endswith("bias") else (d, d)
            if d <= 0 or shape != want:
                raise InvalidArtifact(
                    "shape-mismatch", f"{site}.{part} has shape {list(shape)}, expected {list(want)}"
                )
