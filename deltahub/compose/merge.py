"""LoRA delta arithmetic that produces a new LoRA artifact: linear, cat, svd, ties, dare.

Each input adapter i updates a module by  dW_i = s_i B_i A_i,  B_i (d_out, r_i),
A_i (r_i, d_in), with s_i = lora_alpha / r_i (rsLoRA: lora_alpha / sqrt(r_i); both
per module through rank_pattern / alpha_pattern). Given weights w_i (negative allowed:
task negation, Ilharco et al. 2023), the methods are:

    cat     exact.  B = [w_1 s_1 B_1, ..., w_n s_n B_n], A = [A_1; ...; A_n];
            B A = sum_i w_i s_i B_i A_i, rank = sum_i r_i.
    svd     exact low-rank re-factorization of the same sum to `rank` columns from the
            stacked factors alone (R = sum r_i): a QR of the stack, done as CholeskyQR
            when well conditioned, then an eigendecomposition / SVD of the small R x R
            core (`low_rank_sum`, falling back to `compose.lowrank`), never a
            d_out x d_in matrix. At rank >= R it is exact; below, it is the best rank-k
            approximation in Frobenius norm (Eckart-Young).
    linear  PEFT's `add_weighted_adapter(combination_type="linear")`:
            A = sum_i sgn(c_i) sqrt|c_i| A_i,  B = sum_i sqrt|c_i| B_i,  c_i = w_i s_i.
            Equal ranks required. NOT the sum of the deltas: B A has cross terms
            B_i A_j (i != j); it is cheap and keeps the rank, nothing more.
    ties    TIES-merging (Yadav et al. 2023) applied to the A's and the B's separately
            with the same sqrt split of c_i, as PEFT does for LoRA: keep the top
            `density` fraction of each factor by magnitude, elect a sign per entry
            ("total": sign of the sum; "frequency": sign of the count), average the
            weighted entries that agree with it.
    dare_*  DARE (Yu et al. 2024): drop each entry with probability 1 - density and
            rescale by 1 / density, then a linear sum (dare_linear) or the TIES sign
            election and disjoint mean (dare_ties). Drops come from a torch.Generator
            seeded with `seed`, so a merge is reproducible.

The merged adapter folds every factor scaling into its B, so its config has
lora_alpha = r (and alpha_pattern mirroring rank_pattern): scaling 1, no rsLoRA.
A module that only some adapters target is merged from those that have it (a missing
adapter contributes a zero delta).

DoRA (Liu et al. 2024) keeps a magnitude vector m tied to its own direction
W + s B A, and there is no exact way to combine the magnitudes of several adapters.
So a DoRA adapter may be merged only alone: its magnitude is kept and the method acts
on the direction update (a weight-1.0 merge reproduces the adapter exactly). Several
DoRA adapters, or DoRA mixed with plain LoRA, raise `Unsupported`.

Two layers: `merge_loras` is pure (configs + tensors in, tensors + config out);
`merge_adapters` resolves registry refs, checks the bases, and publishes the result
with its parents pinned by digest.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from deltahub import artifact as af
from deltahub.compose import lowrank
from deltahub.errors import IncompatibleBase, InvalidConfig, Unsupported

if TYPE_CHECKING:
    from deltahub.registry import Registry, Version

Progress = Callable[[Iterable[Any], int], Iterable[Any]]  # (items, count) -> the same items
Method = Literal["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]
METHODS: tuple[str, ...] = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
SIGN_METHODS = ("total", "frequency")

PEFT_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX, M_SUFFIX = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"

# Config features that change what the factors mean; merging them would be silently wrong.
_UNSUPPORTED_FEATURES = {
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "modules_to_save": "modules_to_save (fully trained modules cannot be merged as deltas)",
    "trainable_token_indices": "trainable tokens",
}
_MUST_AGREE = ("layers_to_transform", "layers_pattern", "exclude_modules", "fan_in_fan_out")


@dataclass
class LoraModule:
    """One adapted module of one adapter: dW = scaling * B @ A (DoRA: plus `magnitude`)."""

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scaling: float
    magnitude: Tensor | None = None  # (d_out,), DoRA only

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]


def peft_key(module: str) -> str:
    """The module's name inside the base model, which PEFT matches patterns against."""
    return module.removeprefix(PEFT_PREFIX)


