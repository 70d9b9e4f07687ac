"""Exact arithmetic on low-rank updates dW = s * B @ A, never materializing d_out x d_in.

A LoRA update is kept as factors B (d_out, r) and A (r, d_in). Everything here costs
O((d_out + d_in) r^2 + r^3):

    <B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T))                      (r1 x r2 Gram products)
    ||B A||_F        = ||R_B R_A^T||_F  with  B = Q_B R_B,  A^T = Q_A R_A  (no cancellation)
    SVD(B A)         = (Q_B U) S (Q_A V)^T  with  U S V^T = SVD(R_B R_A^T)

A sum of updates sum_i w_i s_i B_i A_i is itself a product of stacked factors
[w_1 s_1 B_1, ..., w_n s_n B_n] @ [A_1; ...; A_n], so sums, differences and their SVDs
reduce to the same small QR + SVD. Work is done in float64.

Subspace similarity is the normalized measure of Hu et al. 2021 (LoRA, section 7):
phi(i, j) = ||U_a[:, :i]^T U_b[:, :j]||_F^2 / min(i, j), in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (B (d_out, r), A (r, d_in)); the scaling is folded into B


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(dtype=torch.float64, device="cpu")


def stack(terms: Sequence[tuple[float, Tensor, Tensor]]) -> Factors:
    """[(c_i, B_i, A_i)] -> factors of sum_i c_i B_i A_i (rank = sum of ranks)."""
    if not terms:
        raise ValueError("stack() needs at least one (coefficient, B, A) term")
    B = torch.cat([c * _f64(b) for c, b, _ in terms], dim=1)  # (d_out, R)
    A = torch.cat([_f64(a) for _, _, a in terms], dim=0)  # (R, d_in)
    return B, A


def core(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """B @ A = Q_B @ M @ Q_A^T with orthonormal Q_B, Q_A and a small core M."""
    Qb, Rb = torch.linalg.qr(_f64(B))  # (d_out, k), (k, R)
    Qa, Ra = torch.linalg.qr(_f64(A).T)  # (d_in, k'), (k', R)
    return Qb, Rb @ Ra.T, Qa  # M: (k, k')


def inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> float:
    """Frobenius inner product <B1 A1, B2 A2>."""
    return float(((_f64(B1).T @ _f64(B2)) * (_f64(A1) @ _f64(A2).T)).sum())


def norm(B: Tensor, A: Tensor) -> float:
    """||B A||_F, computed stably through QR."""
    _, M, _ = core(B, A)
    return float(torch.linalg.matrix_norm(M))


def diff_norm(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> float:
    """||B1 A1 - B2 A2||_F without cancellation (works across different ranks)."""
    return norm(*stack([(1.0, B1, A1), (-1.0, B2, A2)]))


def cosine(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor) -> float:
    """Cosine between B1 A1 and B2 A2 as vectors; 0.0 when either is zero."""
    n1, n2 = norm(B1, A1), norm(B2, A2)
    if n1 == 0.0 or n2 == 0.0:
        return 0.0
    return inner(B1, A1, B2, A2) / (n1 * n2)


def svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of B @ A: U (d_out, k), S (k,), Vh (k, d_in), k = min(R, d_out, d_in)."""
    Qb, M, Qa = core(B, A)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return Qb @ U, S, Vh @ Qa.T


def singular_values(B: Tensor, A: Tensor) -> Tensor:
    _, M, _ = core(B, A)
    return torch.linalg.svdvals(M)


