"""`merge_adapters`: merge registry LoRA adapters into a new published version.

Resolves the refs, refuses adapters made for different bases, reads the tensors, merges
the LoRA deltas with `merge_loras`, and publishes the result with each input pinned by
digest as a parent (role "merge") and the method and its options under `extra["merge"]`.

Task heads (`deltahub train` for classification) are not deltas of the base, so they are
not merged as factors. When every input has a head with the same labels, pooling and
shape, the result keeps one: the head itself when they are all identical, else their
average weighted by the merge weights (normalized to sum 1; the plain mean when the
weights cancel). Otherwise the result has no head, and `extra["merge"]["task_head"]`
says why (the CLI prints it as a warning).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from deltahub import artifact as af
from deltahub.compose.merge.loras import Method, Progress, check_options, merge_loras
from deltahub.compose.merge.peft_format import load_tensors
from deltahub.errors import IncompatibleBase, InvalidConfig, Unsupported

if TYPE_CHECKING:
    from deltahub.registry import Registry, Version


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
    weights = check_options(len(refs), method, weights, density, rank, majority_sign_method)
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
    loaded = [load_tensors(a) for a in artifacts]
    heads = [{k: t for k, t in ts.items() if k.startswith(af.TASK_HEAD_PREFIX)} for ts in loaded]
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
    extra: dict[str, Any] = {"merge": options}
    if any(heads):
        head, info, note = merged_head(versions, artifacts, heads, weights)
        options["task_head"] = note
        if head:
            tensors = {**tensors, **head}
            extra["head"] = info
    base_model = next((v.base_model for v in versions if v.base_model), None)
    if base_model and not config.get("base_model_name_or_path"):
        config = {**config, "base_model_name_or_path": base_model}  # PEFT users see the base
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
            extra=extra,
        )


def merged_head(
    versions: Sequence[Version],
    artifacts: Sequence[af.Artifact],
    heads: Sequence[dict[str, torch.Tensor]],
    weights: Sequence[float],
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None, str]:
    """The task head a merge keeps (tensors, manifest `extra["head"]`), and a note saying
    what happened to the inputs' heads."""
    infos = [(a.manifest.extra.get("head") if a.manifest else None) or {} for a in artifacts]
    missing = [v.ref for v, h, i in zip(versions, heads, infos, strict=True) if not h or not i]
    if missing:
        return None, None, f"dropped: {', '.join(missing)} has no task head, so the inputs do not share one"
    first = infos[0]
    for v, info, head in zip(versions[1:], infos[1:], heads[1:], strict=True):
        if info.get("labels") != first.get("labels") or info.get("pooling") != first.get("pooling"):
            return (
                None,
                None,
                (
                    f"dropped: {versions[0].ref} and {v.ref} classify into different labels or pool differently "
                    f"({first.get('labels')} / {first.get('pooling')} vs {info.get('labels')} / {info.get('pooling')})"
                ),
            )
        if set(head) != set(heads[0]) or any(head[k].shape != heads[0][k].shape for k in head):
            return None, None, f"dropped: the heads of {versions[0].ref} and {v.ref} differ in shape"
    if all(torch.equal(h[k], heads[0][k]) for h in heads[1:] for k in h):
        return dict(heads[0]), first, f"kept: the heads of all inputs are identical ({first.get('labels')})"
    total = float(sum(weights))
    norm = [w / total for w in weights] if abs(total) > 1e-12 else [1.0 / len(weights)] * len(weights)
    averaged = {
        k: sum(n * h[k].to(torch.float32) for n, h in zip(norm, heads, strict=True)).to(heads[0][k].dtype)
        for k in heads[0]
    }
    return averaged, first, f"averaged: the heads share labels {first.get('labels')}; weights {norm}"
