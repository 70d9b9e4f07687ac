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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from deltahub import artifact as af
from deltahub.compose import lowrank
from deltahub.errors import IncompatibleBase, InvalidConfig, Unsupported

if TYPE_CHECKING:
    from deltahub.registry import Registry, Version

Progress = Callable[[Iterable[str], int], Iterable[str]]  # (modules, count) -> same modules
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


def _pattern_lookup(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first pattern that matches a dotted suffix of the key.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


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
    use_rslora = bool(config.get("use_rslora", False))
    alpha0 = float(config["lora_alpha"])
    alpha_pattern = config.get("alpha_pattern") or {}
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
        alpha = float(_pattern_lookup(alpha_pattern, peft_key(module), alpha0))
        scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        out[module] = LoraModule(A=A, B=B, scaling=scaling, magnitude=p.get("m"))
    return out


# --------------------------------------------------------------------------- kernels
# Each takes the factors of the adapters present at one module stacked on dim 0.


def _magnitude_prune(X: Tensor, density: float) -> Tensor:
    """Keep the top int(density * numel) entries by |value| of each X[i] (PEFT's rule)."""
    if density >= 1.0:
        return X
    flat = X.reshape(X.shape[0], -1)  # (n, numel)
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
    sign = X.sign()  # (n, ...)
    votes = X.sum(0) if majority_sign_method == "total" else sign.sum(0)
    agree = sign == torch.where(votes >= 0, 1.0, -1.0).to(X.dtype)  # zeros never agree
    weighted = X * w.view(-1, *([1] * (X.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def _combine(
    method: str,
    X: Tensor,
    w: Tensor,
    density: float | None,
    generator: torch.Generator,
    majority_sign_method: str,
) -> Tensor:
    """Combine stacked factors X (n, ...) with per-adapter weights w (n,)."""
    shape = (-1, *([1] * (X.dim() - 1)))
    if method == "linear":
        return (X * w.view(shape)).sum(0)
    assert density is not None
    if method == "ties":
        return _disjoint_sign_merge(_magnitude_prune(X, density), w, majority_sign_method)
    X = _dare_prune(X, density, generator)
    if method == "dare_linear":
        return (X * w.view(shape)).sum(0)
    return _disjoint_sign_merge(X, w, majority_sign_method)


def _merge_module(
    module: str,
    method: str,
    terms: list[tuple[float, LoraModule]],
    rank: int | None,
    density: float | None,
    generator: torch.Generator,
    majority_sign_method: str,
) -> tuple[Tensor, Tensor]:
    """(B, A) of one merged module, scaling 1, in float32 (svd computes in float64)."""
    if method == "cat":
        B = torch.cat([(w * m.scaling) * m.B.float() for w, m in terms], dim=1)  # (d_out, R)
        A = torch.cat([m.A.float() for _, m in terms], dim=0)  # (R, d_in)
        return B, A
    if method == "svd":
        assert rank is not None
        B, A = low_rank_sum([(w * m.scaling, m.B, m.A) for w, m in terms], rank)
        return B.float(), A.float()
    ranks = {m.rank for _, m in terms}
    if len(ranks) != 1:
        raise Unsupported(
            f"{method} needs equal ranks, but module {module} has ranks {sorted(ranks)}; "
            "use --method cat (exact) or svd (exact low rank) instead"
        )
    # PEFT's split of c = w * s over the two factors: the sign goes on A only.
    c = [w * m.scaling for w, m in terms]
    wA = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in c], dtype=torch.float32)
    wB = torch.tensor([math.sqrt(abs(x)) for x in c], dtype=torch.float32)
    As = torch.stack([m.A.float() for _, m in terms])  # (n, r, d_in)
    Bs = torch.stack([m.B.float() for _, m in terms])  # (n, d_out, r)
    A = _combine(method, As, wA, density, generator, majority_sign_method)
    B = _combine(method, Bs, wB, density, generator, majority_sign_method)
    return B, A


def low_rank_sum(terms: Sequence[tuple[float, Tensor, Tensor]], rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` factors (B', A') of sum_i c_i B_i A_i (Eckart-Young), in float64.

    With B = [c_1 B_1, ...] (d_out, R) and A = [A_1; ...] (R, d_in) stacked, the R factor
    of B = QR is the Cholesky factor L^T of B^T B (CholeskyQR), so B A = Q (L^T A) and the
    SVD of B A follows from the eigendecomposition of the small R x R matrix
    K = (L^T A)(L^T A)^T = Y diag(sigma^2) Y^T:

        U_k = B L^{-T} Y_k,   V_k^T = diag(1 / sigma_k) Y_k^T L^T A,
        B' = U_k diag(sqrt sigma_k),   A' = diag(sqrt sigma_k) V_k^T.

    That is two d x R x R products and one R x R eigh, with Q never formed, which is what
    makes a 16-adapter merge fast. Squaring B's condition number is harmless while it is
    moderate; when the Cholesky fails or L's diagonal spreads by more than 1e5 (a rank
    deficient stack, e.g. a - a, or R > d_out) we take `lowrank.truncate`'s Householder
    QR + core SVD path instead, which never squares it. Columns beyond the rank of the
    sum are zero, so the result always has exactly `rank` columns.
    """
    B, A = lowrank.stack(terms)  # (d_out, R), (R, d_in), float64
    L, info = torch.linalg.cholesky_ex(B.T @ B)  # (R, R), B^T B = L L^T
    diag = L.diagonal()
    if int(info) != 0 or not bool(diag.min() > diag.max() * 1e-5):
        return lowrank.truncate(B, A, rank)
    LtA = L.T @ A  # (R, d_in)
    lam, Y = torch.linalg.eigh(LtA @ LtA.T)  # ascending
    k = min(rank, lam.numel())
    sigma = lam.flip(0)[:k].clamp(min=0).sqrt()  # (k,), descending
    Y = Y.flip(1)[:, :k]  # (R, k)
    live = sigma > sigma[0] * 1e-12  # directions the sum actually has
    root = torch.where(live, sigma.sqrt(), torch.zeros_like(sigma))
    inv_root = torch.where(live, 1 / sigma.clamp(min=1e-300).sqrt(), torch.zeros_like(sigma))
    Bk = (B @ torch.linalg.solve_triangular(L.T, Y, upper=True)) * root  # (d_out, k)
    Ak = inv_root[:, None] * (Y.T @ LtA)  # (k, d_in)
    if k < rank:
        Bk = torch.cat([Bk, Bk.new_zeros(Bk.shape[0], rank - k)], dim=1)
        Ak = torch.cat([Ak, Ak.new_zeros(rank - k, Ak.shape[1])], dim=0)
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
    over modules (a CLI progress bar). See the module docstring for the math.
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

    modules = sorted({name for p in parsed for name in p})
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for module in progress(modules, len(modules)) if progress else modules:
        terms = [(w, p[module]) for w, p in zip(weights, parsed, strict=True) if module in p]
        shapes = {m.shape for _, m in terms}
        if len(shapes) > 1:
            raise IncompatibleBase(
                f"module {module} has different shapes across adapters ({sorted(shapes)}); "
                "the adapters were trained on different base models"
            )
        B, A = _merge_module(module, method, terms, rank, density, generator, majority_sign_method)
        tensors[module + A_SUFFIX] = A.to(dtype).contiguous()
        tensors[module + B_SUFFIX] = B.to(dtype).contiguous()
        magnitude = terms[0][1].magnitude
        if magnitude is not None:
            tensors[module + M_SUFFIX] = magnitude.clone().contiguous()
        ranks[module] = A.shape[0]
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
    tensors, config = merge_loras(
        [(a.config, load_tensors(a)) for a in artifacts],
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
