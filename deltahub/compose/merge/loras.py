"""`merge_loras`: merge PEFT LoRAs given as (config, tensors); pure, no registry.

Checks the options, splits each adapter into modules (`peft_format`), groups modules
that have the same shapes and the same adapters present, and merges each group as one
batch with the chosen method: `exact` (cat, svd) or `peft_methods` (linear, ties,
dare_linear, dare_ties). Batching is most of the speed: on a busy 2-core machine every
threaded op pays ~10 ms of scheduler latency, so one op per group instead of one per
module. A module that only some adapters target is merged from those that have it (a
missing adapter contributes a zero delta).

DoRA (Liu et al. 2024) keeps a magnitude vector m tied to its own direction
W + s B A, and there is no exact way to combine the magnitudes of several adapters.
So a DoRA adapter may be merged only alone: its magnitude is kept and the method acts
on the direction update (a weight-1.0 merge reproduces the adapter exactly). Several
DoRA adapters, or DoRA mixed with plain LoRA, raise `Unsupported`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from deltahub.compose.merge.exact import stacked
from deltahub.compose.merge.peft_format import A_SUFFIX, B_SUFFIX, M_SUFFIX, lora_modules, output_config
from deltahub.compose.merge.peft_methods import same_rank
from deltahub.errors import IncompatibleBase, InvalidConfig, Unsupported

Progress = Callable[[Iterable[Any], int], Iterable[Any]]  # (items, count) -> the same items
Method = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")


def check_options(
    n: int,
    method: str,
    weights: Sequence[float] | None,
    density: float | None,
    rank: int | None,
    majority_sign_method: str,
) -> list[float]:
    if n == 0:
        raise InvalidConfig("merge needs at least one adapter")
    if method not in METHODS:
        raise InvalidConfig(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    weights = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(weights) != n:
        raise InvalidConfig(f"got {len(weights)} weights for {n} adapters; give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise InvalidConfig(f"weights must be finite numbers, got {weights}")
    if method in DENSITY_METHODS:
        if density is None:
            raise InvalidConfig(f"method {method} needs a density in (0, 1] (the fraction of entries kept)")
        if not (0.0 < density <= 1.0):
            raise InvalidConfig(f"density must be in (0, 1], got {density}")
    elif density is not None:
        raise InvalidConfig(f"density applies only to {', '.join(DENSITY_METHODS)}, not {method}")
    if rank is not None and (method != "svd"):
        raise InvalidConfig(f"rank applies only to svd (cat keeps the sum of ranks; {method} keeps the rank)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise InvalidConfig(f"rank must be a positive integer, got {rank!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise InvalidConfig(
            f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}"
        )
    return weights


def merge_loras(
    loras: Sequence[tuple[Mapping[str, Any], Mapping[str, Tensor]]],
    method: Method | str = "linear",
    weights: Sequence[float] | None = None,
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    majority_sign_method: str = "total",
    progress: Progress | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Merge PEFT LoRAs given as (adapter_config dict, state dict); return (tensors, config).

    `weights` defaults to 1.0 each (the plain sum). `density` (ties, dare_*) is the
    fraction of factor entries kept. `rank` (svd) defaults to the largest input rank.
    Module shapes must agree (`IncompatibleBase`). `progress`, if given, wraps the loop
    over groups of same-shaped modules (a CLI progress bar). See the module docstring for the math.
    """
    weights = check_options(len(loras), method, weights, density, rank, majority_sign_method)
    configs = [c for c, _ in loras]
    parsed = [lora_modules(c, t) for c, t in loras]
    dora = [bool(c.get("use_dora", False)) for c in configs]
    if any(dora) and len(loras) > 1:
        raise Unsupported(
            "DoRA adapters can be merged only one at a time: each magnitude vector belongs to its "
            "own direction W + s*B*A, so several cannot be combined exactly "
            "(merge the plain LoRA adapters, or use Sum at run time)"
        )
    if rank is None and method == "svd":
        rank = max(m.rank for p in parsed for m in p.values())
    dtypes = {m.B.dtype for p in parsed for m in p.values()} | {m.A.dtype for p in parsed for m in p.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32

    groups: dict[tuple[tuple[int, ...], tuple[int, int], tuple[int, ...]], list[str]] = {}
    for module in sorted({name for p in parsed for name in p}):
        present = tuple(i for i, p in enumerate(parsed) if module in p)
        shapes = {parsed[i][module].shape for i in present}
        if len(shapes) > 1:
            raise IncompatibleBase(
                f"module {module} has different shapes across adapters ({sorted(shapes)}); "
                "the adapters were trained on different base models"
            )
        module_ranks = tuple(parsed[i][module].rank for i in present)
        if method in SAME_RANK_METHODS and len(set(module_ranks)) != 1:
            raise Unsupported(
                f"{method} needs equal ranks, but module {module} has ranks {sorted(set(module_ranks))}; "
                "use --method cat (exact) or svd (exact low rank) instead"
            )
        groups.setdefault((present, shapes.pop(), module_ranks), []).append(module)

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    items = list(groups.items())
    for (present, _, _), names in progress(items, len(items)) if progress else items:
        coeffs = torch.tensor(
            [[weights[i] * parsed[i][m].scaling for i in present] for m in names], dtype=torch.float64
        )  # (G, n): c = w * s
        rows = [[parsed[i][m] for i in present] for m in names]
        if method in ("cat", "svd"):
            B, A = stacked(method, coeffs, rows, rank)
        else:
            B, A = same_rank(method, coeffs, rows, density, generator, majority_sign_method)
        for g, module in enumerate(names):
            tensors[module + A_SUFFIX] = A[g].to(dtype).contiguous()
            tensors[module + B_SUFFIX] = B[g].to(dtype).contiguous()
            magnitude = parsed[present[0]][module].magnitude
            if magnitude is not None:
                tensors[module + M_SUFFIX] = magnitude.clone().contiguous()
            ranks[module] = A.shape[1]
    return tensors, output_config(configs, ranks, use_dora=any(dora))
