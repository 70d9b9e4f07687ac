"""`merge_adapters`: merge registry LoRA adapters into a new published version.

Resolves the refs, refuses adapters made for different bases, reads the tensors (task
heads are left out: they are not deltas of the base), merges with `merge_loras`, and
publishes the result with each input pinned by digest as a parent (role "merge") and the
method and its options under `extra["merge"]`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

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