def truncate(B: Tensor, A: Tensor, rank: int) -> Factors:
    """Best rank-`rank` approximation of B @ A (Eckart-Young), as balanced factors.

    Returns B' (d_out, rank), A' (rank, d_in) with B' A' = U_k S_k V_k^T; columns beyond
    the available rank are zero-padded so the result always has exactly `rank` columns.
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    U, S, Vh = svd(B, A)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    Bk = U[:, :k] * root  # (d_out, k)
    Ak = root[:, None] * Vh[:k]  # (k, d_in)
    if k < rank:
        Bk = torch.cat([Bk, Bk.new_zeros(Bk.shape[0], rank - k)], dim=1)
        Ak = torch.cat([Ak, Ak.new_zeros(rank - k, Ak.shape[1])], dim=0)
    return Bk, Ak


def effective_rank(B: Tensor, A: Tensor) -> float:
    """Entropy effective rank exp(H(p)), p = sigma / sum(sigma) (Roy & Vetterli 2007)."""
    S = singular_values(B, A)
    total = S.sum()
    if total <= 0:
        return 0.0
    p = S / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def subspace_similarity(Ba: Tensor, Aa: Tensor, Bb: Tensor, Ab: Tensor, k: int | None = None) -> float:
    """phi(k, k) of Hu et al. 2021 between the top-k left singular directions of two updates.

    `k` defaults to the smaller of the two ranks. 1.0 means the same column space.
    """
    Ua, Sa, _ = svd(Ba, Aa)
    Ub, Sb, _ = svd(Bb, Ab)
    ra = int((Sa > Sa.max() * 1e-10).sum()) if Sa.numel() and Sa.max() > 0 else 0
    rb = int((Sb > Sb.max() * 1e-10).sum()) if Sb.numel() and Sb.max() > 0 else 0
    k = min(ra, rb) if k is None else min(k, ra, rb)
    if k == 0:
        return 0.0
    overlap = Ua[:, :k].T @ Ub[:, :k]
    return float((overlap**2).sum() / k)


# --------------------------------------------------------------------------- batched comparison


def _entropy_rank(S: Tensor) -> Tensor:
    """exp(H(sigma / sum sigma)) per row of S (n, k); 0 for an all-zero row."""
    total = S.sum(-1, keepdim=True)
    p = S / total.clamp_min(torch.finfo(S.dtype).tiny)
    h = -torch.where(p > 0, p * p.clamp_min(torch.finfo(S.dtype).tiny).log(), torch.zeros_like(p)).sum(-1)
    return torch.where(total.squeeze(-1) > 0, h.exp(), torch.zeros_like(h))


def _numerical_rank(S: Tensor) -> Tensor:
    """Per row: singular values above 1e-10 of the largest (the threshold `subspace_similarity` uses)."""
    top = S.max(-1, keepdim=True).values
    return ((top * 1e-10 < S) & (top > 0)).sum(-1)


def compare_batch(Ba: Tensor, Aa: Tensor, Bb: Tensor, Ab: Tensor) -> dict[str, Tensor]:
    """Compare n pairs of updates dW_a = B_a A_a and dW_b = B_b A_b at once; results are (n,).

    Ba (n, d_out, ra), Aa (n, ra, d_in), Bb (n, d_out, rb), Ab (n, rb, d_in). Both
    updates are written in one joint pair of orthonormal bases,

        [B_a, B_b] = Q_B R_B,  [A_a^T, A_b^T] = Q_A R_A
        dW_a = Q_B M_a Q_A^T,  M_a = R_B[:, :ra] R_A[:, :ra]^T   (likewise M_b)

    so that every quantity is one of a small (ra+rb)^2 matrix: ||dW_a|| = ||M_a||,
    ||dW_a - dW_b|| = ||M_a - M_b|| (no cancellation: the stacked-factor form of
    `diff_norm`), <dW_a, dW_b> = <M_a, M_b>, singular values of M_a, and left singular
    vectors U_a = Q_B U_Ma, whence the overlap U_a^T U_b = U_Ma^T U_Mb. Two QRs and two
    small SVDs per batch: on CPU the per-call cost of many tiny factorizations
    dominates, and a diff compares dozens of same-shaped modules.

    Returns norm_a, norm_b, diff_norm, inner, cosine, effective_rank_a,
    effective_rank_b and subspace_similarity (phi(k, k) of Hu et al. with k the smaller
    numerical rank, as `subspace_similarity`), float64 tensors of shape (n,).
    """
    Ba, Aa, Bb, Ab = _f64(Ba), _f64(Aa), _f64(Bb), _f64(Ab)
    ra = Ba.shape[-1]
    _, RB = torch.linalg.qr(torch.cat([Ba, Bb], -1))  # (n, k, ra+rb)
    _, RA = torch.linalg.qr(torch.cat([Aa, Ab], -2).mT)  # (n, k', ra+rb)
    Ma = RB[..., :ra] @ RA[..., :ra].mT  # (n, k, k')
    Mb = RB[..., ra:] @ RA[..., ra:].mT
    Uma, Sa, _ = torch.linalg.svd(Ma, full_matrices=False)
    Umb, Sb, _ = torch.linalg.svd(Mb, full_matrices=False)
    norm_a = torch.linalg.matrix_norm(Ma)
    norm_b = torch.linalg.matrix_norm(Mb)
    inner_ab = (Ma * Mb).sum((-2, -1))
    denom = norm_a * norm_b
    cos = torch.where(
        denom > 0, inner_ab / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.zeros_like(denom)
    )
    overlap = Uma.mT @ Umb  # (n, k, k) = U_a^T U_b
    k = torch.minimum(_numerical_rank(Sa), _numerical_rank(Sb))  # (n,)
    idx = torch.arange(overlap.shape[-1])
    keep = idx.view(1, -1) < k.view(-1, 1)  # (n, k): the top-k directions of each row
    mask = keep[:, :, None] & keep[:, None, :]
    phi = (overlap.pow(2) * mask).sum((-2, -1)) / k.clamp_min(1)
    return {
        "norm_a": norm_a,
        "norm_b": norm_b,
        "diff_norm": torch.linalg.matrix_norm(Ma - Mb),
        "inner": inner_ab,
        "cosine": cos,
        "effective_rank_a": _entropy_rank(Sa),
        "effective_rank_b": _entropy_rank(Sb),
        "subspace_similarity": torch.where(k > 0, phi, torch.zeros_like(phi)),
    }
