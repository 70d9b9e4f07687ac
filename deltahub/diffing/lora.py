"""LoRA-aware diff: per target module, the change of the effective update dW = s B A.

Everything comes from the factors through `deltahub.compose.lowrank` (QR of the
(d, r) factors and r x r products), never from a d_out x d_in matrix, so two ranks
need not match (r=8 vs r=16):

    ||dW_a - dW_b||_F      norm of the stacked factors [s_a B_a, -s_b B_b] [A_a; A_b]
    relative change        ||dW_a - dW_b||_F / ||dW_a||_F
    cosine                 <dW_a, dW_b>_F / (||dW_a||_F ||dW_b||_F)
    subspace similarity    phi(k, k) = ||U_a[:, :k]^T U_b[:, :k]||_F^2 / k (Hu et al. 2021, sec. 7)
    effective rank         exp(entropy of the normalized singular values)

The scaling s follows PEFT: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
(Kalajdzievski 2023), with per-module r and alpha from rank_pattern / alpha_pattern.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deltahub.artifact import TensorInfo, lora_scaling
from deltahub.compose import lowrank
from deltahub.diffing.report import ModuleDiff
from deltahub.diffing.tensors import Weights

# (down, up) factor markers: linear/conv layers, and embeddings (dW = (B A)^T there;
# transposing changes none of the quantities above).
MARKERS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraModule:
    """Where one module's factors live in the file, and its scaling."""

    name: str  # the module path without PEFT's "base_model.model." prefix
    a_key: str
    b_key: str
    rank: int
    scaling: float
    shape: tuple[int, int]  # (d_out, d_in) of dW


def scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's scaling of one module (see `artifact.lora_scaling`)."""
    return lora_scaling({"lora_alpha": rank, **config}, module, rank)


def lora_modules(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, LoraModule]:
    """The LoRA modules of an artifact, by display name."""
    out: dict[str, LoraModule] = {}
    for name, info in tensors.items():
        parts = name.split(".")
        for down, up in MARKERS:
            # PEFT names linear factors `...lora_A.weight`, embedding ones `...lora_embedding_A`.
            if down not in parts:
                continue
            i = parts.index(down)
            if parts[i + 1 :] not in (["weight"], []):
                continue
            b_key = ".".join([*parts[:i], up, *parts[i + 1 :]])
            if b_key not in tensors or len(info.shape) != 2:
                continue
            path = ".".join(parts[:i])
            display = path[len(PEFT_PREFIX) :] if path.startswith(PEFT_PREFIX) else path
            b_shape = tensors[b_key].shape
            rank = info.shape[0]
            out[display] = LoraModule(
                display, name, b_key, rank, scaling(config, path, rank), (b_shape[0], info.shape[1])
            )
    return out


def factor_keys(modules: dict[str, LoraModule]) -> set[str]:
    return {k for m in modules.values() for k in (m.a_key, m.b_key)}


def _factors(w: Weights, m: LoraModule) -> tuple[Any, Any]:
    import torch

    B = w.get(m.b_key).to(torch.float64) * m.scaling  # (d_out, r), scaling folded in
    A = w.get(m.a_key).to(torch.float64)  # (r, d_in)
    return B, A


def _one_sided(name: str, m: LoraModule, w: Weights, side_a: bool) -> ModuleDiff:
    """A module only one side has: removed (dW_b = 0, relative change 1) or added."""
    B, A = _factors(w, m)
    n = lowrank.norm(B, A)
    er = lowrank.effective_rank(B, A)
    return ModuleDiff(
        module=name,
        status="removed" if side_a else "added",
        diff_norm=n,
        relative_change=1.0 if side_a and n > 0 else (0.0 if n == 0 else None),
        cosine=None,
        subspace_similarity=None,
        norm_a=n if side_a else None,
        norm_b=None if side_a else n,
        effective_rank_a=er if side_a else None,
        effective_rank_b=None if side_a else er,
        rank_a=m.rank if side_a else None,
        rank_b=None if side_a else m.rank,
        scaling_a=m.scaling if side_a else None,
        scaling_b=None if side_a else m.scaling,
    )


