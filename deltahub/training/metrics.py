"""Scores for `deltahub eval` beyond accuracy, in numpy (no scipy, no sklearn).

Regression, over the N x K predicted values y^ and gold values y (all N*K pairs):

    MSE = mean (y^ - y)^2        MAE = mean |y^ - y|
    Pearson r = cov(y^, y) / (std(y^) std(y))
    Spearman rho = Pearson r of the ranks (ties share their average rank, as scipy's
    `rankdata(method="average")`)

A correlation over a constant side is undefined: None (never NaN, which JSON refuses).

Multi-label, over N x K boolean predictions P and gold G:

    F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k)      micro: the same over all cells pooled
    macro-F1 = mean_k F1_k                       exact match = mean_i [P_i == G_i]

A label that neither side ever turns on has no F1 (0 / 0); we count it 1.0, as the
trainer's micro-F1 does (both sides agree it is absent). sklearn counts it 0.0.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` (1-D), ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):  # one pass over runs of equal values
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0  # mean of start+1 .. end
            start = end
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64).ravel() - np.mean(a)
    b = np.asarray(b, dtype=np.float64).ravel() - np.mean(b)
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if len(a) < 2 or denom == 0.0:
        return None
    return float((a * b).sum() / denom)


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return pearson(rank_average(a), rank_average(b))


def regression_metrics(predicted: Any, gold: Any) -> dict[str, float | None]:
    """MSE, MAE, Pearson and Spearman of `predicted` against `gold` (same shape)."""
    p = np.asarray(predicted, dtype=np.float64)
    g = np.asarray(gold, dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f"predicted shape {p.shape} differs from gold shape {g.shape}")
    diff = p - g
    return {
        "mse": float((diff**2).mean()),
        "mae": float(np.abs(diff).mean()),
        "pearson": pearson(p, g),
        "spearman": spearman(p, g),
    }


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 1.0


def multi_label_metrics(predicted: Any, gold: Any) -> dict[str, float]:
    """Micro-F1, macro-F1 and exact-match accuracy of boolean `predicted` (N, K) against `gold`."""
    p = np.asarray(predicted, dtype=bool)
    g = np.asarray(gold, dtype=bool)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"predicted shape {p.shape} and gold shape {g.shape} must be the same (N, K)")
    tp = (p & g).sum(0).astype(np.float64)  # (K,)
    fp = (p & ~g).sum(0).astype(np.float64)
    fn = (~p & g).sum(0).astype(np.float64)
    return {
        "f1_micro": _f1(float(tp.sum()), float(fp.sum()), float(fn.sum())),
        "f1_macro": float(np.mean([_f1(*cell) for cell in zip(tp, fp, fn, strict=True)])),
        "exact_match": float((p == g).all(1).mean()),
    }
