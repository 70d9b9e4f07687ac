"""The LoRA adapter: its config (PEFT's `LoraConfig`), creation and artifact tensors.

The layer math is in `lora.layer` (linear layers) and `lora.embedding`. Artifacts use
PEFT's key names and config unchanged:

    base_model.model.<module path>.lora_A.weight            (r, d_in)
    base_model.model.<module path>.lora_B.weight            (d_out, r)
    base_model.model.<module path>.lora_magnitude_vector    (d_out,)    DoRA only
    base_model.model.<module path>.lora_B.bias              (d_out,)    lora_bias: (B A x + b) s
    base_model.model.<embedding>.lora_embedding_A / _B      (r, V), (d, r)   (`lora.embedding`)

plus what PEFT saves beside them (`modules_to_save` heads, `bias="all" | "lora_only"`,
saved embedding weights: `lora.extras`, run by `lora.saved` while the adapter is active).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.compose.inject import find_targets, get_module, is_linear, linear_dims
from deltahub.errors import IncompatibleBase, InvalidArtifact, InvalidConfig, Unsupported
from deltahub.methods.common import AdapterModule, SiteDelta
from deltahub.methods.lora import extras as ex
from deltahub.methods.lora.embedding import LoraEmbedding, is_embedding
from deltahub.methods.lora.layer import LoraLayer, _stored_in_out, dequantized_weight
from deltahub.methods.lora.saved import (
    build_sites,
    factor_layer,
    fresh_extras,
    has_saved,
    outside_saved,
    saved_module_paths,
)
from deltahub.methods.lora.schema import unsupported_option
from deltahub.patterns import lora_scaling, pattern_value

__all__ = [
    "PREFIX",
    "LoraAdapter",
    "LoraEmbedding",
    "LoraLayer",
    "default_config",
    "dequantized_weight",
    "lora_target",
]

PREFIX = "base_model.model."
A_KEY, B_KEY, M_KEY = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
BB_KEY = "lora_B.bias"  # lora_bias
EA_KEY, EB_KEY = "lora_embedding_A", "lora_embedding_B"
FACTOR_KEYS = (A_KEY, B_KEY, M_KEY, BB_KEY, EA_KEY, EB_KEY)


def lora_target(module: nn.Module) -> bool:
    """What LoRA adapts: linear layers (Linear, Conv1D, bitsandbytes) and embeddings."""
    return is_linear(module) or is_embedding(module)


class LoraAdapter(AdapterModule):
    """A LoRA adapter: `LoraLayer`s / `LoraEmbedding`s keyed by module path, plus what the
    artifact saves besides (`modules_to_save`, biases, embedding weights:
    `deltahub.methods.lora.saved`); PEFT's config and keys."""

    method = "lora"
    mergeable = True

    def __init__(
        self,
        config: dict[str, Any],
        paths: list[str],
        layers: list[SiteDelta],
        kept: dict[str, Tensor] | None = None,
    ) -> None:
        super().__init__(config, paths, layers)
        self.kept = dict(kept or {})  # artifact tensors carried for export only
        if has_saved(layers):
            # A saved head or bias replaces the base's: it has no meaning summed or stacked
            # with another adapter's, only alone or routed per row.
            self.supports = self.supports & frozenset({"route"})
        if any(getattr(layer, "lora_B_bias", None) is not None for layer in layers):
            # AdapterFusion folds LoRA as x A^T (s B)^T, with no place for a lora_B bias.
            self.supports = self.supports - {"fuse"}

    @staticmethod
    def _check_config(config: dict[str, Any]) -> None:
        problem = unsupported_option(config)
        if problem:
            raise Unsupported(problem)

    @classmethod
    def _dtype(cls, module: nn.Module) -> torch.dtype:
        w = module.weight
        if w.is_floating_point():
            return w.dtype
        return getattr(module, "compute_dtype", None) or torch.float32

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> LoraAdapter:
        """A fresh LoRA (B = 0: the adapter starts as the identity) on `target_modules`,
        with trainable copies of `modules_to_save` and of the biases `bias` names."""
        full = default_config(config)
        cls._check_config(full)
        names = outside_saved(
            find_targets(base, full, accept=lora_target, what="LoRA"), saved_module_paths(base, full)
        )
        if not names:
            raise InvalidConfig("every target_modules match lies inside a modules_to_save module")
        if any(_stored_in_out(base.get_submodule(n)) for n in names):
            full["fan_in_fan_out"] = True  # what PEFT sets (with a warning) for GPT-2's Conv1D
        sites: dict[str, SiteDelta] = {}
        for name in names:
            module = base.get_submodule(name)
            r = int(pattern_value(full.get("rank_pattern"), name, full["r"]))
            scaling = lora_scaling(full, name, r)
            if is_embedding(module):
                if full.get("use_dora") or full.get("lora_bias"):
                    raise Unsupported(
                        f"DoRA or lora_bias on embedding {name!r} is not supported (PEFT has neither)"
                    )
                w = module.weight
                A = torch.zeros(r, w.shape[0], dtype=w.dtype, device=w.device)  # PEFT: A = 0, B ~ N(0, 1)
                B = torch.randn(w.shape[1], r, dtype=w.dtype, device=w.device)
                sites[name] = LoraEmbedding(base, name, A, B, scaling)
            else:
                layer = LoraLayer(module, r, scaling, bool(full.get("use_dora")), cls._dtype(module))
                layer.dropout = float(full.get("lora_dropout") or 0.0)
                if full.get("lora_bias"):
                    if module.bias is None:
                        raise InvalidConfig(f"lora_bias needs a base bias; module {name!r} has none")
                    layer.lora_B_bias = nn.Parameter(torch.zeros_like(module.bias, dtype=layer.lora_B.dtype))
                sites[name] = layer
        build_sites(base, fresh_extras(base, full, set(names)), None, "new", sites, trainable=True)
        return cls(full, list(sites), list(sites.values()))

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
        rest: list[str] = []
        for key in keys:
            bare = key[len(PREFIX) :] if key.startswith(PREFIX) else key
            for suffix in FACTOR_KEYS:
                if bare.endswith("." + suffix):
                    modules.setdefault(bare[: -len(suffix) - 1], {})[suffix] = key
                    break
            else:
                rest.append(key)
        try:
            extras = ex.classify(config, rest, set(modules), "lora")
        except InvalidArtifact as e:
            raise Unsupported(f"adapter {adapter!r}: {e}") from None
        use_dora = bool(config.get("use_dora"))
        sites: dict[str, SiteDelta] = {}
        for path, parts in modules.items():
            module = get_module(base, path, adapter)
            if EA_KEY in parts or EB_KEY in parts:
                sites[path] = cls._embedding_from(base, config, path, parts, get, adapter)
                continue
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
            layer.lora_B_bias = None
            if BB_KEY in parts:
                b = get(parts[BB_KEY])
                if tuple(b.shape) != (d_out,) or module.bias is None:
                    raise IncompatibleBase(
                        f"adapter {adapter!r}: module {path!r} has {d_out} outputs "
                        f"{'and a bias' if module.bias is not None else 'and no bias'}, the adapter's "
                        f"lora_B.bias is {list(b.shape)} (PEFT's lora_bias needs a base bias)"
                    )
                layer.lora_B_bias = nn.Parameter(b.to(dtype=dtype, device=device), requires_grad=False)
            sites[path] = layer
        if not sites:
            raise IncompatibleBase(f"adapter {adapter!r} has no LoRA weights")
        kept = build_sites(base, extras, get, adapter, sites)
        return cls(config, list(sites), list(sites.values()), kept)

    @classmethod
    def _embedding_from(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        path: str,
        parts: dict[str, str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> LoraEmbedding:
        module = base.get_submodule(path)
        if not is_embedding(module):
            raise IncompatibleBase(
                f"adapter {adapter!r}: module {path!r} is a {type(module).__name__}, not an embedding "
                "(the adapter has lora_embedding_A/B there)"
            )
        if EA_KEY not in parts or EB_KEY not in parts:
            raise IncompatibleBase(f"adapter {adapter!r}: module {path!r} lacks lora_embedding_A or _B")
        A, B = get(parts[EA_KEY]), get(parts[EB_KEY])
        V, d = module.weight.shape
        r = A.shape[0]
        if A.ndim == 2 and A.shape[1] != V:
            raise IncompatibleBase(
                f"adapter {adapter!r}: embedding {path!r} has {V} tokens but the adapter was trained on a "
                f"vocabulary of {A.shape[1]} (lora_embedding_A {list(A.shape)}); resize the base's token "
                f"embeddings to {A.shape[1]} (resize_token_embeddings) before loading it"
            )
        if A.ndim != 2 or B.ndim != 2 or B.shape[0] != d or B.shape[1] != r:
            raise IncompatibleBase(
                f"adapter {adapter!r}: embedding {path!r} is ({V}, {d}) but the adapter has lora_embedding_A "
                f"{list(A.shape)} and lora_embedding_B {list(B.shape)} (expected [r, {V}] and [{d}, r])"
            )
        w = module.weight
        layer = LoraEmbedding(
            base,
            path,
            A.to(dtype=w.dtype, device=w.device),
            B.to(dtype=w.dtype, device=w.device),
            lora_scaling(config, path, r),
        )
        layer.requires_grad_(False)
        return layer

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for path, site in zip(self.paths, self.layers, strict=True):
            layer = factor_layer(site)
            if isinstance(layer, LoraLayer):
                out[f"{PREFIX}{path}.{A_KEY}"] = layer.lora_A.detach()
                out[f"{PREFIX}{path}.{B_KEY}"] = layer.lora_B.detach()
                if layer.lora_magnitude_vector is not None:
                    out[f"{PREFIX}{path}.{M_KEY}"] = layer.lora_magnitude_vector.detach()
                if layer.lora_B_bias is not None:
                    out[f"{PREFIX}{path}.{BB_KEY}"] = layer.lora_B_bias.detach()
            elif isinstance(layer, LoraEmbedding):
                out[f"{PREFIX}{path}.{EA_KEY}"] = layer.lora_embedding_A.detach()
                out[f"{PREFIX}{path}.{EB_KEY}"] = layer.lora_embedding_B.detach()
            saved = getattr(site, "tensors", None)
            if saved is not None:
                out.update(saved())
        out.update(self.kept)
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
