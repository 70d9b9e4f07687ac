"""BitFit (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): train only the bias terms.

For every target module (a linear layer or a LayerNorm) with output y = f(x) + b the
adapter learns a change db of its bias (init 0: the identity):

    y = f(x) + b + db          site delta: d = db (broadcast over the batch)

The artifact stores db, and only for the modules whose bias changed, so a BitFit
artifact is the list of biases training moved. A base without biases (Llama) gets new
ones on the target linear layers (`target_modules`, default every linear layer but the
head), which is BitFit's natural extension there. Merging adds db into the bias (a
missing bias is created, and removed again on unmerge): exact.

Composition: `Sum(a, b, weights=w)`: b0 + sum_i w_i db_i; `Average`: b0 + sum_i p_i db_i;
`Stack`: shifts commute, so it equals `Sum` with weights 1.

adapter_config.json: {"method": "bitfit", "target_modules": [...] | regex | "all-linear" | null,
"base_model_type": "bert"}; tensors: `<module path>.bitfit_bias` (d_out,) = db.
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

KEY = "bitfit_bias"


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), Tensor)


def _float_dtype(module: nn.Module) -> torch.dtype:
    w = getattr(module, "weight", None)
    return w.dtype if isinstance(w, Tensor) and w.is_floating_point() else torch.float32


class BitFitLayer(SiteDelta):
    """A learned change of one module's bias."""

    def __init__(self, module: nn.Module, db: Tensor) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", module)
        self.bitfit_bias = nn.Parameter(db)  # (d_out,)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        return (self.bitfit_bias * scale).to(y_base.dtype).expand_as(y_base)

    def single(self, base_forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        layer = self

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            y = base_forward(x, *args, **kwargs)
            db = layer.bitfit_bias.to(y.dtype)
            return y + db if y.requires_grad or db.requires_grad else y.add_(db)

        return forward

    def merge(self) -> Any:
        return fold_output(self.base_layer, "", None, self.bitfit_bias.detach())

    def unmerge(self, backup: Any) -> None:
        restore(self.base_layer, backup)


class BitFitAdapter(AdapterModule):
    """Bias changes keyed by module path."""

    method = "bitfit"
    mergeable = True
    supports = frozenset({"stack", "sum", "average", "route"})

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> BitFitAdapter:
        """Zero bias changes (the identity) on the target modules."""
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        full = {
            "method": "bitfit",
            "target_modules": config.get("target_modules"),
            "base_model_type": model_type,
        }
        unknown = set(config) - set(full)
        if unknown:
            raise InvalidConfig(f"unknown bitfit config fields {sorted(unknown)} (known: target_modules)")
        tm = full["target_modules"]
        if tm is None:
            heads = head_names(base)
            names = [
                n
                for n, m in base.named_modules()
                if n and n not in heads and (is_linear(m) or isinstance(m, nn.LayerNorm)) and _has_bias(m)
            ]
            if not names:  # a bias-free base (Llama): new biases on every linear layer
                names = find_targets(base, {"target_modules": ALL_LINEAR})
        else:
            names = find_targets(base, full, accept=lambda m: is_linear(m) or isinstance(m, nn.LayerNorm))
        layers = []
        for n in names:
            m = base.get_submodule(n)
            layers.append(
                BitFitLayer(m, torch.zeros(out_features(m), dtype=_float_dtype(m), device=m.weight.device))
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
    ) -> BitFitAdapter:
        paths, layers = [], []
        for key in keys:
            if not key.endswith("." + KEY):
                raise Unsupported(
                    f"adapter {adapter!r} has tensor {key!r}, which is not a BitFit bias ({KEY})"
                )
            path = key[: -len(KEY) - 1]
            m = get_module(base, path, adapter)
            if not (is_linear(m) or is_norm(m)):
                raise IncompatibleBase(
                    f"adapter {adapter!r}: {path!r} is a {type(m).__name__}, which has no bias"
                )
            t = get(key)
            if tuple(t.shape) != (out_features(m),):
                raise IncompatibleBase(
                    f"adapter {adapter!r}: {key} is {list(t.shape)}, the base module has {out_features(m)} outputs"
                )
            paths.append(path)
            layers.append(BitFitLayer(m, t.to(dtype=_float_dtype(m), device=m.weight.device)))
        if not layers:
            raise IncompatibleBase(f"adapter {adapter!r} has no BitFit biases")
        return cls(config, paths, layers)

    def tensors(self) -> dict[str, Tensor]:
        """Only the biases that changed (at least one, so the artifact is never empty)."""
        out = {
            f"{p}.{KEY}": layer.bitfit_bias.detach()
            for p, layer in zip(self.paths, self.layers, strict=True)
            if bool(layer.bitfit_bias.ne(0).any())
        }
        if not out:
            out[f"{self.paths[0]}.{KEY}"] = self.layers[0].bitfit_bias.detach()
        return out
