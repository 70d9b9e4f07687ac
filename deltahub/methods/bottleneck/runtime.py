"""Bottleneck adapters: Houlsby, Pfeiffer and parallel (AdaptFormer).

A bottleneck adapter is a small residual MLP, f(h) = s * W_up act(W_down h + b_down) +
b_up scaled, with W_down: (b, d), W_up: (d, b) and W_up, b_up initialized to zero so a
new adapter is the identity.

- Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP": two serial
  adapters per layer, h <- h + f(h), one on the attention block's output projection and
  one on the feed-forward block's output, both before the residual add (and LayerNorm).
- Pfeiffer et al., 2021, "AdapterFusion": one serial adapter, after the feed-forward
  output only.
- Chen et al., 2022, "AdaptFormer": a parallel adapter beside the feed-forward block,
  y = FFN(x) + s * f(x), reading the block's *input* x.

Where those points are depends on the architecture; `ARCHITECTURES` names them per
`config.model_type` (an unknown type is a clear `Unsupported`). For BERT-style encoders
the feed-forward block is split across two modules (`intermediate` reads x,
`output.dense` writes the FFN output), so a parallel adapter captures x with a forward
pre-hook on `intermediate` and adds its output at `output.dense`.

The config schema (`BottleneckConfig`) and artifact layout are documented in
`deltahub.methods.bottleneck.schema`, which the registry uses without torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.errors import IncompatibleBase, InvalidArtifact, InvalidConfig, Unsupported
from deltahub.methods.bottleneck.schema import BottleneckConfig
from deltahub.methods.common import AdapterModule, SiteDelta, copy_checked


@dataclass(frozen=True)
class Arch:
    """Module paths, relative to one transformer layer, of the adapter insertion points."""

    layers: str  # regex (fullmatch) of a layer's module path; group "idx" is its index
    attn_out: str  # attention output projection (before the residual add)
    ffn_out: str  # module whose output is the feed-forward output (before the residual add)
    ffn_in: str | None  # module whose input is the FFN input, when it is not `ffn_out`


_BERT = Arch(
    r"(?:.*\.)?encoder\.layer\.(?P<idx>\d+)", "attention.output.dense", "output.dense", "intermediate"
)
_GPT2 = Arch(r"(?:.*\.)?h\.(?P<idx>\d+)", "attn.c_proj", "mlp", None)
_DECODER = Arch(r"(?:.*\.)?layers\.(?P<idx>\d+)", "self_attn.o_proj", "mlp", None)
ARCHITECTURES: dict[str, Arch] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "gpt2": _GPT2,
    "llama": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "mistral": _DECODER,
    "gemma": _DECODER,
}

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


def architecture(base: nn.Module) -> Arch:
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise Unsupported(
            f"bottleneck adapters do not know where to go in model type {model_type!r} "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}); use LoRA with target_modules instead"
        )
    return arch


def layer_paths(base: nn.Module, arch: Arch) -> dict[int, str]:
    """{layer index: module path of the layer}."""
    out: dict[int, str] = {}
    pattern = re.compile(arch.layers)
    for name, _ in base.named_modules():
        m = pattern.fullmatch(name)
        if m:
            out.setdefault(int(m.group("idx")), name)
    if not out:
        raise Unsupported(f"found no transformer layers matching {arch.layers!r} in {type(base).__name__}")
    return out


def sites_for(base: nn.Module, cfg: BottleneckConfig) -> list[tuple[str, str | None]]:
    """[(module path whose output changes, module path whose input is read or None)]."""
    arch = architecture(base)
    layers = layer_paths(base, arch)
    wanted = sorted(layers) if cfg.target_layers is None else cfg.target_layers
    out: list[tuple[str, str | None]] = []
    for i in wanted:
        if i not in layers:
            raise IncompatibleBase(f"target layer {i} does not exist; the base has layers 0..{max(layers)}")
        layer = layers[i]
        if cfg.variant == "houlsby":
            out.append((f"{layer}.{arch.attn_out}", None))
        if cfg.variant in ("houlsby", "pfeiffer"):
            out.append((f"{layer}.{arch.ffn_out}", None))
        else:
            ffn_in = f"{layer}.{arch.ffn_in}" if arch.ffn_in else None
            out.append((f"{layer}.{arch.ffn_out}", ffn_in))
    return out


class BottleneckLayer(SiteDelta):
    """f(h) = s * up(act(down(h))); serial: h + f(h) on the output; parallel: f(FFN input)."""

    def __init__(self, d: int, b: int, non_linearity: str, scaling: float, parallel: bool) -> None:
        super().__init__()
        self.adapter_down = nn.Linear(d, b)
        self.adapter_up = nn.Linear(b, d)
        nn.init.normal_(self.adapter_down.weight, std=1e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # identity at init
        nn.init.zeros_(self.adapter_up.bias)
        self.act = _ACTIVATIONS[non_linearity]
        self.scaling = scaling
        self.parallel = parallel
        self.sequential = not parallel
        # A base module, kept out of the adapter's module tree (not the adapter's parameters).
        object.__setattr__(self, "input_module", None)
        self._captured: Tensor | None = None
        self._hook: Any = None

    def f(self, h: Tensor) -> Tensor:
        # A quantized base's activations may be in its compute dtype, not the adapter's.
        z = h if h.dtype == self.adapter_down.weight.dtype else h.to(self.adapter_down.weight.dtype)
        return self.adapter_up(self.act(self.adapter_down(z))).to(
            h.dtype
        )  # (B, T, d) -> (B, T, b) -> (B, T, d)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        if not self.parallel:
            return self.f(y_cur) * (self.scaling * scale)
        h = x
        if self.input_module is not None:
            h = self._captured
            if h is None:
                raise RuntimeError("parallel adapter ran before its FFN input was captured")
            if rows is not None:
                h = h[rows] if isinstance(rows, slice) else h.index_select(0, rows)
        return self.f(h) * (self.scaling * scale)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._captured = args[0]

    def attach(self) -> None:
        if self.input_module is not None and self._hook is None:
            self._hook = self.input_module.register_forward_pre_hook(self._capture)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = None


class BottleneckAdapter(AdapterModule):
    """Houlsby, Pfeiffer or parallel bottleneck adapters on every (or chosen) layer."""

    method = "bottleneck"

    @staticmethod
    def _parse(base: nn.Module, config: dict[str, Any]) -> BottleneckConfig:
        cfg = {**config, "method": "bottleneck"}
        width = getattr(getattr(base, "config", None), "hidden_size", None)
        cfg.setdefault("hidden_size", width)
        cfg.setdefault("base_model_type", getattr(getattr(base, "config", None), "model_type", None))
        if "bottleneck_size" not in cfg and "reduction_factor" not in cfg:
            cfg["reduction_factor"] = 16
        try:
            parsed = BottleneckConfig.from_dict(cfg)
        except InvalidArtifact as e:
            raise InvalidConfig(str(e)) from None
        if width is not None and parsed.hidden_size != width:
            raise IncompatibleBase(f"the adapter has hidden_size {parsed.hidden_size}, the base {width}")
        return parsed

    @classmethod
    def _build(cls, base: nn.Module, cfg: BottleneckConfig) -> BottleneckAdapter:
        paths, layers = [], []
        for path, ffn_in in sites_for(base, cfg):
            module = base.get_submodule(path)
            ref = next(iter(module.parameters()), None)
            # The dtype of the first floating-point parameter: a quantized layer's packed weight is not.
            fp = next((p for p in module.parameters() if p.is_floating_point()), None)
            layer = BottleneckLayer(
                cfg.hidden_size,
                cfg.bottleneck_size or 1,
                cfg.non_linearity,
                cfg.scaling,
                cfg.variant == "parallel",
            )
            if ref is not None:
                layer.to(device=ref.device, dtype=fp.dtype if fp is not None else None)
            object.__setattr__(layer, "input_module", base.get_submodule(ffn_in) if ffn_in else None)
            paths.append(path)
            layers.append(layer)
        return cls(cfg.to_dict(), paths, layers)

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> BottleneckAdapter:
        """Fresh adapters at the variant's insertion points (up-projection zero: identity)."""
        return cls._build(base, cls._parse(base, config))

    @classmethod
    def from_tensors(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        keys: list[str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> BottleneckAdapter:
        cfg = cls._parse(base, config)
        model = cls._build(base, cfg)
        expected = set(model.tensors())
        got = set(keys)
        if got != expected:
            extra, missing = sorted(got - expected), sorted(expected - got)
            where = (
                f"has {extra[0]!r}, which this base has no place for" if extra else f"lacks {missing[0]!r}"
            )
            raise IncompatibleBase(
                f"bottleneck adapter {adapter!r} ({cfg.variant}) {where}; was it built for another architecture?"
            )
        with torch.no_grad():
            for path, layer in zip(model.paths, model.layers, strict=True):
                for part, param in (
                    ("adapter_down.weight", layer.adapter_down.weight),
                    ("adapter_down.bias", layer.adapter_down.bias),
                    ("adapter_up.weight", layer.adapter_up.weight),
                    ("adapter_up.bias", layer.adapter_up.bias),
                ):
                    copy_checked(param, get(f"{path}.{part}"), f"adapter {adapter!r}: {path}.{part}")
        model.requires_grad_(False)
        return model

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for path, layer in zip(self.paths, self.layers, strict=True):
            out[f"{path}.adapter_down.weight"] = layer.adapter_down.weight.detach()
            out[f"{path}.adapter_down.bias"] = layer.adapter_down.bias.detach()
            out[f"{path}.adapter_up.weight"] = layer.adapter_up.weight.detach()
            out[f"{path}.adapter_up.bias"] = layer.adapter_up.bias.detach()
        return out

    def attach(self, base: nn.Module) -> None:
        for layer in self.layers:
            layer.attach()

    def detach(self) -> None:
        for layer in self.layers:
            layer.detach()
