"""The local registry: versioned adapter artifacts in SQLite plus a blob store.

Publish protocol (a version is visible only when complete):
  1. validate the artifact (artifact.load_dir);
  2. copy each file into the blob store (hash while copying, fsync, rename, fsync dir);
  3. one `BEGIN IMMEDIATE` transaction assigns the version, writes the final manifest
     blob, inserts the version and file rows, and moves `latest` and the user's tags.
A crash before 3 commits leaves only unreferenced blobs, which `gc` removes later.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deltahub import artifact as af
from deltahub.errors import AlreadyExists, IntegrityError, InvalidArtifact, InvalidRef, NotFound
from deltahub.registry.db import connect, write_transaction
from deltahub.registry.refs import Ref, check_name, check_tag, check_version, parse_ref
from deltahub.registry.store import BlobStore, sha256_file
from deltahub.settings import DEFAULT_GC_GRACE_SECONDS, default_home


@dataclass
class Version:
    """One published version, as the registry records it."""

    full_name: str
    version: str
    digest: str
    method: str
    created: str
    base_model: str | None = None
    base_fingerprint: str | None = None
    task: str | None = None
    description: str = ""
    license: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    parents: list[dict[str, str]] = field(default_factory=list)
    size: int = 0
    tags: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    id: int = 0

    @property
    def name(self) -> str:
        return self.full_name.rsplit("/", 1)[-1]

    @property
    def namespace(self) -> str | None:
        return self.full_name.rsplit("/", 1)[0] if "/" in self.full_name else None

    @property
    def ref(self) -> str:
        return f"{self.full_name}@{self.version}"

    def __str__(self) -> str:
        return self.ref

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("id")
        d["name"] = self.full_name
        d["ref"] = self.ref
        return d


def _version_key(version: str, created: str) -> tuple[int, int, str]:
    """Order versions: integer versions numerically, others by creation time."""
    return (1, int(version), created) if version.isdigit() else (0, 0, created)


@dataclass
class VerifyReport:
    versions: int
    blobs: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    removed: list[str]
    bytes_freed: int
    tmp_removed: int


class Registry:
    """A local adapter registry rooted at `home` (default `$DELTAHUB_HOME` or ~/.deltahub)."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.store = BlobStore(self.home)
        self.db = connect(self.home / "registry.db")

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    # ------------------------------------------------------------------ publish

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
    ) -> Version:
        """Validate an artifact directory and publish it as a new immutable version.

        Descriptive fields not given here nor in the artifact's own manifest (task,
        description, license, base model) carry over from the adapter's latest version, as
        a package's metadata does from release to release. Metrics never carry over.
        """
        artifact = path if isinstance(path, af.Artifact) else af.load_dir(path)
        check_name(name)
        if version is not None:
            check_version(str(version))
            version = str(version)
        tags = [check_tag(t) for t in tags]
        manifest = artifact.manifest or af.Manifest(
            name=name,
            method=artifact.method,
            base_model=artifact.config.get("base_model_name_or_path") or None,
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

        blobs = {
            fname: self.store.put_file(src)
            for fname, src in artifact.files.items()
            if fname != af.MANIFEST_FILE
        }
        with write_transaction(self.db):
            version = version or self._next_int_version(name)
            if self._row(name, version) is not None:
                raise AlreadyExists(
                    f"{name}@{version} already exists; versions are immutable "
                    "(publish without --version for the next number, or pick a new one)"
                )
            final = replace(manifest, name=name, version=version, created=af.utc_now())
            blobs[af.MANIFEST_FILE] = self.store.put_bytes(final.to_json())
            return self._insert(final, blobs, tags)

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
        blobs = {f: (d, self.store.path(d).stat().st_size) for f, d in files.items()}
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
            newer = current is None or _version_key(manifest.version, manifest.created) >= _version_key(
                current["version"], current["created"]
            )
            return self._insert(manifest, blobs, tags, move_latest=newer)

    def _latest_row(self, full_name: str) -> dict[str, Any] | None:
        found = self.db.execute(
            "select version_id from tags where full_name = ? and tag = 'latest'", [full_name]
        ).fetchone()
        return self._row_by_id(found[0]) if found else None

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
            if not self.store.has(digest):  # gc may have raced a very slow publisher
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
        for tag in ("latest", *tags) if move_latest else tags:
            self._set_tag(full_name, tag, version_id)
        return self._version(self._row_by_id(version_id))

    def _latest_manifest(self, full_name: str) -> af.Manifest | None:
        try:
            return self.manifest(f"{full_name}@latest")
        except NotFound:
            return None

    def _next_int_version(self, full_name: str) -> str:
        rows = self.db.execute("select version from versions where full_name = ?", [full_name]).fetchall()
        numbers = [int(v) for (v,) in rows if v.isdigit()]
        return str(max(numbers, default=0) + 1)

    def _set_tag(self, full_name: str, tag: str, version_id: int) -> None:
        self.db["tags"].upsert(
            {"full_name": full_name, "tag": tag, "version_id": version_id, "updated": af.utc_now()},
            pk=("full_name", "tag"),
        )

    # ------------------------------------------------------------------ reading

    def _row(self, full_name: str, version: str) -> dict[str, Any] | None:
        rows = list(self.db["versions"].rows_where("full_name = ? and version = ?", [full_name, version]))
        return rows[0] if rows else None

    def _row_by_id(self, version_id: int) -> dict[str, Any]:
        return self.db["versions"].get(version_id)

    def _version(self, row: dict[str, Any]) -> Version:
        files = dict(
            self.db.execute(
                "select filename, blob from files where version_id = ? order by filename", [row["id"]]
            ).fetchall()
        )
        tags = [
            t
            for (t,) in self.db.execute(
                "select tag from tags where version_id = ? order by tag", [row["id"]]
            ).fetchall()
        ]
        return Version(
            id=row["id"],
            full_name=row["full_name"],
            version=row["version"],
            digest=row["digest"],
            method=row["method"],
            created=row["created"],
            base_model=row["base_model"],
            base_fingerprint=row["base_fingerprint"],
            task=row["task"],
            description=row["description"] or "",
            license=row["license"],
            metrics=json.loads(row["metrics"] or "{}"),
            parents=json.loads(row["parents"] or "[]"),
            size=row["size"] or 0,
            tags=tags,
            files=files,
        )

    def _by_digest(self, digest: str, full_name: str | None = None) -> dict[str, Any]:
        where, params = "digest like ?", [digest + "%"]
        if full_name is not None:
            where, params = where + " and full_name = ?", [*params, full_name]
        rows = list(self.db["versions"].rows_where(where, params, limit=2))
        if not rows:
            scope = f" for {full_name}" if full_name else ""
            raise NotFound(f"no version{scope} has digest {digest}")
        if len(rows) > 1:
            raise InvalidRef(f"digest prefix {digest} is ambiguous: give more hex digits")
        return rows[0]

    def resolve(self, ref: str | Ref) -> Version:
        """Resolve `[ns/]name[@version|@tag|@sha256:prefix]` to a version.

        A selector that starts with a digit is a version; one that starts with a letter
        is a tag; `sha256:` is a digest prefix. A bare name means `@latest`.
        """
        r = parse_ref(ref) if isinstance(ref, str) else ref
        if r.kind == "digest":
            return self._version(self._by_digest(r.selector, r.full_name))
        if r.kind == "version":
            row = self._row(r.full_name, r.selector)
        else:
            found = self.db.execute(
                "select version_id from tags where full_name = ? and tag = ?", [r.full_name, r.selector]
            ).fetchone()
            row = self._row_by_id(found[0]) if found else None
        if row is None:
            if not self.db.execute(
                "select 1 from versions where full_name = ? limit 1", [r.full_name]
            ).fetchone():
                raise NotFound(f"no adapter named {r.full_name!r} in {self.home} (see `deltahub list`)")
            raise NotFound(
                f"{r.full_name} has no {r.kind} {r.selector!r} (see `deltahub show {r.full_name} --versions`)"
            )
        return self._version(row)

    def by_digest(self, digest: str) -> Version:
        """The version with this exact digest (or unique digest prefix), whatever its name."""
        return self._version(self._by_digest(digest))

    def show(self, ref: str | Ref) -> Version:
        return self.resolve(ref)

    def manifest(self, ref: str | Ref | Version) -> af.Manifest:
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        path = self.store.path(v.files[af.MANIFEST_FILE])
        return af.Manifest.from_dict(json.loads(path.read_bytes()))

    def open(self, ref: str | Ref | Version) -> af.Artifact:
        """The artifact of a version, its files read in place from the blob store."""
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        files = {f: self.store.path(d) for f, d in v.files.items()}
        for f, p in files.items():
            if not p.is_file():
                raise IntegrityError(
                    f"{v.ref}: blob of {f} is missing from the store (run `deltahub verify`)"
                )
        return af.load_files(files)

    def versions(self, name: str) -> list[Version]:
        check_name(name)
        rows = self.db["versions"].rows_where("full_name = ?", [name], order_by="seq")
        out = [self._version(r) for r in rows]
        if not out:
            raise NotFound(f"no adapter named {name!r} in {self.home}")
        return out

    def list(
        self,
        *,
        name: str | None = None,
        base_model: str | None = None,
        method: str | None = None,
        task: str | None = None,
        all_versions: bool = False,
    ) -> list[Version]:
        """Adapters (their latest version, or every version) matching the filters."""
        where, params = [], []
        for column, value in (
            ("full_name", name),
            ("base_model", base_model),
            ("method", method),
            ("task", task),
        ):
            if value is not None:
                where.append(f"v.{column} = ?")
                params.append(value)
        if not all_versions:
            where.append("v.id in (select version_id from tags where tag = 'latest')")
        sql = "select v.* from versions v"
        if where:
            sql += " where " + " and ".join(where)
        sql += " order by v.full_name, v.seq"
        return [self._version(r) for r in self.db.query(sql, params)]

    def search(self, query: str, limit: int = 50) -> list[Version]:
        """Full-text search over name, description, task, method and base model."""
        if not query.strip():
            return self.list()
        # Quote each term so user punctuation cannot break FTS syntax; prefix-match the last.
        terms = [t.replace('"', "") for t in query.split() if t.replace('"', "")]
        fts = " ".join(f'"{t}"' for t in terms[:-1]) + (f' "{terms[-1]}"*' if terms else "")
        # Match any version, report each adapter once: its newest matching version.
        sql = (
            "select v.* from versions v join ("
            "  select v2.full_name, max(v2.seq) as seq, min(f.rank) as best"
            "  from versions v2 join versions_fts f on f.rowid = v2.id"
            "  where versions_fts match ? group by v2.full_name"
            ") m on m.full_name = v.full_name and m.seq = v.seq "
            "order by m.best, v.full_name limit ?"
        )
        return [self._version(r) for r in self.db.query(sql, [fts.strip(), limit])]

    # ------------------------------------------------------------------ changes

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

    def remove(self, ref: str | Ref) -> Version:
        """Delete one version (its blobs become garbage for `gc`). `latest` moves back."""
        with write_transaction(self.db):
            v = self.resolve(ref)
            self.db.execute("delete from tags where version_id = ?", [v.id])
            self.db.execute("delete from files where version_id = ?", [v.id])
            self.db.execute("delete from versions where id = ?", [v.id])
            newest = self.db.execute(
                "select id from versions where full_name = ? order by seq desc limit 1", [v.full_name]
            ).fetchone()
            if newest:
                self._set_tag(v.full_name, "latest", newest[0])
            return v

    def export(self, ref: str | Ref, directory: Path | str) -> Path:
        """Write a version back out as an artifact directory, byte-identical to what was published."""
        v = self.resolve(ref)
        out = Path(directory)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise AlreadyExists(f"{out} exists and is not an empty directory; choose a new path")
        tmp = out.with_name(f".{out.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for fname, digest in v.files.items():
            with self.store.open(digest) as src, open(tmp / fname, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if sha256_file(tmp / fname) != digest:
                shutil.rmtree(tmp, ignore_errors=True)
                raise IntegrityError(f"blob {digest} of {v.ref}/{fname} is corrupt (run `deltahub verify`)")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
        return out

    # ------------------------------------------------------------------ upkeep

    def verify(self) -> VerifyReport:
        """Re-hash every referenced blob and check every row; return what is wrong."""
        problems: list[str] = []
        hashed: dict[str, str | None] = {}
        rows = list(self.db["versions"].rows)
        for row in rows:
            v = self._version(row)
            for fname in (*af.REQUIRED_FILES, af.MANIFEST_FILE):
                if fname not in v.files:
                    problems.append(f"{v.ref}: no {fname} recorded")
            for fname, digest in v.files.items():
                if digest not in hashed:
                    path = self.store.path(digest)
                    hashed[digest] = sha256_file(path) if path.is_file() else None
                if hashed[digest] is None:
                    problems.append(f"{v.ref}: blob {digest} ({fname}) is missing")
                elif hashed[digest] != digest:
                    problems.append(
                        f"{v.ref}: blob {digest} ({fname}) is corrupt (hashes to {hashed[digest]})"
                    )
            if af.artifact_digest(v.files) != v.digest:
                problems.append(f"{v.ref}: recorded digest {v.digest} does not match its files")
            if all(hashed.get(d) == d for d in v.files.values()) and af.MANIFEST_FILE in v.files:
                try:
                    m = self.manifest(v)
                    if (m.name, m.version) != (v.full_name, v.version):
                        problems.append(f"{v.ref}: manifest names {m.name}@{m.version}")
                except InvalidArtifact as e:
                    problems.append(f"{v.ref}: {e}")
        names = {r["full_name"] for r in rows}
        latest = {n for (n,) in self.db.execute("select full_name from tags where tag = 'latest'").fetchall()}
        for n in sorted(names - latest):
            problems.append(f"{n}: no 'latest' tag")
        dangling = self.db.execute(
            "select full_name, tag from tags where version_id not in (select id from versions)"
        ).fetchall()
        problems += [f"{n}: tag {t!r} points at a missing version" for n, t in dangling]
        integrity = self.db.execute("pragma integrity_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"registry.db integrity_check: {integrity}")
        return VerifyReport(versions=len(rows), blobs=len(hashed), problems=problems)

    def gc(self, grace_seconds: float = DEFAULT_GC_GRACE_SECONDS) -> GcReport:
        """Delete unreferenced blobs (and temp files) older than `grace_seconds`."""
        cutoff = time.time() - grace_seconds
        removed: list[str] = []
        freed = 0
        with write_transaction(self.db):
            referenced = {d for (d,) in self.db.execute("select distinct blob from files").fetchall()}
            for digest in self.store.digests():
                if digest in referenced:
                    continue
                path = self.store.path(digest)
                st = path.stat()
                if st.st_mtime < cutoff:
                    freed += st.st_size
                    path.unlink()
                    removed.append(digest)
        stale = self.store.stale_tmp(grace_seconds)
        for p in stale:
            p.unlink(missing_ok=True)
        return GcReport(removed=removed, bytes_freed=freed, tmp_removed=len(stale))
