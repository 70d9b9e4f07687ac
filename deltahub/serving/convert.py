"""DoRA, IA3 and high-rank LoRA -> a plain LoRA at a chosen rank, by SVD of the exact update.

Every method here changes a linear layer's weight W (d_out, d_in) into W' = W + ΔW, with
ΔW exact, computed in float64 from the adapter and the base weights:

    LoRA   ΔW = s B A                                       (s = alpha / r, or alpha / sqrt(r))
    DoRA   ΔW = m * (W + s B A) / ||W + s B A||_c - W       (Liu et al., 2024; ||.||_c: the norm
                                                             of each output row, m: magnitude)
    IA3    ΔW = (l - 1) * W  (output scaling, l (d_out, 1)) or W * (l - 1) (input scaling,
           l (1, d_in)); output scaling also scales a bias, which no LoRA holds: refused there.

DoRA and IA3 need W, so the base is loaded (`deltahub.compose.load_base`). The truncated
SVD ΔW = U S V^T gives the LoRA at rank k: B = U_k S_k, A = V_k^T, with lora_alpha = r
(scaling 1), as PEFT's `convert_to_lora` writes it. The error it introduces, per module,
is ||ΔW - B A||_F / ||ΔW||_F = sqrt(sum_{i>k} S_i^2 / sum_i S_i^2) (Eckart-Young), and on
the logits of a probe batch ||L_lora - L_orig||_F / ||L_orig||_F (with the max abs gap).

Exactness: when k >= rank(ΔW) (always when k >= min(d_out, d_in)), B A = ΔW up to float
rounding, so the converted LoRA computes what the original did; below that, the reported
error is what is lost. Ranks past min(d_out, d_in) are padded with zero factors, so every
module has rank r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltahub import artifact as af
from deltahub.errors import InvalidConfig, Unsupported
from deltahub.methods.lora import extras as ex
from deltahub.patterns import lora_scaling

CONVERTIBLE = ("lora", "ia3")


@dataclass
class Conversion:
    """A converted LoRA (tensors and PEFT config) and the error the conversion introduced."""

    rank: int
    config: dict[str, Any]
    tensors: dict[str, Tensor]
    module_errors: dict[str, float]  # relative Frobenius error of ΔW, per module
    logits_rel_error: float | None = None
    logits_max_abs: float | None = None
    exact: bool = False
    source: str = ""  # lora, dora or ia3

    def report(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rank": self.rank,
            "exact": self.exact,
            "max_module_rel_error": max(self.module_errors.values(), default=0.0),
            "module_rel_errors": dict(sorted(self.module_errors.items())),
            "logits_rel_error": self.logits_rel_error,
            "logits_max_abs": self.logits_max_abs,
        }


def _weight(base: nn.Module, module: str) -> tuple[Tensor, bool, bool]:
    """(W as (d_out, d_in) float64, is a GPT-2 Conv1D, has a bias) of a base module."""
    try:
        layer = base.get_submodule(module)
    except AttributeError:
        raise InvalidConfig(f"the base has no module {module!r}: is it the adapter's base?") from None
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise Unsupported(f"{module} is not a linear layer; only linear layers convert to LoRA")
    conv1d = type(layer).__name__ == "Conv1D"
    w = weight.detach().to("cpu", torch.float64)
    return (w.T if conv1d else w), conv1d, getattr(layer, "bias", None) is not None


def delta_weights(artifact: af.Artifact, base: nn.Module | None) -> tuple[str, dict[str, Tensor], bool]:
    """(source kind, {module: exact ΔW (d_out, d_in) float64}, any GPT-2 Conv1D) of an artifact."""
    from safetensors.torch import load_file

    method, config = artifact.method, artifact.config
    if method not in CONVERTIBLE:
        raise Unsupported(f"{method} does not convert to LoRA (convertible: LoRA, DoRA, IA3)")
    tensors = load_file(str(artifact.weights_path))
    out: dict[str, Tensor] = {}
    conv = False
    if method == "lora":
        dora = bool(config.get("use_dora"))
        if dora and base is None:
            raise InvalidConfig("converting DoRA needs the base model's weights: pass --base")
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                if key.endswith((".lora_embedding_A", ".lora_embedding_B")):
                    raise Unsupported(f"{key}: LoRA on an embedding does not convert here")
                continue
            module = key.removesuffix(".lora_A.weight")
            path = module.removeprefix(ex.PREFIX)
            b = tensors[module + ".lora_B.weight"].to(torch.float64)
            a = a.to(torch.float64)
            s = lora_scaling(config, path, a.shape[0])
            delta = s * (b @ a)  # (d_out, d_in)
            if dora:
                w, c, _ = _weight(base, path)  # type: ignore[arg-type]
                conv |= c
                m = tensors[module + ".lora_magnitude_vector"].to(torch.float64)  # (d_out,)
                v = w + delta
                delta = (m / torch.linalg.norm(v, dim=1)).unsqueeze(1) * v - w
            elif base is not None:
                conv |= _weight(base, path)[1]
            out[path] = delta
        return ("dora" if dora else "lora"), out, conv
    if base is None:
        raise InvalidConfig("converting IA3 needs the base model's weights: pass --base")
    for key, vec in tensors.items():
        if not key.endswith(".ia3_l"):
            continue
        path = key.removesuffix(".ia3_l").removeprefix(ex.PREFIX)
        w, c, has_bias = _weight(base, path)
        conv |= c
        scale = vec.to(torch.float64).reshape(-1)  # IA3's l
        if vec.shape[-1] == 1 and scale.numel() == w.shape[0]:  # (d_out, 1): output scaling
            if has_bias:
                raise Unsupported(
                    f"IA3 scales the output of {path}, bias included; a LoRA cannot change a bias"
                )
            out[path] = (scale - 1).unsqueeze(1) * w
        else:
            out[path] = w * (scale - 1).unsqueeze(0)
    return "ia3", out, conv


def factorize(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """(A (rank, d_in), B (d_out, rank), relative Frobenius error) of the truncated SVD."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.numel())
    b = torch.zeros(delta.shape[0], rank, dtype=delta.dtype)
    a = torch.zeros(rank, delta.shape[1], dtype=delta.dtype)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    total = float((s**2).sum())
    err = math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else 0.0
    return a, b, err


