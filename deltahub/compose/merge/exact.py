"""Exact merges in factor space: cat and svd.

With c_i = w_i s_i (weight times the adapter's scaling), the sum of the deltas is
B A = sum_i c_i B_i A_i for the stacked factors B = [c_1 B_1, ..., c_n B_n] and
A = [A_1; ...; A_n] (R = sum_i r_i columns):

    cat     exact.  The stack itself: rank R.
    svd     exact low-rank re-factorization of the same sum to `rank` columns from the
            stacked factors alone: a QR of the stack, done as CholeskyQR when well
            conditioned, then an eigendecomposition / SVD of the small R x R core
            (`low_rank_sum`, falling back to `compose.lowrank`), never a d_out x d_in
            matrix. At rank >= R it is exact; below, it is the best rank-k
            approximation in Frobenius norm (Eckart-Young).

Modules of one shape with the same adapters present are merged as one batch (leading
dim G), see `deltahub.compose.merge.loras`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from deltahub.compose import lowrank
from deltahub.compose.merge.peft_format import LoraModule


def stacked(
    method: str, coeffs: Tensor, modules: list[list[LoraModule]], rank: int | None
) -> tuple[Tensor, Tensor]:
    """cat / svd of a group: merged (B (G, d_out, r'), A (G, r', d_in)), scaling 1, float32.

    `modules[g][j]` is adapter j's factors at module g (same shapes down each column) and
    `coeffs` (G, n) float64 its c = w * s. Factors are copied straight into one
    preallocated stack: fresh large allocations page-fault, and that dominated here.
    """
    G = coeffs.shape[0]
    first = modules[0]
    d_out, d_in, ranks = first[0].shape[0], first[0].shape[1], [m.rank for m in first]
    dtype = torch.float64 if method == "svd" else torch.float32
    B = torch.empty(G, d_out, sum(ranks), dtype=dtype)  # [c_1 B_1, ..., c_n B_n]
    A = torch.empty(G, sum(ranks), d_in, dtype=dtype)  # [A_1; ...; A_n]
    for g, row in enumerate(modules):
        off = 0
        for j, m in enumerate(row):
            B[g, :, off : off + m.rank].copy_(m.B).mul_(float(coeffs[g, j]))
            A[g, off : off + m.rank].copy_(m.A)
            off += m.rank
    if method == "cat":
        return B, A
    assert rank is not None
    B, A = low_rank_sum(B, A, rank)
    return B.float(), A.float()


@contextmanager
def _serial() -> Iterator[None]:
    """Run LAPACK on the small R x R problems on one thread.

    Threads buy nothing at R of a few hundred, and torch's threaded eigh at that size was
    measured ~500x slower (4.5 s vs 7 ms for a 256 x 256 eigh, 2 threads, on a loaded
    2-core machine): the workers wait at barriers while preempted.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def low_rank_sum(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors (B', A') of B @ A (Eckart-Young), float64, batched.

    B (..., d_out, R), A (..., R, d_in) are stacked factors, e.g. from `lowrank.stack`:
    B = [c_1 B_1, ..., c_n B_n], A = [A_1; ...; A_n]. The R factor of B = QR is the
    Cholesky factor L^T of B^T B (CholeskyQR), so B A = Q (L^T A) and the SVD of B A
    follows from the eigendecomposition of the small R x R matrix
    K = (L^T A)(L^T A)^T = Y diag(sigma^2) Y^T:

        U_k = B L^{-T} Y_k,   V_k^T = diag(1 / sigma_k) Y_k^T L^T A,
        B' = U_k diag(sqrt sigma_k),   A' = diag(sqrt sigma_k) V_k^T.

    That is a few d x R x R products and one R x R eigh, with Q never formed. Squaring
    B's condition number is harmless while it is moderate; where the Cholesky fails or
    L's diagonal spreads by more than 1e5 (a rank-deficient stack, e.g. a - a, or
    R > d_out) that matrix takes `lowrank.truncate`'s Householder QR + core SVD path,
    which never squares it. Columns beyond the rank of the sum are zero, so the result
    always has exactly `rank` columns.
    """
    if B.dim() == 2:
        Bk, Ak = low_rank_sum(B[None], A[None], rank)
        return Bk[0], Ak[0]
    B, A = B.double(), A.double()
    with _serial():
        L, info = torch.linalg.cholesky_ex(B.mT @ B)  # (G, R, R), B^T B = L L^T
    diag = L.diagonal(dim1=-2, dim2=-1)  # (G, R)
    fast = (info == 0) & (diag.min(-1).values > diag.max(-1).values * 1e-5)
    Bk = B.new_zeros(B.shape[0], B.shape[1], rank)
    Ak = A.new_zeros(A.shape[0], rank, A.shape[2])
    for g in (~fast).nonzero().flatten().tolist():
        with _serial():
            Bk[g], Ak[g] = lowrank.truncate(B[g], A[g], rank)
    if not bool(fast.any()):
        return Bk, Ak
    idx = fast.nonzero().flatten()
    B, A, L = B[idx], A[idx], L[idx]
    LtA = L.mT @ A  # (G, R, d_in)
    with _serial():
        lam, Y = torch.linalg.eigh(LtA @ LtA.mT)  # ascending
    k = min(rank, lam.shape[-1])
    sigma = lam.flip(-1)[:, :k].clamp(min=0).sqrt()  # (G, k), descending
    Y = Y.flip(-1)[:, :, :k]  # (G, R, k)
    live = sigma > sigma[:, :1] * 1e-12  # directions the sum actually has
    root = torch.where(live, sigma.sqrt(), torch.zeros_like(sigma))
    inv_root = torch.where(live, 1 / sigma.clamp(min=1e-300).sqrt(), torch.zeros_like(sigma))
    with _serial():
        Z = torch.linalg.solve_triangular(L.mT, Y, upper=True)  # L^{-T} Y, (G, R, k)
    Bk[idx, :, :k] = (B @ Z) * root[:, None, :]  # (G, d_out, k)
    Ak[idx, :k] = inv_root[:, :, None] * (Y.mT @ LtA)  # (G, k, d_in)
    return Bk, Ak
