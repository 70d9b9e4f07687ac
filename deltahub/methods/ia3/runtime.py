"""(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning"): learned vectors that rescale activations.

For a target linear layer y = W x + b with a learned vector l (init 1: the identity):

    attention keys / values (any non-feed-forward target):   y = l * (W x + b)
    feed-forward modules (the FFN's down projection):        y = W (l * x) + b

i.e. l rescales the output channels, or, for `feedforward_modules`, the FFN's
intermediate activations entering the layer. Exactly PEFT's `IA3Config` semantics:
`target_modules` picks the layers (suffix match on module names, or a regex) and
`feedforward_modules` (a subset; suffix match with `endswith`, or a regex) those that
scale their input. The change each adapter makes, as a site delta:

    output scaling:   d = (l - 1) * y_base
    input scaling:    d = W ((l - 1) * x)

Composition (see `deltahub.compose.blocks`): `Sum(a, b, weights=w)` adds the offsets,
l = 1 + sum_i w_i (l_i - 1); `Average` gives the weighted mean of the vectors,
l = sum_i p_i l_i. `Stack` is refused: stacking means multiplying the vectors, which
the output sites could do but the input sites cannot from the delta form; merge `a`
and activate `b` to get the product exactly. Merging is exact: W' = diag(l) W,
b' = l * b for output sites, W' = W diag(l) for input sites (`affine`).

Artifacts are PEFT's, unchanged: `adapter_config.json` with `"peft_type": "IA3"` and

    base_model.model.<module path>.ia3_l     (d_out, 1) output scaling; (1, d_in) input scaling
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.compose.inject import find_targets, get_module, is_conv1d, is_linear, linear_dims
from deltahub.errors import IncompatibleBase, InvalidArtifact, InvalidConfig, Unsupported
from deltahub.methods.affine import fold_input, fold_output, restore
from deltahub.methods.common import AdapterModule, SiteDelta
from deltahub.methods.lora import extras as ex
from deltahub.methods.lora.extras import PREFIX
from deltahub.methods.lora.layer import dequantized_weight
from deltahub.methods.lora.saved import (
    build_sites,
    factor_layer,
    fresh_extras,
    has_saved,
    outside_saved,
    saved_module_paths,
)
from deltahub.patterns import fullmatch

KEY = "ia3_l"

# PEFT's defaults (TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING).
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


def is_feedforward(config: dict[str, Any], path: str) -> bool:
    """PEFT's `_check_target_module_feedforward`: regex fullmatch, or a plain `endswith`."""
    ff = config.get("feedforward_modules")
    if not ff:
        return False
    if isinstance(ff, str):
        return fullmatch(ff, path)  # linear time: the regex comes from the artifact
    return any(path.endswith(k) for k in ff)