def compare_modules(
    wa: Weights,
    ma: dict[str, LoraModule],
    wb: Weights,
    mb: dict[str, LoraModule],
    unchanged: set[str],
    tolerance: float,
) -> list[ModuleDiff]:
    """One `ModuleDiff` per module of either side, sorted by change, largest first.

    Modules present on both sides are grouped by (d_out, d_in, r_a, r_b) and each group
    goes through one batched `lowrank.compare_batch` call. `unchanged` holds tensor names
    whose bytes are the same on both sides: a module whose two factors and scaling are
    all unchanged has dW_a = dW_b exactly, so its difference is 0.0 with no
    floating-point residue.
    """
    out = _compare_modules(wa, ma, wb, mb, unchanged, tolerance)
    out.sort(key=ModuleDiff.sort_key)
    return out


def _compare_modules(
    wa: Weights,
    ma: dict[str, LoraModule],
    wb: Weights,
    mb: dict[str, LoraModule],
    unchanged: set[str],
    tolerance: float,
) -> list[ModuleDiff]:
    import torch

    out: list[ModuleDiff] = []
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in sorted(set(ma) | set(mb)):
        a, b = ma.get(name), mb.get(name)
        if b is None:
            out.append(_one_sided(name, a, wa, side_a=True))  # type: ignore[arg-type]
        elif a is None:
            out.append(_one_sided(name, b, wb, side_a=False))
        elif a.shape != b.shape:
            out.append(_reshaped(name, a, b, wa, wb))
        else:
            groups.setdefault((*a.shape, a.rank, b.rank), []).append(name)
    for names in groups.values():
        fa = [_factors(wa, ma[n]) for n in names]
        fb = [_factors(wb, mb[n]) for n in names]
        stats = lowrank.compare_batch(
            torch.stack([B for B, _ in fa]),  # (n, d_out, r_a)
            torch.stack([A for _, A in fa]),  # (n, r_a, d_in)
            torch.stack([B for B, _ in fb]),
            torch.stack([A for _, A in fb]),
        )
        for i, name in enumerate(names):
            a, b = ma[name], mb[name]
            row = {k: float(v[i]) for k, v in stats.items()}
            same = {a.a_key, a.b_key} <= unchanged and a.scaling == b.scaling and a.a_key == b.a_key
            na, d = row["norm_a"], 0.0 if same else row["diff_norm"]
            rel = d / na if na > 0 else (0.0 if d == 0 else None)
            out.append(
                ModuleDiff(
                    module=name,
                    status="changed" if rel is None or rel > tolerance else "unchanged",
                    diff_norm=d,
                    relative_change=rel,
                    cosine=1.0 if same and na > 0 else row["cosine"],
                    subspace_similarity=row["subspace_similarity"],
                    norm_a=na,
                    norm_b=row["norm_b"],
                    effective_rank_a=row["effective_rank_a"],
                    effective_rank_b=row["effective_rank_b"],
                    rank_a=a.rank,
                    rank_b=b.rank,
                    scaling_a=a.scaling,
                    scaling_b=b.scaling,
                )
            )
    return out


def _reshaped(name: str, a: LoraModule, b: LoraModule, wa: Weights, wb: Weights) -> ModuleDiff:
    """dW of another shape on each side (another base): it cannot be subtracted, so it
    counts as entirely replaced."""
    Ba, Aa = _factors(wa, a)
    Bb, Ab = _factors(wb, b)
    na, nb = lowrank.norm(Ba, Aa), lowrank.norm(Bb, Ab)
    return ModuleDiff(
        module=name,
        status="reshaped",
        diff_norm=math.sqrt(na**2 + nb**2),
        relative_change=None,
        cosine=None,
        subspace_similarity=None,
        norm_a=na,
        norm_b=nb,
        effective_rank_a=lowrank.effective_rank(Ba, Aa),
        effective_rank_b=lowrank.effective_rank(Bb, Ab),
        rank_a=a.rank,
        rank_b=b.rank,
        scaling_a=a.scaling,
        scaling_b=b.scaling,
    )