def convert(
    artifact: af.Artifact, rank: int, base: nn.Module | None = None, dtype: torch.dtype = torch.float32
) -> Conversion:
    """A plain LoRA of rank `rank` for a LoRA / DoRA / IA3 artifact (see the module docstring)."""
    if not isinstance(rank, int) or rank < 1:
        raise InvalidConfig(f"rank must be a positive integer, got {rank!r}")
    kind, deltas, conv1d = delta_weights(artifact, base)
    if not deltas:
        raise Unsupported("the adapter has no linear-layer update to convert")
    tensors: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    for path, delta in sorted(deltas.items()):
        a, b, errors[path] = factorize(delta, rank)
        tensors[f"{ex.PREFIX}{path}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{ex.PREFIX}{path}.lora_B.weight"] = b.to(dtype).contiguous()
    src = artifact.config
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,  # scaling 1: the SVD factors carry the scale
        "target_modules": sorted({p.rsplit(".", 1)[-1] for p in deltas}),
        "base_model_name_or_path": src.get("base_model_name_or_path")
        or (artifact.manifest.base_model if artifact.manifest else None),
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "fan_in_fan_out": conv1d,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "task_type": src.get("task_type"),
        "inference_mode": True,
    }
    exact = all(e <= 1e-6 for e in errors.values())
    return Conversion(rank, config, tensors, errors, exact=exact, source=kind)


def probe_ids(base: nn.Module, batch: int = 2, length: int = 16, seed: int = 0) -> Tensor:
    """A seeded batch of token ids within the base's vocabulary."""
    vocab = int(getattr(getattr(base, "config", None), "vocab_size", 0) or 128)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _logits(model: Any, ids: Tensor) -> Tensor:
    with torch.no_grad():
        out = model(input_ids=ids.to(next(model.base.parameters()).device))
    t = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return t.detach().to("cpu", torch.float64)


def measure_logits(
    base: nn.Module,
    converted_dir: Path,
    *,
    original: str | Path,
    registry: Any = None,
    ids: Tensor | None = None,
) -> tuple[float, float]:
    """(relative Frobenius error, max abs gap) of the converted LoRA's logits against the
    original adapter's (a registry ref, or a directory when `registry` is None), both run
    by deltahub on `base` over the probe batch `ids`."""
    from deltahub.compose import AdaptedModel

    ids = probe_ids(base) if ids is None else ids
    model = AdaptedModel(base, registry)
    if registry is not None:
        name = model.load(str(original), name="original")
    else:
        name = model.load_path(original, "original")
    model.activate([name])
    want = _logits(model, ids)
    model.unload(name)
    model.load_path(converted_dir, "converted")
    model.activate(["converted"])
    got = _logits(model, ids)
    model.unload("converted")
    gap = got - want
    return float(gap.norm() / want.norm()), float(gap.abs().max())


__all__ = [
    "CONVERTIBLE",
    "Conversion",
    "convert",
    "delta_weights",
    "factorize",
    "measure_logits",
    "probe_ids",
]
