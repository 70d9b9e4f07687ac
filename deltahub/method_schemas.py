"""Config schemas of the non-PEFT methods (bottleneck adapters, fusion, ...).

Torch-free, so the registry can validate any artifact without model code. Each method
registers one checker with `artifact.register_config_checker`.

Bottleneck adapters (`"method": "bottleneck"`), adapter_config.json:

    {
      "method": "bottleneck",
      "variant": "houlsby" | "pfeiffer" | "parallel",
      "hidden_size": 768,                 # d, the model width the adapter reads and writes
      "bottleneck_size": 48,              # b; or "reduction_factor": 16 (b = d // factor)
      "non_linearity": "relu",            # relu | gelu | gelu_new | silu | swish | tanh
      "scaling": 1.0,                     # s, the output multiplier (AdaptFormer uses 0.1)
      "target_layers": null,              # list of layer indices, or null for every layer
      "base_model_type": "bert"           # informational: the architecture it was built on
    }

Tensors, for each module `<site>` whose output the adapter changes:

    <site>.adapter_down.weight (b, d)   <site>.adapter_down.bias (b,)
    <site>.adapter_up.weight   (d, b)   <site>.adapter_up.bias   (d,)

AdapterFusion (`"method": "fusion"`, see `deltahub.fusion.layer`), adapter_config.json:

    {
      "method": "fusion",
      "adapters": ["sentiment", "topic"],   # the constituents' names (pinned by digest in
                                            # the manifest's parents, role "constituent")
      "temperature": 1.0                    # T in softmax(q . k / T)
    }

Tensors, for each fused module `<site>` of width d:

    <site>.fusion_query.weight (d, d)   <site>.fusion_query.bias (d,)
    <site>.fusion_key.weight   (d, d)   <site>.fusion_value.weight (d, d)

Any method's artifact may also carry a trained task head (a classifier over the base's
hidden states, see `deltahub.fusion.head`) as tensors named `deltahub_head.<param>`;
method checkers and loaders skip them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from deltahub import artifact as af
from deltahub.artifact import TensorInfo, register_config_checker
from deltahub.errors import InvalidArtifact

BOTTLENECK_VARIANTS = ("houlsby", "pfeiffer", "parallel")
HEAD_PREFIX = af.TASK_HEAD_PREFIX  # task-head tensors stored beside any method's weights
NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "swish", "tanh")
BOTTLENECK_PARTS = {
    "adapter_down.weight": 2,
    "adapter_down.bias": 1,
    "adapter_up.weight": 2,
    "adapter_up.bias": 1,
}


def _bad(msg: str) -> InvalidArtifact:
    return InvalidArtifact("config-schema", msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
    method: str = "bottleneck"

    def __post_init__(self) -> None:
        if self.method != "bottleneck":
            raise _bad(f"method must be 'bottleneck', got {self.method!r}")
        if self.variant not in BOTTLENECK_VARIANTS:
            raise _bad(f"variant {self.variant!r} is not one of {', '.join(BOTTLENECK_VARIANTS)}")
        if not _is_int(self.hidden_size) or self.hidden_size <= 0:
            raise _bad(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        if self.reduction_factor is not None and (
            not _is_num(self.reduction_factor) or self.reduction_factor <= 0
        ):
            raise _bad(f"reduction_factor must be a positive number, got {self.reduction_factor!r}")
        if self.bottleneck_size is None:
            if self.reduction_factor is None:
                raise _bad("give bottleneck_size or reduction_factor")
            self.bottleneck_size = max(1, int(self.hidden_size // self.reduction_factor))
        if not _is_int(self.bottleneck_size) or self.bottleneck_size <= 0:
            raise _bad(f"bottleneck_size must be a positive integer, got {self.bottleneck_size!r}")
        if self.reduction_factor is not None and self.bottleneck_size != max(
            1, int(self.hidden_size // self.reduction_factor)
        ):
            raise _bad(
                f"bottleneck_size {self.bottleneck_size} disagrees with hidden_size {self.hidden_size} / "
                f"reduction_factor {self.reduction_factor}; give only one of them"
            )
        if self.non_linearity not in NON_LINEARITIES:
            raise _bad(f"non_linearity {self.non_linearity!r} is not one of {', '.join(NON_LINEARITIES)}")
        if not _is_num(self.scaling):
            raise _bad(f"scaling must be a number, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if self.target_layers is not None and not (
            isinstance(self.target_layers, list) and all(_is_int(i) and i >= 0 for i in self.target_layers)
        ):
            raise _bad(f"target_layers must be a list of layer indices or null, got {self.target_layers!r}")
        if self.base_model_type is not None and not isinstance(self.base_model_type, str):
            raise _bad("base_model_type must be a string or null")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> BottleneckConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise _bad(f"unknown bottleneck config fields {sorted(unknown)} (known: {sorted(known)})")
        try:
            return cls(**config)
        except TypeError as e:
            raise _bad(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_bottleneck_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
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
        if name.startswith(HEAD_PREFIX):
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


register_config_checker("bottleneck", check_bottleneck_config)


# --------------------------------------------------------------------------- fusion

FUSION_PARTS = ("fusion_query.weight", "fusion_query.bias", "fusion_key.weight", "fusion_value.weight")


@dataclass
class FusionConfig:
    """An AdapterFusion's config: which adapters it attends over, and the temperature."""

    adapters: list[str]
    temperature: float = 1.0
    method: str = "fusion"

    def __post_init__(self) -> None:
        if self.method != "fusion":
            raise _bad(f"method must be 'fusion', got {self.method!r}")
        if (
            not isinstance(self.adapters, list)
            or not self.adapters
            or not all(isinstance(a, str) and a for a in self.adapters)
        ):
            raise _bad(f"adapters must be a non-empty list of adapter names, got {self.adapters!r}")
        if len(set(self.adapters)) != len(self.adapters):
            raise _bad(f"adapters lists a name twice: {self.adapters!r}")
        if not _is_num(self.temperature) or self.temperature <= 0:
            raise _bad(f"temperature must be a positive number, got {self.temperature!r}")
        self.temperature = float(self.temperature)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> FusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise _bad(f"unknown fusion config fields {sorted(unknown)} (known: {sorted(known)})")
        try:
            return cls(**config)
        except TypeError as e:
            raise _bad(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_fusion_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Schema, and every site's Q (d, d) + bias (d,), K (d, d), V (d, d) with one d per site."""
    FusionConfig.from_dict(config)
    sites: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in tensors.items():
        if name.startswith(HEAD_PREFIX):
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


register_config_checker("fusion", check_fusion_config)


# --------------------------------------------------------------------------- IA3 (PEFT)
#
# PEFT's IA3 format unchanged: {"peft_type": "IA3", "target_modules": [...] | regex,
# "feedforward_modules": [...] | regex | null, ...} and one tensor per module,
# `base_model.model.<module>.ia3_l`, shaped (d_out, 1) (output scaling) or (1, d_in)
# (feed-forward modules: input scaling).


def _str_or_list(config: dict[str, Any], key: str, required: bool) -> None:
    value = config.get(key)
    if value is None and not required:
        return
    if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
        raise _bad(f"{key} must be a module name list or a regex, got {value!r}")


def check_ia3_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Field types, and every tensor an `ia3_l` vector shaped (n, 1) or (1, n)."""
    _str_or_list(config, "target_modules", required=True)
    _str_or_list(config, "feedforward_modules", required=False)
    if "fan_in_fan_out" in config and not isinstance(config["fan_in_fan_out"], bool):
        raise _bad("fan_in_fan_out must be true or false")
    found = 0
    for name, info in tensors.items():
        if name.startswith(HEAD_PREFIX):
            continue
        if not name.endswith(".ia3_l"):
            raise InvalidArtifact("config-shape", f"tensor {name!r} is not an IA3 vector (<module>.ia3_l)")
        if len(info.shape) != 2 or 1 not in info.shape or min(info.shape) < 1:
            raise InvalidArtifact(
                "shape-mismatch", f"{name} has shape {list(info.shape)}, expected (n, 1) or (1, n)"
            )
        found += 1
    if not found:
        raise InvalidArtifact("config-shape", "an IA3 artifact needs at least one ia3_l vector")


register_config_checker("ia3", check_ia3_config)


# --------------------------------------------------------------------------- BitFit, SSF
#
# BitFit: {"method": "bitfit", "target_modules": [...] | regex | "all-linear" | null,
# "base_model_type": str | null}; tensors `<module>.bitfit_bias` (d,), the bias changes.
# SSF: {"method": "ssf", "target_modules": ..., "include_norms": bool, "base_model_type": ...};
# tensors `<module>.ssf_scale` (d,) and optionally `<module>.ssf_shift` (d,).


def _check_known(config: dict[str, Any], known: set[str], method: str) -> None:
    unknown = set(config) - known
    if unknown:
        raise _bad(f"unknown {method} config fields {sorted(unknown)} (known: {sorted(known)})")
    if config.get("base_model_type") is not None and not isinstance(config["base_model_type"], str):
        raise _bad("base_model_type must be a string or null")


def check_bitfit_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Schema, and every tensor a 1-D `bitfit_bias`."""
    _check_known(config, {"method", "target_modules", "base_model_type"}, "bitfit")
    _str_or_list(config, "target_modules", required=False)
    names = [n for n in tensors if not n.startswith(HEAD_PREFIX)]
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


def check_ssf_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Schema, and per module a (d,) scale and at most one (d,) shift of the same size."""
    _check_known(config, {"method", "target_modules", "include_norms", "base_model_type"}, "ssf")
    _str_or_list(config, "target_modules", required=False)
    if "include_norms" in config and not isinstance(config["include_norms"], bool):
        raise _bad("include_norms must be true or false")
    sites: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, info in tensors.items():
        if name.startswith(HEAD_PREFIX):
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


register_config_checker("bitfit", check_bitfit_config)
register_config_checker("ssf", check_ssf_config)


# --------------------------------------------------------------------------- prompt / prefix (PEFT)
#
# PEFT's formats unchanged: {"peft_type": "PROMPT_TUNING" | "PREFIX_TUNING",
# "num_virtual_tokens": k, "token_dim": d, "num_layers": L, ...} and one tensor
# `prompt_embeddings`: (k, d) for prompt tuning, (k, L * 2 * token_dim) for prefix tuning
# (token_dim is the key/value width; the MLP of `prefix_projection` is never stored).


def _check_virtual_tokens(config: dict[str, Any], tensors: dict[str, TensorInfo], prefix: bool) -> None:
    k = config.get("num_virtual_tokens")
    if not _is_int(k) or k <= 0:
        raise _bad(f"num_virtual_tokens must be a positive integer, got {k!r}")
    names = [n for n in tensors if not n.startswith(HEAD_PREFIX)]
    if names != ["prompt_embeddings"]:
        raise InvalidArtifact("config-shape", f"expected exactly one tensor 'prompt_embeddings', got {names}")
    shape = tensors["prompt_embeddings"].shape
    subs = config.get("num_transformer_submodules") or 1
    if len(shape) != 2 or shape[0] != k * subs:
        raise InvalidArtifact(
            "shape-mismatch", f"prompt_embeddings has shape {list(shape)}, expected [{k}, ...]"
        )
    width = config.get("token_dim")
    if prefix:
        if config.get("prefix_projection"):
            raise _bad(
                "prefix_projection artifacts (with the MLP) are not supported; store the computed prefixes"
            )
        layers = config.get("num_layers")
        if _is_int(layers) and _is_int(width) and shape[1] != layers * 2 * width:
            raise InvalidArtifact(
                "shape-mismatch",
                f"prompt_embeddings has width {shape[1]}, expected num_layers * 2 * token_dim",
            )
    elif _is_int(width) and shape[1] != width:
        raise InvalidArtifact(
            "shape-mismatch", f"prompt_embeddings has width {shape[1]}, token_dim is {width}"
        )


register_config_checker("prompt_tuning", lambda c, t: _check_virtual_tokens(c, t, prefix=False))
register_config_checker("prefix_tuning", lambda c, t: _check_virtual_tokens(c, t, prefix=True))
