"""What a publish would store (`deltahub publish --dry-run`), and which versions already hold
the same content (the notice after publishing identical weights again).

`preview_publish` validates the directory exactly as `publish` does (`artifact.load_dir`,
name, version and tag rules) and hashes its files, but writes nothing: the registry and
its blob store are untouched. `same_content` finds, by the index on blob digests, the
other versions whose weights and config are byte-identical to a version's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deltahub import artifact as af
from deltahub.errors import AlreadyExists
from deltahub.manifest import portable_base_id
from deltahub.registry.refs import check_name, check_tag, check_version
from deltahub.registry.version import Version

CONTENT_FILES = (af.WEIGHTS_FILE, af.CONFIG_FILE)  # the manifest and card differ by version


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def preview_publish(
    registry: Any,
    path: Path | str,
    name: str,
    version: str | None = None,
    tags: Sequence[str] = (),
    *,
    base_model: str | None = None,
    check_finite: bool = False,
) -> dict[str, Any]:
    """What `registry.publish(path, name, version, tags, ...)` would store, as a dict.

    With `check_finite`, the weights are scanned as `publish(check_finite=True)` scans
    them, in the same order of checks, so a dry run refuses with the same typed error.
    """
    artifact = af.load_dir(path)
    if check_finite:
        from deltahub.tensorscan import check_finite as scan_finite

        scan_finite(artifact.weights_path, artifact.tensors)
    check_name(name)
    for tag in tags:
        check_tag(tag)
    if version is not None:
        check_version(str(version))
        if registry._row(name, str(version)) is not None:
            raise AlreadyExists(f"{name}@{version} exists; versions are immutable: choose another --version")
    files = {}
    for fname, src in sorted(artifact.files.items()):
        digest = _sha256(Path(src))
        files[fname] = {
            "digest": digest,
            "size": Path(src).stat().st_size,
            "stored": registry.store.has(digest),
        }
    manifest = artifact.manifest
    recorded_base = base_model or (
        manifest.base_model if manifest else portable_base_id(artifact.config.get("base_model_name_or_path"))
    )
    same = same_content_files({f: d["digest"] for f, d in files.items()}, registry)
    return {
        "name": name,
        "version": str(version) if version is not None else registry._next_int_version(name),
        "tags": ["latest", *tags],
        "method": artifact.method,
        "base_model": recorded_base,
        "tensors": len(artifact.tensors),
        "checked_finite": check_finite,
        "files": files,
        "bytes_new": sum(d["size"] for d in files.values() if not d["stored"]),
        "same_content_as": [v.ref for v in same],
    }


def same_content_files(files: dict[str, str], registry: Any, exclude: int | None = None) -> list[Version]:
    """Versions whose weights and config have exactly these blob digests."""
    weights, config = files.get(af.WEIGHTS_FILE), files.get(af.CONFIG_FILE)
    if weights is None:
        return []
    rows = registry._query(
        "select versions.* from files w join versions on versions.id = w.version_id "
        "join files c on c.version_id = w.version_id and c.filename = ? "
        "where w.filename = ? and w.blob = ? and c.blob is ? and versions.id is not ? "
        "order by versions.full_name, versions.seq limit 20",
        [af.CONFIG_FILE, af.WEIGHTS_FILE, weights, config, exclude],
    )
    return registry._versions(rows)


def same_content(registry: Any, version: Version) -> list[Version]:
    """Other versions byte-identical to `version` in weights and config."""
    return same_content_files(version.files, registry, exclude=version.id)
