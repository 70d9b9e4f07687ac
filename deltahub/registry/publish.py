"""Changing the registry: publish, commit (push/pull), tag, untag, remove.

Publish protocol (a version is visible only when complete):
  1. validate the artifact (artifact.load_dir);
  2. copy each file into the blob store (hash while copying, fsync, rename, fsync dir);
  3. one `BEGIN IMMEDIATE` transaction assigns the version, writes the final manifest
     blob, inserts the version and file rows, and moves `latest` and the user's tags.
A crash before 3 commits leaves only unreferenced blobs, which `gc` removes later. `gc`
deletes only under the write lock, and step 3 re-stores any blob it finds gone, so a
publisher never loses a race with `gc`, whatever its grace period.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from deltahub import artifact as af
from deltahub.errors import (
    AlreadyExists,
    DeltahubError,
    IntegrityError,
    InUse,
    InvalidArtifact,
    InvalidRef,
    NotFound,
)
from deltahub.manifest import portable_base_id
from deltahub.registry.db import write_transaction
from deltahub.registry.queries import Queries
from deltahub.registry.refs import Ref, check_name, check_tag, check_version
from deltahub.registry.version import Version, version_key

MAX_VNUM_DIGITS = 18  # integer versions up to this length get `vnum` (fits SQLite's int64)


def int_version(version: str) -> int | None:
    """The version as an integer when it is one (orders `latest`, numbers the next publish)."""
    return int(version) if version.isdigit() and len(version) <= MAX_VNUM_DIGITS else None


class Writes(Queries):
    """The write side of `Registry`."""

    def publish(
        self,
        path: Path | str | af.Artifact,
        name: str,
        version: str | None = None,
        tags: Sequence[str] = (),
        *,
        task: str | None = None,
        description: str | None = None,
        base_model: str | None = None,
        base_fingerprint: str | None = None,
        metrics: dict[str, float] | None = None,
        license: str | None = None,
        parents: Iterable[af.Parent | dict[str, str]] | None = None,
        extra: dict[str, Any] | None = None,
        check_finite: bool = False,
    ) -> Version:
        """Validate an artifact directory and publish it as a new immutable version.

        With `check_finite`, every floating tensor is scanned and a NaN or infinity refuses
        the publish (`InvalidArtifact` rule `tensor-non-finite`).

        Descriptive fields not given here nor in the artifact's own manifest (task,
        description, license, base model) carry over from the adapter's latest version, as
        a package's metadata does from release to release. Metrics never carry over.
        """
        if not isinstance(path, af.Artifact):
            from deltahub.interop import adapterhub_fusion as ahf

            if ahf.is_fusion_dir(path):  # an AdapterHub fusion: its constituents are published first
                return ahf.publish_fusion(
                    self, path, name, None, version=version, tags=tags, task=task, description=description,
                    base_model=base_model, base_fingerprint=base_fingerprint, metrics=metrics,
                    license=license, extra=extra,
                )  # fmt: skip
        artifact = path if isinstance(path, af.Artifact) else af.load_dir(path)
        if check_finite:
            from deltahub.tensorscan import check_finite as scan_finite

            scan_finite(artifact.weights_path, artifact.tensors)
        check_name(name)
        if version is not None:
            check_version(str(version))
            version = str(version)
        tags = [check_tag(t) for t in tags]
        manifest = artifact.manifest or af.Manifest(
            name=name,
            method=artifact.method,
            # PEFT records the path it loaded the base from: only a portable id is kept.
            base_model=portable_base_id(artifact.config.get("base_model_name_or_path")),
        )
        overrides: dict[str, Any] = {
            "task": task,
            "description": description,
            "base_model": base_model,
            "base_fingerprint": base_fingerprint,
            "license": license,
        }
        if artifact.manifest is None:
            previous = self._latest_manifest(name)
            for key in ("task", "description", "license", "base_model"):
                if overrides[key] is None and previous is not None and not getattr(manifest, key):
                    overrides[key] = getattr(previous, key)
        manifest = replace(manifest, **{k: v for k, v in overrides.items() if v is not None})
        if metrics:
            manifest.metrics = {**manifest.metrics, **metrics}
        if parents is not None:
            manifest.parents = [p if isinstance(p, af.Parent) else af.Parent(**p) for p in parents]
        if extra:
            manifest.extra = {**manifest.extra, **extra}
        manifest = af.Manifest.from_dict(manifest.to_dict())  # re-validate overrides
        for parent in manifest.parents:
            self._by_digest(parent.digest)  # a parent must be resolvable here

        from deltahub.cards import card_bytes, keeps_readme  # every version carries a card

        readme = af.README_FILE if keeps_readme(artifact.files.get(af.README_FILE)) else None
        sources = {f: src for f, src in artifact.files.items() if f not in (af.MANIFEST_FILE, af.README_FILE)}
        if readme:
            sources[readme] = artifact.files[readme]
        created: list[str] = []  # blobs this publish added: taken back if it fails
        try:
            blobs = {fname: self.store.put_file(src, created) for fname, src in sources.items()}
            with write_transaction(self.db):
                for fname, (digest, _) in blobs.items():
                    if not self.store.has(digest):  # `gc` took it before we held the lock
                        blobs[fname] = self.store.put_file(sources[fname], created)
                version = version or self._next_int_version(name)
                if self._row(name, version) is not None:
                    raise AlreadyExists(
                        f"{name}@{version} already exists; versions are immutable "
                        "(publish without --version for the next number, or pick a new one)"
                    )
                final = replace(manifest, name=name, version=version, created=af.utc_now())
                blobs[af.MANIFEST_FILE] = self.store.put_bytes(final.to_json(), created)
                if readme is None:
                    blobs[af.README_FILE] = self.store.put_bytes(card_bytes(final, artifact.config), created)
                return self._insert(final, blobs, tags)
        except BaseException:
            self._take_back(created)
            raise

    def _take_back(self, digests: list[str]) -> None:
        """Remove blobs a failed publish added, unless a version references them by now.

        Under the write lock, as gc deletes: a concurrent publisher of the same bytes either
        committed already (the blob stays) or re-stores it in its own transaction.
        """
        if not digests:
            return
        try:
            with write_transaction(self.db):
                for digest in digests:
                    if not self.db.execute("select 1 from files where blob = ? limit 1", [digest]).fetchone():
                        self.store.remove(digest)
        except (DeltahubError, OSError, sqlite3.Error):
            pass  # best effort: the original error matters more; gc reclaims what is left

    def commit(self, files: dict[str, str], tags: Sequence[str] = ()) -> Version:
        """Record a version whose blobs (including its final deltahub.json) are already stored.

        Used by push/pull: the manifest names the version. Committing the same files
        again is a no-op that returns the existing version; different files under an
        existing version raise `AlreadyExists`.
        """
        tags = [check_tag(t) for t in tags]
        missing = [d for d in files.values() if not self.store.has(d)]
        if missing:
            raise NotFound(f"blobs not in the store: {', '.join(sorted(missing))}")
        artifact = af.load_files({f: self.store.path(d) for f, d in files.items()})
        if artifact.manifest is None or artifact.manifest.version is None:
            raise InvalidArtifact(
                "manifest-schema", "a committed version needs a deltahub.json naming its version"
            )
        manifest = artifact.manifest
        check_name(manifest.name)
        check_version(manifest.version)
        digest = af.artifact_digest(files)
        try:
            blobs = {f: (d, self.store.path(d).stat().st_size) for f, d in files.items()}
        except FileNotFoundError as e:  # gc reclaimed an upload that waited past its grace
            raise NotFound(
                f"a blob of this version left the store before its commit ({e.filename}): upload it again"
            ) from None
        with write_transaction(self.db):
            row = self._row(manifest.name, manifest.version)
            if row is not None:
                if row["digest"] == digest:
                    for tag in tags:
                        self._set_tag(manifest.name, tag, row["id"])
                    return self._version(row)
                raise AlreadyExists(
                    f"{manifest.name}@{manifest.version} already exists with digest {row['digest']}, not {digest}"
                )
            current = self._latest_row(manifest.name)
            # An imported older version (pulling name@1 beside name@2) must not pull `latest` back.
            newer = current is None or version_key(manifest.version, manifest.created) >= version_key(
                current["version"], current["created"]
            )
            return self._insert(manifest, blobs, tags, move_latest=newer)

    def _insert(
        self,
        manifest: af.Manifest,
        blobs: dict[str, tuple[str, int]],
        tags: Sequence[str],
        move_latest: bool = True,
    ) -> Version:
        assert manifest.version is not None
        full_name = manifest.name
        ns, _ = check_name(full_name)
        for fname, (digest, _) in blobs.items():
            if not self.store.has(digest):  # gc took a blob of an upload before its commit
                raise IntegrityError(f"blob {digest} for {fname} vanished before commit; publish again")
        files = {fname: d for fname, (d, _) in blobs.items()}
        seq = (
            self.db.execute("select max(seq) from versions where full_name = ?", [full_name]).fetchone()[0]
            or 0
        ) + 1
        row = {
            "full_name": full_name,
            "namespace": ns or "",
            "name": full_name.rsplit("/", 1)[-1],
            "version": manifest.version,
            "seq": seq,
            "vnum": int_version(manifest.version),
            "digest": af.artifact_digest(files),
            "method": manifest.method,
            "base_model": manifest.base_model,
            "base_fingerprint": manifest.base_fingerprint,
            "task": manifest.task,
            "description": manifest.description,
            "license": manifest.license,
            "metrics": json.dumps(manifest.metrics, sort_keys=True),
            "parents": json.dumps([asdict(p) for p in manifest.parents]),
            "size": sum(size for _, size in blobs.values()),
            "created": manifest.created,
            "published": time.time(),
        }
        version_id = self.db["versions"].insert(row).last_pk
        self.db["files"].insert_all(
            {"version_id": version_id, "filename": f, "blob": d, "size": s} for f, (d, s) in blobs.items()
        )
        for parent in manifest.parents:
            self.db.execute(
                "insert or ignore into pins (version_id, digest) values (?, ?)",
                [version_id, self._pinned_digest(parent.digest)],
            )
        for tag in ("latest", *tags) if move_latest else tags:
            self._set_tag(full_name, tag, version_id)
        return self._version(self._row_by_id(version_id))

    def _pinned_digest(self, digest: str) -> str:
        """A parent's full digest (a manifest may pin by unique prefix; a pulled one may be absent)."""
        try:
            return self._by_digest(digest)["digest"]
        except (NotFound, InvalidRef):
            return digest

    def dependents(self, ref: str | Ref | Version) -> list[Version]:
        """Versions that pin this one as a parent (fusions, merges), by index."""
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        rows = self._query(
            "select versions.* from pins join versions on versions.id = pins.version_id "
            "where pins.digest = ? order by versions.full_name, versions.seq",
            [v.digest],
        )
        return self._versions(rows)

    def _next_int_version(self, full_name: str) -> str:
        top = self.db.execute("select max(vnum) from versions where full_name = ?", [full_name]).fetchone()[0]
        return str((top or 0) + 1)

    def _set_tag(self, full_name: str, tag: str, version_id: int) -> None:
        if tag == "latest":
            self._move_latest(full_name, version_id)
        self.db.execute(
            "insert into tags (full_name, tag, version_id, updated) values (?, ?, ?, ?) "
            "on conflict (full_name, tag) do update set version_id = excluded.version_id, "
            "updated = excluded.updated",
            [full_name, tag, version_id, af.utc_now()],
        )

    def _move_latest(self, full_name: str, version_id: int) -> None:
        """Keep the row flag and the search index of latest versions in step with the tag."""
        old = self.db.execute(
            "select version_id from tags where full_name = ? and tag = 'latest'", [full_name]
        ).fetchone()
        if old and old[0] == version_id:
            return
        if old:
            self.db.execute("update versions set is_latest = null where id = ?", [old[0]])
            self.db.execute("delete from latest_fts where rowid = ?", [old[0]])
        self.db.execute("update versions set is_latest = 1 where id = ?", [version_id])
        self.db.execute(
            "insert into latest_fts (rowid, full_name, description, task, method, base_model) "
            "select id, full_name, description, task, method, base_model from versions where id = ?",
            [version_id],
        )

    # ------------------------------------------------------------------ tags, removal

    def tag(self, ref: str | Ref, tag: str) -> Version:
        """Point `tag` at the version `ref` resolves to (atomically moving it)."""
        check_tag(tag)
        with write_transaction(self.db):
            v = self.resolve(ref)
            self._set_tag(v.full_name, tag, v.id)
            return self._version(self._row_by_id(v.id))

    def untag(self, name: str, tag: str) -> None:
        check_name(name)
        if tag == "latest":
            raise InvalidRef("'latest' always follows the newest version; it cannot be removed")
        with write_transaction(self.db):
            cur = self.db.execute("delete from tags where full_name = ? and tag = ?", [name, tag])
            if cur.rowcount == 0:
                raise NotFound(f"{name} has no tag {tag!r}")

    def remove(self, ref: str | Ref, *, force: bool = False) -> Version:
        """Delete one version (its blobs become garbage for `gc`). `latest` moves back.

        A version that another pins (a fusion or merge built from it) stays unless `force`:
        removing it would leave that one unloadable.
        """
        with write_transaction(self.db):
            v = self.resolve(ref)
            pinned_by = [d for d in self.dependents(v) if d.id != v.id]
            if pinned_by and not force:
                names = ", ".join(d.ref for d in pinned_by[:5]) + (" ..." if len(pinned_by) > 5 else "")
                raise InUse(
                    f"{v.ref} is a parent of {names}, which would no longer load: remove those "
                    "first, or remove it anyway with --force"
                )
            self.db.execute("delete from pins where version_id = ?", [v.id])
            self.db.execute("delete from evals where version_id = ?", [v.id])
            self.db.execute("delete from latest_fts where rowid = ?", [v.id])
            self.db.execute("delete from tags where version_id = ?", [v.id])
            self.db.execute("delete from files where version_id = ?", [v.id])
            self.db.execute("delete from versions where id = ?", [v.id])
            newest = self.db.execute(
                "select id from versions where full_name = ? order by seq desc limit 1", [v.full_name]
            ).fetchone()
            if newest:
                self._set_tag(v.full_name, "latest", newest[0])
            return v
