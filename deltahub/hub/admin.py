"""Running a hub's storage: migrate its schema, verify it, copy it to other stores.

    migrate(db)                       create or upgrade the metadata schema
    verify_hub(stores)                every version's blobs present and hashing to their
                                      digests; temp leftovers of killed uploads listed
    copy_hub(src, dst)                everything (blobs, versions in publish order, tags,
                                      tokens, webhooks) from one pair of stores to another,
                                      then checked version by version and blob by blob

A pair of stores is `Stores(meta, blobs)`, opened from URLs by `open_stores`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltahub import artifact as af
from deltahub.errors import IntegrityError, NotFound


@dataclass
class Stores:
    meta: Any
    blobs: Any

    def close(self) -> None:
        self.meta.close()


def open_stores(
    db: str | None,
    blobs: str | None,
    home: Path | str | None = None,
    *,
    s3_endpoint_url: str | None = None,
    create: bool = True,
) -> Stores:
    """The metadata and blob stores these URLs name (none: the embedded ones in `home`)."""
    from deltahub.hub.blobstores import open_blobs
    from deltahub.hub.meta import check_pairing, open_meta
    from deltahub.settings import default_home

    if db and db.startswith(("postgresql://", "postgres://")) and not create:
        from deltahub.hub.pgmeta import PostgresMeta

        meta: Any = PostgresMeta(db, create=False)
    else:
        meta = open_meta(db, home)
    check_pairing(meta, blobs)
    root = getattr(meta, "home", Path(home) if home is not None else default_home())
    s3 = {"endpoint_url": s3_endpoint_url} if blobs and blobs.startswith("s3://") else {}
    return Stores(meta, open_blobs(blobs, root, meta, **s3))


def migrate(db: str | None, home: Path | str | None = None) -> dict[str, Any]:
    """Create or upgrade the schema of the metadata store `db`; say from which version to which."""
    if db and db.startswith(("postgresql://", "postgres://")):
        from deltahub.hub.pgmeta import migrate as pg_migrate

        before, after = pg_migrate(db)
        return {"db": "postgresql", "from": before, "to": after}
    from deltahub.hub.meta import open_meta

    meta = open_meta(db, home)  # the embedded stores migrate on open
    meta.close()
    return {"db": "sqlite", "home": str(meta.home), "from": None, "to": "current"}


class _Chunks:
    """`read()` over an iterator of byte chunks (a blob streaming from one store to another)."""

    def __init__(self, chunks: Any) -> None:
        self._it = iter(chunks)

    def read(self, n: int = -1) -> bytes:
        return next(self._it, b"")


@dataclass
class HubReport:
    versions: int = 0
    blobs: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    swept: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "versions": self.versions,
            "blobs": self.blobs,
            "bytes": self.bytes,
            "problems": self.problems,
            "leftovers": self.leftovers,
            "swept": self.swept,
        }


def _hash(blobs: Any, digest: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    for chunk in blobs.chunks(digest):
        h.update(chunk)
        size += len(chunk)
    return "sha256:" + h.hexdigest(), size


def verify_hub(
    stores: Stores, *, rehash: bool = True, sweep: bool = False, older_than: float = 3600.0
) -> HubReport:
    """Check every version: its digest covers its files, each blob is there and hashes right.

    Leftovers of interrupted uploads (temp files or objects, unfinished multipart uploads)
    are listed, never visible as blobs; `sweep` removes those older than `older_than` seconds
    (an upload in flight on another server looks the same until then).
    """
    report = HubReport()
    seen: set[str] = set()
    for v in stores.meta.handle().every_version():
        report.versions += 1
        if af.artifact_digest(v.files) != v.digest:
            report.problems.append(f"{v.ref}: its files do not hash to its digest {v.digest}")
        for fname, digest in sorted(v.files.items()):
            if digest in seen:
                continue
            seen.add(digest)
            if not stores.blobs.has(digest):
                report.problems.append(f"{v.ref}: {fname} ({digest}) is missing")
                continue
            report.blobs += 1
            if rehash:
                try:
                    actual, size = _hash(stores.blobs, digest)
                except (OSError, NotFound) as e:
                    report.problems.append(f"{v.ref}: {fname} ({digest}) cannot be read: {e}")
                    continue
                report.bytes += size
                if actual != digest:
                    report.problems.append(f"{v.ref}: {fname} ({digest}) hashes to {actual}")
    report.leftovers = stores.blobs.leftovers()
    if sweep:
        report.swept = stores.blobs.sweep(older_than)
    return report


def copy_hub(src: Stores, dst: Stores, *, check: bool = True) -> HubReport:
    """Copy a hub's blobs, versions (in publish order), tags, tokens and webhooks; then check.

    Idempotent: a copy run again adds only what is missing (versions already there must
    have the same digest, else `AlreadyExists`), so an interrupted copy is resumed by
    running it again.
    """
    report = HubReport()
    s, d = src.meta.handle(), dst.meta.handle()
    # every_version yields each name's versions in publish order; a stable sort keeps it
    versions = sorted(s.every_version(), key=lambda v: v.full_name)
    copied: set[str] = set()
    for v in versions:
        for digest in sorted(set(v.files.values()) - copied):
            if not dst.blobs.has(digest):
                _, size = dst.blobs.put_stream(_Chunks(src.blobs.chunks(digest)), expected=digest)
                report.bytes += size
            copied.add(digest)
            report.blobs += 1
        with src.blobs.local_files(v.files) as paths:
            d.commit(v.files, paths, [])
        d.link(v.namespace or "", v.files.values())
        report.versions += 1
    for v in versions:  # tags last, so each lands exactly where the source has it
        for tag in v.tags:
            d.tag(v.full_name, v.version, tag)
    have = {(t.lookup, t.created) for t in d.tokens.list()}
    for row in s.tokens._rows():
        if (row["lookup"], row["created"]) not in have:
            d.tokens._insert({k: row[k] for k in row if k != "id"})
    hooks = {(h["url"], tuple(h["events"]), h["namespace"]) for h in d.hooks()}
    for h in s.hooks():
        if (h["url"], tuple(h["events"]), h["namespace"]) not in hooks:
            d.add_hook(h["url"], h["events"], h["namespace"], secret=h["secret"])
    if check:
        _check_copy(versions, dst, report)
    return report


def _check_copy(versions: list[Any], dst: Stores, report: HubReport) -> None:
    d = dst.meta.handle()
    for v in versions:
        try:
            got = d.resolve(f"{v.full_name}@{v.version}")
        except NotFound:
            report.problems.append(f"{v.ref} is missing from the copy")
            continue
        if got.digest != v.digest or got.files != v.files:
            report.problems.append(f"{v.ref}: the copy has digest {got.digest}, the source {v.digest}")
        if sorted(got.tags) != sorted(v.tags):
            report.problems.append(
                f"{v.ref}: the copy's tags {sorted(got.tags)} differ from {sorted(v.tags)}"
            )
    checked = verify_hub(dst)
    report.problems += checked.problems
    if not report.ok:
        raise IntegrityError("the copy does not match its source: " + "; ".join(report.problems[:5]))