def lora_modules(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, LoraModule]:
    """Split a PEFT LoRA state dict into modules, each with its scaling s = alpha / r."""
    for key, what in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise Unsupported(f"cannot merge an adapter that uses {what} ({key}={config[key]!r})")
    parts: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        for suffix, slot in ((A_SUFFIX, "A"), (B_SUFFIX, "B"), (M_SUFFIX, "m"), (M_SUFFIX + ".weight", "m")):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[slot] = t
                break
        else:
            raise Unsupported(
                f"tensor {name!r} is not a lora_A/lora_B weight or DoRA magnitude; merge handles "
                "LoRA on linear layers only (not embeddings, convolutions, biases or saved modules)"
            )
    out: dict[str, LoraModule] = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise Unsupported(f"module {module} lacks its lora_A or lora_B weight")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise Unsupported(
                f"module {module}: lora_A {list(A.shape)} / lora_B {list(B.shape)} are not 2-D "
                "factors of one rank; only linear-layer LoRA can be merged"
            )
        r = A.shape[0]
        scaling = af.lora_scaling(dict(config), peft_key(module), r)
        out[module] = LoraModule(A=A, B=B, scaling=scaling, magnitude=p.get("m"))
    return out


# --------------------------------------------------------------------------- kernels
# Modules with the same shapes and the same adapters present are merged as one batch
# (leading dim G): on a busy 2-core machine every threaded op pays ~10 ms of scheduler
# latency, so one op per group instead of one per module is most of the speed.
# Factor stacks are X (G, n, ...): group, adapter, factor dims.


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


def _merge_group(
    method: str,
    coeffs: Tensor,
    modules: list[list[LoraModule]],
    rank: int | None,
    density: float | None,
    generator: torch.Generator,
    majority_sign_method: str,
) -> tuple[Tensor, Tensor]:
    """Merged (B (G, d_out, r'), A (G, r', d_in)), scaling 1, float32.

    `modules[g][j]` is adapter j's factors at module g (same shapes down each column) and
    `coeffs` (G, n) float64 its c = w * s. Factors are copied straight into one
    preallocated stack: fresh large allocations page-fault, and that dominated here.
    """
    G, n = coeffs.shape
    first = modules[0]
    d_out, d_in, ranks = first[0].shape[0], first[0].shape[1], [m.rank for m in first]
    if method in ("cat", "svd"):
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
    r = ranks[0]
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


# --------------------------------------------------------------------------- configs


def _check_options(
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


def _target_modules_union(configs: Sequence[Mapping[str, Any]]) -> str | list[str]:
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(t, list) for t in targets):
        return sorted({x for t in targets for x in t})  # type: ignore[union-attr]
    # A regex somewhere: PEFT full-matches a string; a list matches a dotted suffix.
    alternatives = []
    for t in targets:
        if isinstance(t, str):
            alternatives.append(f"({t})")
        elif t:
            alternatives.append(rf"((.*\.)?({'|'.join(re.escape(x) for x in t)}))")
    return "|".join(dict.fromkeys(alternatives))


def _output_config(
    configs: Sequence[Mapping[str, Any]], ranks: Mapping[str, int], use_dora: bool
) -> dict[str, Any]:
    """A PEFT LoraConfig dict whose scaling is 1 everywhere (factor scalings are folded in)."""
    for key in _MUST_AGREE:
        values = {repr(c.get(key)) for c in configs}
        if len(values) > 1:
            raise Unsupported(f"the adapters disagree on {key} ({', '.join(sorted(values))}); cannot merge")
    r = max(ranks.values())
    config = dict(configs[0])
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=r,
        use_rslora=False,
        use_dora=use_dora,
        init_lora_weights=True,
        target_modules=_target_modules_union(configs),
        # Exact escaped names, so a pattern can only ever match its own module.
        rank_pattern={re.escape(peft_key(m)): k for m, k in sorted(ranks.items()) if k != r},
        alpha_pattern={re.escape(peft_key(m)): k for m, k in sorted(ranks.items()) if k != r},
    )
    return config


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
    weights = _check_options(len(loras), method, weights, density, rank, majority_sign_method)
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
        B, A = _merge_group(method, coeffs, rows, rank, density, generator, majority_sign_method)
        for g, module in enumerate(names):
            tensors[module + A_SUFFIX] = A[g].to(dtype).contiguous()
            tensors[module + B_SUFFIX] = B[g].to(dtype).contiguous()
            magnitude = parsed[present[0]][module].magnitude
            if magnitude is not None:
                tensors[module + M_SUFFIX] = magnitude.clone().contiguous()
            ranks[module] = A.shape[1]
    return tensors, _output_config(configs, ranks, use_dora=any(dora))


