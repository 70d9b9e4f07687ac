"""The bottleneck adapter's artifact schema, torch-free.

Bottleneck adapters (`"method": "bottleneck"`), adapter_config.json:

    {
      "method": "bottleneck",
      "variant": "houlsby" | "pfeiffer" | "parallel",
      "hidden_size": 768,                 # d, the model width the adapter reads and writes
      "bottleneck_size": 48,              # b; or "reduction_factor": 16 (b = d // factor)
      "non_linearity": "relu",            # relu | gelu | gelu_new | silu | swish | tanh
      "scaling": 1.0,                     # s, the output multiplier (AdaptFormer uses 0.1)
      "target_layers": null,              # list of layer indices, or null for every layer
      "base_model_type": "bert",          # informational: the architecture it was built on
      "placement_version": 2,             # 2: AdapterHub's placements; absent: 1 (see below)
      "original_ln_before": true          # serial variants only; default per variant (below)
    }

Where each variant reads and writes (`x` = the residual stream entering the sub-layer,
`h` = the sub-layer's output before its residual add, `LN` = the sub-layer's own
post-LayerNorm on BERT-style encoders, absent on pre-LN decoders; A includes `scaling`).
`placement_version: 2` is exactly AdapterHub's (`adapters` 1.3.0) `SeqBnConfig`,
`DoubleSeqBnConfig` and `ParBnConfig`:

    pfeiffer (original_ln_before true)   encoder  LN(x + h + A(LN(x + h)))   decoder  x + h + A(x + h)
    pfeiffer / houlsby (..._before false) encoder  LN(x + h + A(h))           decoder  x + h + A(h)
    parallel                             encoder  LN(x + h + A(x))           decoder  x + h + A(x)

`houlsby` has sites after attention and after the FFN, the others after the FFN only.
`original_ln_before` defaults to true for pfeiffer and false for houlsby (AdapterHub's).

`placement_version: 1` (a config without the field: every artifact published before
AdapterHub's placements were adopted) keeps computing what it computed when it was
trained: pfeiffer reads the FFN output `h` (i.e. `original_ln_before: false`), and
parallel reads the FFN module's own input, which on pre-LN decoders (GPT-2, Llama,
Qwen2) is the *normalized* stream `LN_2(x)` (He et al.'s formulation) rather than `x`;
on BERT-style encoders both versions are the same. Version 1 is loaded and re-saved
as it is, never created: `create` writes version 2.

Tensors, for each module `<site>` whose output the adapter changes:

    <site>.adapter_down.weight (b, d)   <site>.adapter_down.bias (b,)
    <site>.adapter_up.weight   (d, b)   <site>.adapter_up.bias   (d,)

A trained task head's tensors (`deltahub_head.*`) ride along and are skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TASK_HEAD_PREFIX, TensorInfo
from deltahub.methods.checks import bad, is_int, is_num

BOTTLENECK_VARIANTS = ("houlsby", "pfeiffer", "parallel")
PLACEMENT_VERSIONS = (1, 2)
CURRENT_PLACEMENT = 2
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh")
BOTTLENECK_PARTS = {
    "adapter_down.weight": 2,
    "adapter_down.bias": 1,
    "adapter_up.weight": 2,
    "adapter_up.bias": 1,
}


@dataclass
class BottleneckConfig:
    """A bottleneck adapter's config; `bottleneck_size` is resolved from the reduction factor."""

    variant: str
    hidden_size: int
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    target_layers: list[int] | None = None
    base_model_type: str | None = None
    placement_version: int = 1
    original_ln_before: bool | None = None
    method: str = "bottleneck"

    def __post_init__(self) -> None:
        if self.method != "bottleneck":
            raise bad(f"method must be 'bottleneck', got {self.method!r}")
        if self.variant not in BOTTLENECK_VARIANTS:
            raise bad(f"variant {self.variant!r} is not one of {', '.join(BOTTLENECK_VARIANTS)}")
        if not is_int(self.hidden_size) or self.hidden_size <= 0:
            raise bad(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        if self.reduction_factor is not None and (
            not is_num(self.reduction_factor) or self.reduction_factor <= 0
        ):
            raise bad(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        if self.bottleneck_size is None:
            if self.reduction_factor is None:
                raise bad("give bottleneck_size or reduction_factor")
            self.bottleneck_size = max(1, int(self.hidden_size // self.reduction_factor))
        if not is_int(self.bottleneck_size) or self.bottleneck_size <= 0:
            raise bad(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.reduction_factor is not None and self.bottleneck_size != max(
            1, int(self.hidden_size // self.reduction_factor)
        ):
            raise bad(
                f"bottleneck_size {self.bottleneck_size} disagrees with hidden_size {self.hidden_size} / "
                f"reduction_factor {self.reduction_factor}; give only one of them"
            )
        if self.non_linearity not in NON_LINEARITIES:
            raise bad(f"non_linearity {self.non_linearity!r} is not one of {', '.join(NON_LINEARITIES)}")
        if not is_num(self.scaling):
            raise bad(f"scaling must be a number, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if self.target_layers is not None and not (
            isinstance(self.target_layers, list) and all(is_int(i) and i >= 0 for i in self.target_layers)
        ):
            raise bad(f"target_layers must be a list of layer indices or null, got {self.target_layers!r}")
        if self.base_model_type is not None and not isinstance(self.base_model_type, str):
            raise bad("base_model_type must be a string or null")
        if not is_int(self.placement_version) or self.placement_version not in PLACEMENT_VERSIONS:
            raise bad(
                f"placement_version must be one of {PLACEMENT_VERSIONS}, got {self.placement_version!r}"
            )
        if self.original_ln_before is not None and not isinstance(self.original_ln_before, bool):
            raise bad(f"original_ln_before must be true, false or null, got {self.original_ln_before!r}")
        if self.variant == "parallel" and self.original_ln_before:
            raise bad("original_ln_before applies to serial adapters (houlsby, pfeiffer), not parallel")
        if self.original_ln_before and self.placement_version == 1:
            raise bad("original_ln_before needs placement_version 2")
        if self.original_ln_before is None and self.variant != "parallel":
            self.original_ln_before = self.variant == "pfeiffer" and self.placement_version >= 2

    @property
    def reads(self) -> str:
        """What the adapter reads: "output" (h), "sum" (LN(x + h) / x + h), "stream" (x), or
        "input" (the FFN module's own input: version-1 parallel adapters)."""
        if self.variant == "parallel":
            return "stream" if self.placement_version >= 2 else "input"
        return "sum" if self.original_ln_before else "output"

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BottleneckConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise bad(f"unknown bottleneck config fields {sorted(unknown)} (known: {sorted(known)})")
        try:
            return cls(**config)
        except TypeError as e:
            raise bad(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Schema, and every site's four tensors shaped (b, d), (b,), (d, b), (d,)."""
    cfg = BottleneckConfig.from_dict(config)
    d, b = cfg.hidden_size, cfg.bottleneck_size
    expected = {
        "adapter_down.weight": (b, d),
        "adapter_down.bias": (b,),
        "adapter_up.weight": (d, b),
        "adapter_up.bias": (d,),
    }
    sites: dict[str, set[str]] = {}
    for name, info in tensors.items():
        if name.startswith(TASK_HEAD_PREFIX):
            continue
        for part, shape in expected.items():
            if name.endswith("." + part):
                site = name[: -len(part) - 1]
                if info.shape != shape:
                    raise InvalidArtifact(
                        "shape-mismatch", f"{name} has shape {list(info.shape)}, expected {list(shape)}"
                    )
                sites.setdefault(site, set()).add(part)
                break
        else:
            raise InvalidArtifact(
                "config-shape", f"tensor {name!r} is not a bottleneck weight ({', '.join(expected)})"
            )
    if not sites:
        raise InvalidArtifact("config-shape", "a bottleneck artifact needs at least one adapter site")
    for site, parts in sites.items():
        if parts != set(expected):
            missing = sorted(set(expected) - parts)
            raise InvalidArtifact("shape-mismatch", f"site {site} lacks {', '.join(missing)}")
