"""Bottleneck adapters: Houlsby, Pfeiffer and parallel, placed exactly as AdapterHub places them.

A bottleneck adapter is a small MLP, A(z) = s * (W_up act(W_down z + b_down) + b_up), with
W_down: (b, d), W_up: (d, b) and W_up, b_up initialized to zero so a new adapter is the
identity. What it reads (z) and where its output goes, with x the residual stream entering
a sub-layer, h the sub-layer's output before its residual add and LN the sub-layer's own
post-LayerNorm (BERT-style encoders; pre-LN decoders have none there):

- Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for NLP" (AdapterHub's
  `DoubleSeqBnConfig`): after attention and after the FFN, z = h, the sub-layer writes
  h + A(h): LN(x + h + A(h)) on encoders, x + h + A(h) on decoders.
- Pfeiffer et al., 2021, "AdapterFusion" (`SeqBnConfig`): after the FFN only, reading the
  stream after the FFN's residual add and LayerNorm, z = LN(x + h) (decoders: x + h), and
  the sub-layer writes h + A(z), so the block output is LN(x + h + A(LN(x + h))) — the
  same LayerNorm applied twice — or x + h + A(x + h).
- He et al., 2022 / AdaptFormer (`ParBnConfig`): beside the FFN, z = x, the stream before
  the FFN (before GPT-2's `ln_2` / Llama's `post_attention_layernorm`): x + h + A(x).

Every one is a site delta on the module that produces h (BERT's `output.dense`, GPT-2 and
Llama's `mlp`, the attention output projections), and x is captured by a forward pre-hook
on the module that reads the stream (`Arch`). `placement_version` 1 artifacts (made before
these placements were adopted) keep their own math; see `deltahub.methods.bottleneck.schema`.

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
from deltahub.methods.bottleneck.schema import CURRENT_PLACEMENT, BottleneckConfig
from deltahub.methods.common import AdapterModule, SiteDelta, copy_checked

# (module path relative to the layer, index of the positional argument, its keyword name)
Stream = tuple[str, int, str]


@dataclass(frozen=True)
class Arch:
    """Module paths, relative to one transformer layer, of where adapters read and write."""

    layers: str  # regex (fullmatch) of a layer's module path; groups "pre" and "idx"
    attn_out: str  # attention output projection (its output is h, before the residual add)
    ffn_out: str  # module whose output is the feed-forward output h (before the residual add)
    attn_stream: Stream  # the module whose input is the stream x entering attention
    ffn_stream: Stream  # the module whose input is the stream x entering the FFN
    attn_ln: str | None  # the attention sub-layer's post-LayerNorm (None on pre-LN decoders)
    ffn_ln: str | None  # the FFN sub-layer's post-LayerNorm
    ffn_in: str | None  # placement_version 1 parallel: module whose input is the FFN input


_BERT = Arch(
    r"(?P<pre>(?:.*\.)?)encoder\.layer\.(?P<idx>\d+)",
    "attention.output.dense",
    "output.dense",
    ("attention.output", 1, "input_tensor"),
    ("intermediate", 0, "hidden_states"),
    "attention.output.LayerNorm",
    "output.LayerNorm",
    "intermediate",
)
_GPT2 = Arch(
    r"(?P<pre>(?:.*\.)?)h\.(?P<idx>\d+)",
    "attn.c_proj",
    "mlp",
    ("ln_1", 0, "input"),
    ("ln_2", 0, "input"),
    None,
    None,
    None,
)
_DECODER = Arch(
    r"(?P<pre>(?:.*\.)?)layers\.(?P<idx>\d+)",
    "self_attn.o_proj",
    "mlp",
    ("input_layernorm", 0, "hidden_states"),
    ("post_attention_layernorm", 0, "hidden_states"),
    None,
    None,
    None,
)
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


def bare_path(path: str, arch: Arch) -> str:
    """The path without the wrapper's prefix (`bert.`, `model.`, `transformer.`): the bare model's."""
    m = re.match(arch.layers, path)
    return path[len(m.group("pre")) :] if m else path


@dataclass(frozen=True)
class SitePlan:
    """One adapter site: the module whose output changes, and where its input comes from."""

    path: str
    stream: tuple[str, int, str] | None = None  # (module path, arg index, keyword) of x
    ln: str | None = None  # the post-LayerNorm applied to x + h ("sum" reads)
    input_module: str | None = None  # placement_version 1 parallel: the FFN input's module


def sites_for(base: nn.Module, cfg: BottleneckConfig) -> list[SitePlan]:
    """Every site of the config on this base, in layer order (attention site first)."""
    arch = architecture(base)
    layers = layer_paths(base, arch)
    wanted = sorted(layers) if cfg.target_layers is None else cfg.target_layers
    reads = cfg.reads
    out: list[SitePlan] = []
    for i in wanted:
        if i not in layers:
            raise IncompatibleBase(f"target layer {i} does not exist; the base has layers 0..{max(layers)}")
        layer = layers[i]
        kinds = [("attn", arch.attn_out, arch.attn_stream, arch.attn_ln)] if cfg.variant == "houlsby" else []
        kinds.append(("ffn", arch.ffn_out, arch.ffn_stream, arch.ffn_ln))
        for _, out_path, (mod, idx, kw), ln in kinds:
            path = f"{layer}.{out_path}"
            if reads == "output":
                out.append(SitePlan(path))
            elif reads in ("sum", "stream"):
                ln_path = f"{layer}.{ln}" if ln and reads == "sum" else None
                out.append(SitePlan(path, (f"{layer}.{mod}", idx, kw), ln_path))
            else:  # "input": version-1 parallel
                out.append(SitePlan(path, input_module=f"{layer}.{arch.ffn_in}" if arch.ffn_in else None))
    return out


class BottleneckLayer(SiteDelta):
    """A(z) = s * up(act(down(z))) added to the site's output; z per `reads` (module docstring)."""

    def __init__(self, d: int, b: int, non_linearity: str, scaling: float, reads: str = "output") -> None:
        super().__init__()
        self.adapter_down = nn.Linear(d, b)
        self.adapter_up = nn.Linear(b, d)
        nn.init.normal_(self.adapter_down.weight, std=1e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # identity at init
        nn.init.zeros_(self.adapter_up.bias)
        self.act = _ACTIVATIONS[non_linearity]
        self.scaling = scaling
        self.reads = reads
        self.parallel = reads in ("stream", "input")
        self.sequential = not self.parallel  # it reads y_cur, the output as changed so far
        # Base modules, kept out of the adapter's module tree (not the adapter's parameters).
        object.__setattr__(self, "stream_module", None)  # whose input (arg `stream_arg`) is x
        object.__setattr__(self, "ln", None)  # the LayerNorm of "sum" reads, when the base has one
        self.stream_arg: tuple[int, str] = (0, "hidden_states")
        self._captured: Tensor | None = None
        self._hook: Any = None

    def f(self, z: Tensor) -> Tensor:
        """up(act(down(z))) without the scaling, in z's dtype."""
        # A quantized base's activations may be in its compute dtype, not the adapter's.
        w = z if z.dtype == self.adapter_down.weight.dtype else z.to(self.adapter_down.weight.dtype)
        return self.adapter_up(self.act(self.adapter_down(w))).to(
            z.dtype
        )  # (B, T, d) -> (B, T, b) -> (B, T, d)

    def stream(self, rows: Any) -> Tensor:
        """The captured x, cut to the rows this call sees (per-row routing)."""
        x = self._captured
        if x is None:
            raise RuntimeError("bottleneck adapter ran before its input stream was captured")
        if rows is not None:
            x = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
        return x

    def adapter_input(self, x: Tensor, y_cur: Tensor, rows: Any = None) -> Tensor:
        """z: what the adapter (and a fusion over it, as its query) reads at this site."""
        if self.reads == "output":
            return y_cur
        if self.reads == "input":
            return x if self.stream_module is None else self.stream(rows)
        if self.reads == "stream":
            return self.stream(rows)
        s = y_cur + self.stream(rows).to(y_cur.dtype)  # "sum": x + h
        return s if self.ln is None else self.ln(s)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        return self.f(self.adapter_input(x, y_cur, rows)) * (self.scaling * scale)

    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        idx, kw = self.stream_arg
        self._captured = args[idx] if len(args) > idx else kwargs.get(kw)

    def attach(self) -> None:
        if self.stream_module is not None and self._hook is None:
            self._hook = self.stream_module.register_forward_pre_hook(self._capture, with_kwargs=True)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = None


class BottleneckAdapter(AdapterModule):
    """Houlsby, Pfeiffer or parallel bottleneck adapters on every (or chosen) layer."""

    method = "bottleneck"

    @staticmethod
    def _parse(base: nn.Module, config: dict[str, Any], creating: bool = False) -> BottleneckConfig:
        cfg = {**config, "method": "bottleneck"}
        width = getattr(getattr(base, "config", None), "hidden_size", None)
        cfg.setdefault("hidden_size", width)
        cfg.setdefault("base_model_type", getattr(getattr(base, "config", None), "model_type", None))
        if creating:  # new adapters get AdapterHub's placements; artifacts keep the one they name
            cfg.setdefault("placement_version", CURRENT_PLACEMENT)
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
        for plan in sites_for(base, cfg):
            module = base.get_submodule(plan.path)
            ref = next(iter(module.parameters()), None)
            # The dtype of the first floating-point parameter: a quantized layer's packed weight is not.
            fp = next((p for p in module.parameters() if p.is_floating_point()), None)
            layer = BottleneckLayer(
                cfg.hidden_size, cfg.bottleneck_size or 1, cfg.non_linearity, cfg.scaling, cfg.reads
            )
            if ref is not None:
                layer.to(device=ref.device, dtype=fp.dtype if fp is not None else None)
            if plan.stream is not None:
                mod, idx, kw = plan.stream
                object.__setattr__(layer, "stream_module", base.get_submodule(mod))
                layer.stream_arg = (idx, kw)
            elif plan.input_module is not None:
                object.__setattr__(layer, "stream_module", base.get_submodule(plan.input_module))
                layer.stream_arg = (0, "hidden_states")
            if plan.ln is not None:
                object.__setattr__(layer, "ln", base.get_submodule(plan.ln))
            paths.append(plan.path)
            layers.append(layer)
        return cls(cfg.to_dict(), paths, layers)

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> BottleneckAdapter:
        """Fresh adapters at the variant's insertion points (up-projection zero: identity)."""
        return cls._build(base, cls._parse(base, config, creating=True))

    @classmethod
    def from_tensors(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        keys: list[str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> BottleneckAdapter:
        """Keys may name the sites as this base does or as its bare model does (`layers.0.mlp`
        for a `model.layers.0.mlp` of a causal LM): imported AdapterHub adapters use the latter."""
        cfg = cls._parse(base, config)
        model = cls._build(base, cfg)
        arch = architecture(base)
        expected = set(model.tensors())
        got = set(keys)
        if got != expected:
            bare = {bare_path(k, arch): k for k in expected}
            if got == set(bare):
                rename = {k: bare[k] for k in got}
                get = _renamed(get, {v: k for k, v in rename.items()})
                got = expected
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


def _renamed(get: Callable[[str], Tensor], names: dict[str, str]) -> Callable[[str], Tensor]:
    """`get` that reads this base's key `k` from the artifact's key `names[k]`."""
    return lambda key: get(names.get(key, key))