class IA3Layer(SiteDelta):
    """One learned vector l on one linear layer; scales its output, or its input (`feedforward`)."""

    def __init__(self, base_layer: nn.Module, feedforward: bool, vec: Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", base_layer)  # the base's, not the adapter's
        self.feedforward = feedforward
        self.ia3_l = nn.Parameter(vec)  # (d_in,) or (d_out,)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        off = (self.ia3_l - 1) * scale
        if self.feedforward:
            w = dequantized_weight(self.base_layer)  # (d_out, d_in)
            return F.linear(x * off.to(x.dtype), w.to(x.dtype))  # (..., d_out)
        return y_base * off.to(y_base.dtype)

    def single(self, base_forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        layer = self

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            vec = layer.ia3_l
            if layer.feedforward:
                return base_forward(x * vec.to(x.dtype), *args, **kwargs)
            y = base_forward(x, *args, **kwargs)
            if y.requires_grad or vec.requires_grad:
                return y * vec.to(y.dtype)
            return y.mul_(vec.to(y.dtype))

        return forward

    def merge(self) -> Any:
        if self.feedforward:
            return fold_input(self.base_layer, "", self.ia3_l.detach())
        return fold_output(self.base_layer, "", self.ia3_l.detach(), None)

    def unmerge(self, backup: Any) -> None:
        restore(self.base_layer, backup)


class IA3Adapter(AdapterModule):
    """IA3 vectors keyed by module path; PEFT's config and keys."""

    method = "ia3"
    mergeable = True
    supports = frozenset({"sum", "average", "route", "fuse"})

    def __init__(
        self,
        config: dict[str, Any],
        paths: list[str],
        layers: list[Any],
        kept: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__(config, paths, layers)
        self.kept = dict(kept or {})  # artifact tensors carried for export only
        if has_saved(layers):  # a saved head runs alone or routed per row (see LoraAdapter)
            self.supports = self.supports & frozenset({"route"})

    @staticmethod
    def _check_config(config: dict[str, Any]) -> None:
        try:
            ex.modules_to_save_of(config)
        except InvalidArtifact as e:
            raise Unsupported(str(e)) from None

    @staticmethod
    def _dtype(module: nn.Module) -> torch.dtype:
        w = module.weight
        return w.dtype if w.is_floating_point() else getattr(module, "compute_dtype", None) or torch.float32

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> IA3Adapter:
        """Fresh vectors (all ones: the identity) on `target_modules`."""
        full = default_config(base, config)
        cls._check_config(full)
        names = outside_saved(find_targets(base, full, what="IA3"), saved_module_paths(base, full))
        if not names:
            raise InvalidConfig("every target_modules match lies inside a modules_to_save module")
        if any(is_conv1d(base.get_submodule(n)) for n in names):
            full["fan_in_fan_out"] = True  # what PEFT sets for GPT-2's Conv1D
        paths, layers = [], []
        for name in names:
            module = base.get_submodule(name)
            d_in, d_out = linear_dims(module)
            ff = is_feedforward(full, name)
            vec = torch.ones(d_in if ff else d_out, dtype=cls._dtype(module), device=module.weight.device)
            paths.append(name)
            layers.append(IA3Layer(module, ff, vec))
        sites: dict[str, Any] = dict(zip(paths, layers, strict=True))
        build_sites(base, fresh_extras(base, full, set(paths)), None, "new", sites, trainable=True)
        return cls(full, list(sites), list(sites.values()))

    @classmethod
    def from_tensors(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        keys: list[str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> IA3Adapter:
        """Build from artifact tensors (ours or PEFT's); every module must exist and every shape fit."""
        cls._check_config(config)
        paths, layers = [], []
        rest = [k for k in keys if not k.endswith("." + KEY)]
        for key in keys:
            bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            if not bare.endswith("." + KEY):
                continue
            path = bare[: -len(KEY) - 1]
            module = get_module(base, path, adapter)
            if not is_linear(module):
                raise IncompatibleBase(
                    f"adapter {adapter!r}: module {path!r} is a {type(module).__name__}, not a linear layer"
                )
            d_in, d_out = linear_dims(module)
            ff = is_feedforward(config, path)
            t = get(key)
            want = (1, d_in) if ff else (d_out, 1)
            if tuple(t.shape) != want:
                raise IncompatibleBase(
                    f"adapter {adapter!r}: {path}.ia3_l is {list(t.shape)}, this base needs {list(want)} "
                    f"({'feed-forward: input' if ff else 'output'} scaling)"
                )
            vec = t.reshape(-1).to(dtype=cls._dtype(module), device=module.weight.device)
            paths.append(path)
            layers.append(IA3Layer(module, ff, vec))
        if not layers:
            raise IncompatibleBase(f"adapter {adapter!r} has no IA3 vectors")
        try:
            extras = ex.classify(config, rest, set(paths), "ia3")
        except InvalidArtifact as e:
            raise Unsupported(f"adapter {adapter!r}: {e}") from None
        sites: dict[str, Any] = dict(zip(paths, layers, strict=True))
        kept = build_sites(base, extras, get, adapter, sites)
        return cls(config, list(sites), list(sites.values()), kept)

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for path, site in zip(self.paths, self.layers, strict=True):
            layer = factor_layer(site)
            if isinstance(layer, IA3Layer):
                vec = layer.ia3_l.detach()
                out[f"{PREFIX}{path}.{KEY}"] = vec[None, :] if layer.feedforward else vec[:, None]
            saved = getattr(site, "tensors", None)
            if saved is not None:
                out.update(saved())
        out.update(self.kept)
        return out


def default_config(base: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """A complete PEFT IA3 config; target/feed-forward modules default to PEFT's per model type."""
    model_type = getattr(getattr(base, "config", None), "model_type", None) or ""
    targets, ff = config.get("target_modules"), config.get("feedforward_modules")
    if targets is None:
        if model_type not in DEFAULT_TARGETS:
            raise InvalidConfig(
                f"IA3 has no default target_modules for model type {model_type!r}; "
                "give target_modules and feedforward_modules"
            )
        targets, default_ff = DEFAULT_TARGETS[model_type]
        ff = default_ff if ff is None else ff
    ff = ff if ff is not None else []
    lists = isinstance(targets, (list, tuple, set)) and isinstance(ff, (list, tuple, set))
    if lists and not set(ff) <= set(targets):
        raise InvalidConfig(
            f"feedforward_modules {sorted(ff)} must be a subset of target_modules {sorted(targets)}"
        )
    full: dict[str, Any] = {
        "peft_type": "IA3",
        "task_type": None,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "exclude_modules": None,
        "feedforward_modules": ff if isinstance(ff, str) else sorted(ff),
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_ia3_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    full.update(
        {k: v for k, v in config.items() if k not in ("method", "target_modules", "feedforward_modules")}
    )
    return full
