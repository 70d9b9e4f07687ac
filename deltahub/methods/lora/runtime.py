"""LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

For a linear layer y = W x + b (W: d_out x d_in) LoRA adds a rank-r update:

    y = W x + b + s * B A x,        A: (r, d_in), B: (d_out, r)
    s = alpha / r                   (LoRA)
    s = alpha / sqrt(r)             (rsLoRA, `use_rslora`)

computed as two small matmuls through the r-dim intermediate, `((x A^T) s) B^T`, added
in place into the base output when no gradient is needed (no extra pass over y).

DoRA splits the adapted weight into a magnitude and a direction:

    W' = m * (W + s B A) / ||W + s B A||_c          (norm of each output row)
    y  = (m / n) * (W x + s B A x) + b,             n = ||W + s B A||_c, detached

exactly as PEFT computes it (n is treated as a constant, section 4.3 of the paper). We
cache n until W, A or B change (their tensor versions), so inference pays one vector
multiply per layer.

Artifacts use PEFT's key names and config unchanged:

    base_model.model.<module path>.lora_A.weight            (r, d_in)
    base_model.model.<module path>.lora_B.weight            (d_out, r)
    base_model.model.<module path>.lora_magnitude_vector    (d_out,)    DoRA only

GPT-2's `Conv1D` stores W as (d_in, d_out) (`fan_in_fan_out`); A and B keep the same
shapes as for `nn.Linear`, only merging transposes. bitsandbytes `Linear4bit` /
`Linear8bitLt` bases (QLoRA) run through the module's own forward; `dequantized_weight`
is the one place that reads their weight (DoRA norms, merging). Merging into a quantized
layer dequantizes, adds and requantizes (lossy: `deltahub.compose.quant`); the original
quantized parameter is kept, so unmerging is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.compose.inject import find_targets, get_module, is_bnb_linear, is_conv1d, is_linear, linear_dims
from deltahub.errors import IncompatibleBase, InvalidConfig, Unsupported
from deltahub.methods.common import AdapterModule, SiteDelta
from deltahub.patterns import lora_scaling, pattern_value

PREFIX = "base_model.model."
A_KEY, B_KEY, M_KEY = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"


def dequantized_weight(module: nn.Module) -> Tensor:
    """The weight of a linear layer as a dense (d_out, d_in) tensor (a view when possible)."""
    if is_conv1d(module):
        return module.weight.T
    if is_bnb_linear(module):
        from deltahub.compose.quant import dequantize_weight

        return dequantize_weight(module)  # a fresh dense tensor, (d_out, d_in)
    return module.weight


def _stored_in_out(module: nn.Module) -> bool:
    """GPT-2's Conv1D, or a quantized layer made from one (PEFT's fan_in_fan_out)."""
    return is_conv1d(module) or bool(getattr(module, "deltahub_conv1d", False))


class LoraLayer(SiteDelta):
    """LoRA (optionally DoRA) on one Linear / Conv1D of the base."""

    def __init__(
        self, base_layer: nn.Module, r: int, scaling: float, use_dora: bool, dtype: torch.dtype
    ) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base_layer)
        device = base_layer.weight.device
        # Kept out of the module tree: the base's parameters are not the adapter's.
        object.__setattr__(self, "base_layer", base_layer)
        self.r, self.scaling, self.use_dora = r, float(scaling), use_dora
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self._norm: Tensor | None = None
        self._norm_key: tuple[int, ...] = ()
        self.lora_magnitude_vector: nn.Parameter | None = None
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().clone())

    def delta_weight(self) -> Tensor:
        """s * B @ A, shaped (d_out, d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def weight_norm(self) -> Tensor:
        """||W + s B A|| per output row, detached, cached until W, A or B change."""
        p = self.base_layer.weight
        key = (
            id(p),
            p._version,
            self.lora_A._version,
            self.lora_B._version,
            id(self.lora_A),
            id(self.lora_B),
        )
        if self._norm is None or key != self._norm_key:
            # Read W only on a miss: for a quantized base that is a full dequantization.
            w = dequantized_weight(self.base_layer)
            with torch.no_grad():
                merged = w.to(self.lora_A.dtype) + self.delta_weight()
                self._norm = torch.linalg.norm(merged, dim=1).to(merged.dtype)
            self._norm_key = key
        return self._norm

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        A = self.lora_A
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        h = F.linear(x, A) * (self.scaling * scale)  # (..., r)
        lora = F.linear(h, self.lora_B)  # (..., d_out)
        if not self.use_dora:
            return lora
        g = self.lora_magnitude_vector / self.weight_norm()  # (d_out,)
        bias = self.base_layer.bias
        wx = y_base if bias is None else y_base - bias
        # (g - 1) W x + g s B A x, as PEFT; `scale` weights the whole change.
        return (g - 1) * (wx * scale) + g * lora

    def single(self, base_forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if self.use_dora:
            return super().single(base_forward)
        layer = self

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            y = base_forward(x, *args, **kwargs)
            A = layer.lora_A
            if x.dtype != A.dtype:
                x = x.to(A.dtype)
            h = F.linear(x, A)  # (..., r)
            h.mul_(layer.scaling)
            B = layer.lora_B
            if y.requires_grad or h.requires_grad or not y.is_contiguous() or y.dtype != B.dtype:
                return y + F.linear(h, B).to(y.dtype)
            # y += h B^T inside the GEMM (beta=1): no extra pass over the output.
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.t())
            return y

        return forward

    # ------------------------------------------------------------------ merging

    def _merged_weight(self, w: Tensor) -> Tensor:
        new = w.to(self.lora_A.dtype) + self.delta_weight()  # (d_out, d_in)
        if self.use_dora:
            new = (self.lora_magnitude_vector / self.weight_norm()).unsqueeze(1) * new
        return new

    @torch.no_grad()
    def merge(self) -> Any:
        """Fold into the base weight in place; return what `unmerge` needs (the old weight).

        A quantized layer is requantized (`quant.replace_weight`); its backup keeps the
        original quantized parameter and `self.merge_error` the requantization error.
        """
        if is_bnb_linear(self.base_layer):
            from deltahub.compose.quant import replace_weight

            new = self._merged_weight(dequantized_weight(self.base_layer))
            backup, self.merge_error = replace_weight(self.base_layer, new)
            return backup
        weight = self.base_layer.weight
        backup = weight.detach().clone()
        w = dequantized_weight(self.base_layer)  # (d_out, d_in) view of `weight`
        w.copy_(self._merged_weight(w).to(w.dtype))
        return backup

    @torch.no_grad()
    def unmerge(self, backup: Any) -> None:
        if is_bnb_linear(self.base_layer):
            from deltahub.compose.quant import restore_weight

            restore_weight(self.base_layer, backup)
            return
        self.base_layer.weight.copy_(backup)


class LoraAdapter(AdapterModule):
    """A LoRA adapter: `LoraLayer`s keyed by module path; PEFT's config and keys."""

    method = "lora"
    mergeable = True

    @staticmethod
    def _check_config(config: dict[str, Any]) -> None:
        if config.get("lora_bias"):
            raise Unsupported("LoRA with lora_bias=true is not supported; train it with lora_bias=false")
        if config.get("bias", "none") != "none":
            raise Unsupported(f"LoRA with bias={config.get('bias')!r} is not supported; use bias='none'")
        if config.get("modules_to_save"):
            raise Unsupported(
                f"LoRA with modules_to_save={config['modules_to_save']!r} is not supported yet; "
                "save the head separately or train it into the base"
            )

    @classmethod
    def _dtype(cls, module: nn.Module) -> torch.dtype:
        w = module.weight
        if w.is_floating_point():
            return w.dtype
        return getattr(module, "compute_dtype", None) or torch.float32

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> LoraAdapter:
        """A fresh LoRA (B = 0: the adapter starts as the identity) on `target_modules`."""
        full = default_config(config)
        cls._check_config(full)
        names = find_targets(base, full)
        if any(_stored_in_out(base.get_submodule(n)) for n in names):
            full["fan_in_fan_out"] = True  # what PEFT sets (with a warning) for GPT-2's Conv1D
        layers = []
        for name in names:
            module = base.get_submodule(name)
            r = int(pattern_value(full.get("rank_pattern"), name, full["r"]))
            layers.append(
                LoraLayer(
                    module, r, lora_scaling(full, name, r), bool(full.get("use_dora")), cls._dtype(module)
                )
            )
        return cls(full, names, layers)

    @classmethod
    def from_tensors(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        keys: list[str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> LoraAdapter:
        """Build from artifact tensors; every module must exist and every shape fit."""
        cls._check_config(config)
        modules: dict[str, dict[str, str]] = {}
        for key in keys:
            bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            for suffix in (A_KEY, B_KEY, M_KEY):
                if bare.endswith("." + suffix):
                    modules.setdefault(bare[: -len(suffix) - 1], {})[suffix] = key
                    break
            else:
                raise Unsupported(
                    f"adapter {adapter!r} has tensor {key!r}, which is not a LoRA weight "
                    "(lora_A/lora_B/lora_magnitude_vector); such extras are not supported"
                )
        use_dora = bool(config.get("use_dora"))
        paths, layers = [], []
        for path, parts in modules.items():
            module = get_module(base, path, adapter)
            if not is_linear(module):
                raise IncompatibleBase(
                    f"adapter {adapter!r}: module {path!r} is a {type(module).__name__}, not a linear layer"
                )
            if A_KEY not in parts or B_KEY not in parts:
                raise IncompatibleBase(f"adapter {adapter!r}: module {path!r} lacks lora_A or lora_B")
            A, B = get(parts[A_KEY]), get(parts[B_KEY])
            d_in, d_out = linear_dims(module)
            r = A.shape[0]
            if A.ndim != 2 or B.ndim != 2 or A.shape[1] != d_in or B.shape[0] != d_out or B.shape[1] != r:
                raise IncompatibleBase(
                    f"adapter {adapter!r}: module {path!r} is ({d_out}, {d_in}) (out, in) but the adapter has "
                    f"lora_A {list(A.shape)} and lora_B {list(B.shape)} (expected [r, {d_in}] and [{d_out}, r])"
                )
            if use_dora != (M_KEY in parts):
                raise IncompatibleBase(
                    f"adapter {adapter!r}: module {path!r} "
                    + (
                        "lacks lora_magnitude_vector but use_dora is true"
                        if use_dora
                        else "has a DoRA magnitude but use_dora is false"
                    )
                )
            layer = LoraLayer.__new__(LoraLayer)
            SiteDelta.__init__(layer)
            object.__setattr__(layer, "base_layer", module)
            dtype, device = cls._dtype(module), module.weight.device
            layer.r, layer.scaling, layer.use_dora = r, lora_scaling(config, path, r), use_dora
            layer.lora_A = nn.Parameter(A.to(dtype=dtype, device=device), requires_grad=False)
            layer.lora_B = nn.Parameter(B.to(dtype=dtype, device=device), requires_grad=False)
            layer.lora_magnitude_vector = None
            if use_dora:
                m = get(parts[M_KEY])
                if tuple(m.shape) != (d_out,):
                    raise IncompatibleBase(
                        f"adapter {adapter!r}: module {path!r} has {d_out} outputs but the DoRA magnitude "
                        f"is {list(m.shape)}"
                    )
                layer.lora_magnitude_vector = nn.Parameter(
                    m.to(dtype=dtype, device=device), requires_grad=False
                )
            layer._norm, layer._norm_key = None, ()
            paths.append(path)
            layers.append(layer)
        if not layers:
            raise IncompatibleBase(f"adapter {adapter!r} has no LoRA weights")
        return cls(config, paths, layers)

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for path, layer in zip(self.paths, self.layers, strict=True):
            out[f"{PREFIX}{path}.{A_KEY}"] = layer.lora_A.detach()
            out[f"{PREFIX}{path}.{B_KEY}"] = layer.lora_B.detach()
            if layer.lora_magnitude_vector is not None:
                out[f"{PREFIX}{path}.{M_KEY}"] = layer.lora_magnitude_vector.detach()
        return out


def default_config(config: dict[str, Any]) -> dict[str, Any]:
    """A complete PEFT LoRA config from the fields a user gives (r, lora_alpha, target_modules...)."""
    if "target_modules" not in config:
        raise InvalidConfig(
            "a LoRA config needs target_modules (a list of module names, a regex, or 'all-linear')"
        )
    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidConfig(f"LoRA rank r must be a positive integer, got {r!r}")
    tm = config["target_modules"]
    full: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": config.get("lora_alpha", r),
        "lora_dropout": 0.0,
        "target_modules": tm if isinstance(tm, str) else sorted(tm),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    full.update({k: v for k, v in config.items() if k not in ("method", "target_modules")})
    return full