# --------------------------------------------------------------------------- registry


def load_tensors(artifact: af.Artifact) -> dict[str, Tensor]:
    """All tensors of an artifact, read through safetensors (memory-mapped file)."""
    from safetensors import safe_open

    with safe_open(str(artifact.weights_path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def merge_adapters(
    refs: Sequence[str],
    method: Method | str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    rank: int | None = None,
    name: str | None = None,
    version: str | None = None,
    registry: Registry | None = None,
    seed: int = 0,
    majority_sign_method: str = "total",
    *,
    tags: Sequence[str] = (),
    description: str | None = None,
    progress: Progress | None = None,
) -> Version:
    """Merge registry LoRA adapters into a new published version named `name`.

    The result's manifest pins each input as `Parent(ref, digest, role="merge")` and
    records the method and its options under `extra["merge"]`. Adapters whose manifests
    carry different base fingerprints are refused with `IncompatibleBase`.
    """
    from deltahub.registry import Registry

    if not name:
        raise InvalidConfig("merge_adapters needs name=... for the merged adapter")
    refs = list(refs)
    weights = _check_options(len(refs), method, weights, density, rank, majority_sign_method)
    registry = registry or Registry()
    versions = [registry.resolve(ref) for ref in refs]
    for v in versions:
        if v.method != "lora":
            raise Unsupported(f"{v.ref} is a {v.method} adapter; merge combines LoRA adapters only")
    fingerprints = {v.base_fingerprint for v in versions if v.base_fingerprint}
    if len(fingerprints) > 1:
        listing = ", ".join(f"{v.ref}: {v.base_fingerprint}" for v in versions if v.base_fingerprint)
        raise IncompatibleBase(
            f"the adapters were made for different bases ({listing}); merge same-base adapters"
        )
    artifacts = [registry.open(v) for v in versions]
    # Task heads (deltahub train) are not deltas of the base: the merge leaves them out.
    loaded = [load_tensors(a) for a in artifacts]
    heads = any(k.startswith(af.TASK_HEAD_PREFIX) for t in loaded for k in t)
    loaded = [{k: t for k, t in ts.items() if not k.startswith(af.TASK_HEAD_PREFIX)} for ts in loaded]
    tensors, config = merge_loras(
        [(a.config, ts) for a, ts in zip(artifacts, loaded, strict=True)],
        method,
        weights,
        density=density,
        rank=rank,
        seed=seed,
        majority_sign_method=majority_sign_method,
        progress=progress,
    )
    options = {
        "method": method,
        "weights": weights,
        "density": density,
        "rank": config["r"] if method == "svd" else rank,
        "seed": seed,
    }
    if method in ("ties", "dare_ties"):
        options["majority_sign_method"] = majority_sign_method
    if heads:
        options["task_heads"] = "dropped: a merge combines LoRA deltas only"
    base_model = next((v.base_model for v in versions if v.base_model), None)
    with tempfile.TemporaryDirectory(prefix="deltahub-merge-") as tmp:
        af.write_dir(tmp, tensors, config)
        return registry.publish(
            tmp,
            name,
            version,
            tags,
            description=description or f"{method} merge of {', '.join(v.ref for v in versions)}",
            base_model=base_model,
            base_fingerprint=next(iter(fingerprints), None),
            parents=[af.Parent(v.ref, v.digest, role="merge") for v in versions],
            extra={"merge": options},
        )
