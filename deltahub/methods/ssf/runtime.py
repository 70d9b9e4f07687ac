"""SSF (Lian et al., 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient
Model Tuning"): a learned per-channel scale and shift after each operation.

At every target module (the attention and FFN linear layers, and the layer norms) the
output is rescaled and shifted, with gamma init 1 and beta init 0 (the identity):

    y' = gamma * y + beta            site delta: d = (gamma - 1) * y_cur + beta

Because y is the output of a linear layer (W x + b) or of a norm (w * n(x) + b), the map
folds exactly into that module: W' = diag(gamma) W, b' = gamma * b + beta, or w' =
gamma * w, b' = gamma * b + beta (the paper's re-parameterization into the adjacent
layer; `affine`). An RMSNorm has no bias, so on one SSF learns the scale only and stays
exactly mergeable.

The delta reads the running output `y_cur`, so `Stack(a, b)` composes the affine maps,
gamma_b (gamma_a y + beta_a) + beta_b. `Sum(a, b, weights=w)`: y + sum_i w_i ((gamma_i -
1) y + beta_i); `Average`: the averaged map, (sum_i p_i gamma_i) y + sum_i p_i beta_i.

adapter_config.json: {"method": "ssf", "target_modules": "all-linear" | [...] | regex,
"include_norms": true, "base_model_type": "llama"}; tensors per site `<path>.ssf_scale`
(d,) and, except on RMSNorms, `<path>.ssf_shift` (d,).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.compose.inject import ALL_LINEAR, find_targets, get_module, head_names, is_linear
from deltahub.errors import IncompatibleBase, InvalidConfig, Unsupported
from deltahub.methods.affine import fold_output, is_norm, out_features, restore
from deltahub.methods.common import AdapterModule, SiteDelta

SCALE, SHIFT = "ssf_scale", "ssf_shift"


def _shiftable(module: nn.Module) -> bool:
    """A shift folds into linear layers and LayerNorms, not into a bias-free RMSNorm."""
    return (
        is_linear(module)
        or isinstance(module, nn.LayerNorm)
        or isinstance(getattr(module, "bias", None), Tensor)
    )


class SSFLayer(SiteDelta):
    """gamma * y + beta on one module's output."""

    sequential = True  # reads y_cur: stacked SSFs compose

    def __init__(self, module: nn.Module, gamma: Tensor, beta: Tensor | None) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", module)
        self.ssf_scale = nn.Parameter(gamma)  # (d,)
        self.ssf_shift = None if beta is None else nn.Parameter(beta)  # (d,)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        d = y_cur * ((self.ssf_scale - 1) * scale).to(y_cur.dtype)
        if self.ssf_shift is not None:
            d = d + (self.ssf_shift * scale).to(y_cur.dtype)
        return d

    def single(self, base_forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        layer = self

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            y = base_forward(x, *args, **kwargs)
            g = layer.ssf_scale.to(y.dtype)
            if layer.ssf_shift is None:
                return y * g
            return torch.addcmul(layer.ssf_shift.to(y.dtype), y, g)  # beta + y * gamma

        return forward

    def merge(self) -> Any:
        beta = None if self.ssf_shift is None else self.ssf_shift.detach()
        return fold_output(self.base_layer, "", self.ssf_scale.detach(), beta)

    def unmerge(self, backup: Any) -> None:
        restore(self.base_layer, backup)


class SSFAdapter(AdapterModule):
    """Scale-and-shift vectors keyed by module path."""

    method = "ssf"
    mergeable = True
    supports = frozenset({"stack", "sum", "average", "route"})

    @staticmethod
    def _sites(base: nn.Module, config: dict[str, Any]) -> list[str]:
        names = find_targets(base, {"target_modules": config["target_modules"]})
        if config["include_norms"]:
            heads = head_names(base)
            names += [n for n, m in base.named_modules() if n and n not in heads and is_norm(m)]
        order = {n: i for i, (n, _) in enumerate(base.named_modules())}
        return sorted(set(names), key=order.__getitem__)

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> SSFAdapter:
        """gamma = 1, beta = 0 (the identity) after every target linear layer and norm."""
        known = {"method", "target_modules", "include_norms"}
        unknown = set(config) - known
        if unknown:
            raise InvalidConfig(
                f"unknown ssf config fields {sorted(unknown)} (known: {sorted(known - {'method'})})"
            )
        full = {
            "method": "ssf",
            "target_modules": config.get("target_modules") or ALL_LINEAR,
            "include_norms": bool(config.get("include_norms", True)),
            "base_model_type": getattr(getattr(base, "config", None), "model_type", None),
        }
        paths, layers = cls._sites(base, full), []
        for p in paths:
            m = base.get_submodule(p)
            d, kw = out_features(m), {"dtype": m.weight.dtype, "device": m.weight.device}
            layers.append(SSFLayer(m, torch.ones(d, **kw), torch.zeros(d, **kw) if _shiftable(m) else None))
        return cls(full, paths, layers)

    @classmethod
    def from_tensors(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        keys: list[str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> SSFAdapter:
        parts: dict[str, dict[str, str]] = {}
        for key in keys:
            for part in (SCALE, SHIFT):
                if key.endswith("." + part):
                    parts.setdefault(key[: -len(part) - 1], {})[part] = key
                    break
            else:
                raise Unsupported(f"adapter {adapter!r} has tensor {key!r}, which is not an SSF vector")
        paths, layers = [], []
        for path, got in parts.items():
            m = get_module(base, path, adapter)
            if SCALE not in got:
                raise IncompatibleBase(f"adapter {adapter!r}: {path!r} has a shift but no {SCALE}")
            if SHIFT in got and not _shiftable(m):
                raise IncompatibleBase(
                    f"adapter {adapter!r}: {path!r} ({type(m).__name__}) cannot take a shift"
                )
            d = out_features(m)
            ts = {k: get(v) for k, v in got.items()}
            for k, t in ts.items():
                if tuple(t.shape) != (d,):
                    raise IncompatibleBase(
                        f"adapter {adapter!r}: {path}.{k} is {list(t.shape)}, the base needs [{d}]"
                    )
            kw = {"dtype": m.weight.dtype, "device": m.weight.device}
            shift = ts[SHIFT].to(**kw) if SHIFT in ts else None
            paths.append(path)
            layers.append(SSFLayer(m, ts[SCALE].to(**kw), shift))
        if not layers:
            raise IncompatibleBase(f"adapter {adapter!r} has no SSF vectors")
        return cls(config, paths, layers)

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for p, layer in zip(self.paths, self.layers, strict=True):
            out[f"{p}.{SCALE}"] = layer.ssf_scale.detach()
            if layer.ssf_shift is not None:
                out[f"{p}.{SHIFT}"] = layer.ssf_shift.detach()
        return out
