"""PEFT-compatible merges: linear, ties, dare_linear, dare_ties.

These reproduce PEFT's `add_weighted_adapter(combination_type=...)` for LoRA. With
c_i = w_i s_i (weight times the adapter's scaling; negative weights allowed: task
negation, Ilharco et al. 2023), each c_i is split over the two factors as PEFT does:
sqrt|c_i| on each, the sign on A only. All need equal ranks.

    linear  A = sum_i sgn(c_i) sqrt|c_i| A_i,  B = sum_i sqrt|c_i| B_i.
            NOT the sum of the deltas: B A has cross terms B_i A_j (i != j); it is
            cheap and keeps the rank, nothing more (`exact` has the exact merges).
    ties    TIES-merging (Yadav et al. 2023) applied to the A's and the B's separately
            with the same split: keep the top `density` fraction of each factor by
            magnitude, elect a sign per entry ("total": sign of the sum; "frequency":
            sign of the count), average the weighted entries that agree with it.
    dare_*  DARE (Yu et al. 2024): drop each entry with probability 1 - density and
            rescale by 1 / density, then a linear sum (dare_linear) or the TIES sign
            election and disjoint mean (dare_ties). Drops come from a torch.Generator
            seeded by the caller, so a merge is reproducible.

Factor stacks are X (G, n, ...): group (modules merged as one batch), adapter, factor dims.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltahub.compose.merge.peft_format import LoraModule


def _magnitude_prune(X: Tensor, density: float) -> Tensor:
    """Keep the top int(density * numel) entries by |value| of each factor (PEFT's rule)."""
    if density >= 1.0:
        return X
    flat = X.reshape(X.shape[0] * X.shape[1], -1)  # (G n, numel)
    k = int(density * flat.shape[1])
    keep = torch.zeros_like(flat).scatter_(1, flat.abs().topk(k, dim=1, sorted=False).indices, 1.0)
    return (flat * keep).view_as(X)


def _dare_prune(X: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """Drop each entry with probability 1 - density and rescale the survivors by 1 / density."""
    if density >= 1.0:
        return X
    keep = torch.rand(X.shape, generator=generator, dtype=torch.float32) < density
    return X * keep / density


def _disjoint_sign_merge(X: Tensor, w: Tensor, majority_sign_method: str) -> Tensor:
    """TIES: elect a sign per entry, then average the weighted entries that agree with it."""
    sign = X.sign()  # (G, n, ...)
    votes = X.sum(1) if majority_sign_method == "total" else sign.sum(1)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0).to(X.dtype).unsqueeze(1)  # zeros never agree
    return (X * w * agree).sum(1) / agree.sum(1).clamp(min=1)


def _combine(
    method: str,
    X: Tensor,
    w: Tensor,
    density: float | None,
    generator: torch.Generator,
    majority_sign_method: str,
) -> Tensor:
    """Combine factor stacks X (G, n, p, q) with per-adapter weights w (G, n) -> (G, p, q)."""
    w = w[:, :, None, None]
    if method == "linear":
        return (X * w).sum(1)
    assert density is not None
    if method == "ties":
        return _disjoint_sign_merge(_magnitude_prune(X, density), w, majority_sign_method)
    X = _dare_prune(X, density, generator)
    if method == "dare_linear":
        return (X * w).sum(1)
    return _disjoint_sign_merge(X, w, majority_sign_method)


def same_rank(
    method: str,
    coeffs: Tensor,
    modules: list[list[LoraModule]],
    density: float | None,
    generator: torch.Generator,
    majority_sign_method: str,
) -> tuple[Tensor, Tensor]:
    """linear / ties / dare_* of a group: merged (B (G, d_out, r), A (G, r, d_in)), float32.

    `modules[g][j]` is adapter j's factors at module g (one rank throughout) and
    `coeffs` (G, n) float64 its c = w * s.
    """
    G, n = coeffs.shape
    d_out, d_in = modules[0][0].shape
    r = modules[0][0].rank
    Bs = torch.empty(G, n, d_out, r)
    As = torch.empty(G, n, r, d_in)
    for g, row in enumerate(modules):
        for j, m in enumerate(row):
            Bs[g, j].copy_(m.B)
            As[g, j].copy_(m.A)
    # PEFT's split of c over the two factors: sqrt|c| each, the sign on A only.
    wB = coeffs.abs().sqrt()
    wA = (wB * coeffs.sign()).float()
    A = _combine(method, As, wA, density, generator, majority_sign_method)
    B = _combine(method, Bs, wB.float(), density, generator, majority_sign_method)
    return B, A
