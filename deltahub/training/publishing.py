"""Publishing what training made: checks before training, writing and publishing the
artifact, and the data description recorded in the manifest."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from deltahub import artifact as af
from deltahub.errors import AlreadyExists, NotFound
from deltahub.training.data import Dataset


def check_publishable(registry: Any, name: str, version: str | None, tags: Sequence[str]) -> None:
    """Refuse, before any training, what the publish at the end would refuse: a bad name,
    version or tag, or (given the `registry` to publish to) a version that exists already."""
    from deltahub.registry.refs import check_name, check_tag, check_version

    check_name(name)
    if version is not None:
        check_version(str(version))
    for tag in tags:
        check_tag(tag)
    if version is None or registry is None:
        return
    try:
        registry.resolve(f"{name}@{version}")
    except NotFound:
        return
    raise AlreadyExists(
        f"{name}@{version} already exists; versions are immutable (train without a version for the "
        "next number, or pick a new one)"
    )


def publish_artifact(
    tensors: dict[str, Tensor],
    config: dict[str, Any],
    manifest: af.Manifest,
    registry: Any,
    publish: bool,
    output_dir: str | Path | None,
    version: str | None,
    tags: Sequence[str],
) -> tuple[Any, Path | None]:
    """Write the artifact to `output_dir` (a fresh temporary directory when not publishing
    and none is given) and/or publish it; returns (version or None, directory or None)."""
    if output_dir is not None or not publish:
        path = Path(output_dir or tempfile.mkdtemp(prefix="deltahub-adapter-"))
        af.write_dir(path, tensors, config, manifest)
        if not publish:
            return None, path
        return registry_or_default(registry).publish(path, manifest.name, version=version, tags=tags), path
    with tempfile.TemporaryDirectory(prefix="deltahub-publish-") as tmp:
        af.write_dir(tmp, tensors, config, manifest)
        return registry_or_default(registry).publish(tmp, manifest.name, version=version, tags=tags), None


def registry_or_default(registry: Any) -> Any:
    if registry is not None:
        return registry
    from deltahub.registry import Registry

    return Registry()


def data_extra(train_ds: Dataset, eval_ds: Dataset | None) -> dict[str, Any]:
    data = {"train": train_ds.describe()}
    if eval_ds is not None:
        data["eval"] = eval_ds.describe()
    return data
