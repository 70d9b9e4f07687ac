"""Upkeep: `verify` (re-hash blobs, check rows) and `gc` (remove unreferenced blobs, temp files).

Both are linear in rows and blobs and walk the store without the write lock: `gc` decides
from a walk, then deletes in short transactions that re-check each candidate under the
lock, the same lock a publisher holds while it makes sure its blobs are there.
"""

from __future__ import annotations

import json
import time
from typing import Any

from deltahub import artifact as af
from deltahub.errors import InvalidArtifact
from deltahub.registry.db import write_transaction
from deltahub.registry.queries import Queries
from deltahub.registry.store import sha256_file, storage_error
from deltahub.registry.version import GcReport, VerifyReport
from deltahub.settings import DEFAULT_GC_GRACE_SECONDS

CHUNK = 1000  # versions per read when verifying
GC_HOLD_S = 0.05  # gc holds the write lock this long at most per transaction (unlinks can be slow)
GC_PAUSE_S = 0.02  # between transactions, so a waiting publisher's busy handler finds the lock free


class Upkeep(Queries):
    """`verify` and `gc` for `Registry`."""

    def verify(self) -> VerifyReport:
        """Re-hash every referenced blob and check every row; return what is wrong."""
        problems: list[str] = []
        hashed: dict[str, str | None] = {}
        count, last = 0, 0
        while True:
            rows = self._query("select * from versions where id > ? order by id limit ?", [last, CHUNK])
            if not rows:
                break
            last, count = rows[-1]["id"], count + len(rows)
            for v in self._versions(rows):
                problems += self._verify_version(v, hashed)
        no_latest = self.db.execute(
            "select distinct full_name from versions except select full_name from tags where tag = 'latest'"
        ).fetchall()
        problems += [f"{n}: no 'latest' tag" for (n,) in sorted(set(no_latest))]
        dangling = self.db.execute(
            "select full_name, tag from tags where version_id not in (select id from versions)"
        ).fetchall()
        problems += [f"{n}: tag {t!r} points at a missing version" for n, t in dangling]
        astray = self.db.execute(
            "select full_name from versions where is_latest = 1 and id not in "
            "(select version_id from tags where tag = 'latest')"
        ).fetchall()
        problems += [f"{n}: a version flagged latest is not the 'latest' tag's" for (n,) in astray]
        dangling_pins = self.db.execute(
            "select versions.full_name, versions.version, pins.digest from pins "
            "join versions on versions.id = pins.version_id "
            "where pins.digest not in (select digest from versions)"
        ).fetchall()
        problems += [
            f"{n}@{ver}: pins parent {d}, which is not in this registry (it cannot load)"
            for n, ver, d in dangling_pins
        ]
        integrity = self.db.execute("pragma integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"registry.db integrity_check: {integrity}")
        return VerifyReport(versions=count, blobs=len(hashed), problems=problems)

    def _verify_version(self, v: Any, hashed: dict[str, str | None]) -> list[str]:
        problems = []
        for fname in (*af.REQUIRED_FILES, af.MANIFEST_FILE):
            if fname not in v.files:
                problems.append(f"{v.ref}: no {fname} recorded")
        for fname, digest in v.files.items():
            if digest not in hashed:
                path = self.store.path(digest)
                try:
                    hashed[digest] = sha256_file(path)
                except FileNotFoundError:
                    hashed[digest] = None
            if hashed[digest] is None:
                problems.append(f"{v.ref}: blob {digest} ({fname}) is missing")
            elif hashed[digest] != digest:
                problems.append(f"{v.ref}: blob {digest} ({fname}) is corrupt (hashes to {hashed[digest]})")
        if af.artifact_digest(v.files) != v.digest:
            problems.append(f"{v.ref}: recorded digest {v.digest} does not match its files")
        if all(hashed.get(d) == d for d in v.files.values()) and af.MANIFEST_FILE in v.files:
            try:
                m = af.Manifest.from_dict(json.loads(self.store.path(v.files[af.MANIFEST_FILE]).read_bytes()))
                if (m.name, m.version) != (v.full_name, v.version):
                    problems.append(f"{v.ref}: manifest names {m.name}@{m.version}")
            except InvalidArtifact as e:
                problems.append(f"{v.ref}: {e}")
        return problems

    def gc(self, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS) -> GcReport:
        """Delete unreferenced blobs (and temp files) older than `grace_seconds`.

        The walk takes no lock; each candidate is re-checked under a short write
        transaction just before it is unlinked, so a version committed meanwhile keeps it.
        """
        cutoff = time.time() - grace_seconds
        referenced = {d for (d,) in self.db.execute("select distinct blob from files")}
        candidates = [d for d in self.store.digests() if d not in referenced]
        removed: list[str] = []
        freed = 0
        i = 0
        while i < len(candidates):
            if i:
                time.sleep(GC_PAUSE_S)
            with write_transaction(self.db):
                until = time.monotonic() + GC_HOLD_S
                while i < len(candidates) and time.monotonic() < until:
                    digest = candidates[i]
                    i += 1
                    if self.db.execute("select 1 from files where blob = ? limit 1", [digest]).fetchone():
                        continue
                    path = self.store.path(digest)
                    try:
                        st = path.stat()
                        if st.st_mtime >= cutoff:
                            continue
                        path.unlink()
                    except FileNotFoundError:  # another gc got there first
                        continue
                    freed += st.st_size
                    removed.append(digest)
        try:
            tmp_removed = self.store.sweep_tmp(grace_seconds)
        except OSError as e:
            raise (storage_error(e, self.home) or e) from None
        return GcReport(removed=removed, bytes_freed=freed, tmp_removed=tmp_removed)
