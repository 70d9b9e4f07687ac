"""Reading the registry: resolve references, list, search, page through versions, open, export.

Every query here is served by an index (tests/test_registry_scale.py checks the plans):
a page of any listing costs the same whether the registry holds a hundred versions or a
million, and turning rows into `Version`s takes two batched queries per page, not two per row.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from deltahub import artifact as af
from deltahub.errors import AlreadyExists, IntegrityError, InvalidRef, NotFound
from deltahub.registry.refs import Ref, check_name, parse_ref
from deltahub.registry.store import BlobStore, sha256_file
from deltahub.registry.version import Page, Version, check_limit, decode_cursor, encode_cursor

BATCH = 500  # ids per `in (...)` query: well under SQLite's variable limit


def digest_range(prefix: str) -> tuple[str, str]:
    """[low, high) bounds of the digests that start with `prefix`, for an index range scan."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Queries:
    """The read side of `Registry` (which supplies `home`, `store` and `db`)."""

    home: Path
    store: BlobStore
    db: Database

    # ------------------------------------------------------------------ rows

    def _row(self, full_name: str, version: str) -> dict[str, Any] | None:
        rows = list(self.db["versions"].rows_where("full_name = ? and version = ?", [full_name, version]))
        return rows[0] if rows else None

    def _row_by_id(self, version_id: int) -> dict[str, Any]:
        return self.db["versions"].get(version_id)

    def _query(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def _versions(self, rows: Iterable[dict[str, Any]]) -> list[Version]:
        """Rows to `Version`s, with their files and tags fetched in batches."""
        rows = list(rows)
        files: dict[int, dict[str, str]] = {r["id"]: {} for r in rows}
        tags: dict[int, list[str]] = {r["id"]: [] for r in rows}
        ids = list(files)
        for i in range(0, len(ids), BATCH):
            chunk = ids[i : i + BATCH]
            marks = ",".join("?" * len(chunk))
            for vid, fname, blob in self.db.execute(
                f"select version_id, filename, blob from files where version_id in ({marks}) "
                "order by version_id, filename",
                chunk,
            ):
                files[vid][fname] = blob
            for vid, tag in self.db.execute(
                f"select version_id, tag from tags where version_id in ({marks}) order by version_id, tag",
                chunk,
            ):
                tags[vid].append(tag)
        return [_version_from_row(r, files[r["id"]], tags[r["id"]]) for r in rows]

    def _version(self, row: dict[str, Any]) -> Version:
        return self._versions([row])[0]

    def _by_digest(self, digest: str, full_name: str | None = None) -> dict[str, Any]:
        low, high = digest_range(digest)
        # The digest index: a prefix is a range of it (LIKE could not use it), and one
        # name's 100,000 versions are never walked to find one digest.
        sql = "select * from versions indexed by idx_versions_digest where digest >= ? and digest < ?"
        params: list[Any] = [low, high]
        if full_name is not None:
            sql, params = sql + " and full_name = ?", [*params, full_name]
        rows = self._query(sql + " limit 2", params)
        if not rows:
            scope = f" for {full_name}" if full_name else ""
            raise NotFound(f"no version{scope} has digest {digest}")
        if len(rows) > 1:
            raise InvalidRef(f"digest prefix {digest} is ambiguous: give more hex digits")
        return rows[0]

    def _tagged_row(self, full_name: str, tag: str) -> dict[str, Any] | None:
        found = self.db.execute(
            "select version_id from tags where full_name = ? and tag = ?", [full_name, tag]
        ).fetchone()
        return self._row_by_id(found[0]) if found else None

    def _latest_row(self, full_name: str) -> dict[str, Any] | None:
        return self._tagged_row(full_name, "latest")

    def _exists(self, full_name: str) -> bool:
        return bool(
            self.db.execute("select 1 from versions where full_name = ? limit 1", [full_name]).fetchone()
        )

    # ------------------------------------------------------------------ resolving

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
            row = self._tagged_row(r.full_name, r.selector)
        if row is None:
            if not self._exists(r.full_name):
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

    def exists(self, name: str) -> bool:
        """Whether any version of adapter `name` is recorded."""
        check_name(name)
        return self._exists(name)

    def manifest(self, ref: str | Ref | Version) -> af.Manifest:
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        try:
            path = self.store.verified_path(v.files[af.MANIFEST_FILE])
        except IntegrityError as e:
            raise IntegrityError(f"{v.ref}: manifest {e}") from None
        return af.Manifest.from_dict(json.loads(path.read_bytes()))

    def _latest_manifest(self, full_name: str) -> af.Manifest | None:
        try:
            return self.manifest(f"{full_name}@latest")
        except NotFound:
            return None

    def open(self, ref: str | Ref | Version) -> af.Artifact:
        """The artifact of a version, its files read in place from the blob store.

        Each blob is hashed the first time this process opens it (and again if it changes
        on disk), so a flipped byte never loads.
        """
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        files = {}
        for f, d in v.files.items():
            try:
                files[f] = self.store.verified_path(d)
            except IntegrityError as e:
                raise IntegrityError(f"{v.ref}: {f}: {e}") from None
        return af.load_files(files)

    # ------------------------------------------------------------------ listings

    def versions(self, name: str, *, limit: int | None = None, cursor: str | None = None) -> Page[Version]:
        """Versions of one adapter in publish order, a page of `limit` at a time (all by default)."""
        check_name(name)
        check_limit(limit)
        after = decode_cursor(cursor, "versions", (str, int)) if cursor else [name, 0]
        if after[0] != name:
            raise InvalidRef(f"this cursor pages through {after[0]!r}, not {name!r}")
        sql = "select * from versions where full_name = ? and seq > ? order by seq"
        out = self._paged(sql, [name, after[1]], limit, lambda r: ("versions", [name, r["seq"]]))
        if not out and cursor is None:
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
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Version]:
        """Adapters (their latest version, or every version) matching the filters, by name.

        `limit` rows a page (all by default); pass the page's `next_cursor` for the next one.
        """
        check_limit(limit)
        where, params = [], []
        for column, value in (
            ("full_name", name),
            ("base_model", base_model),
            ("method", method),
            ("task", task),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if all_versions:
            key = decode_cursor(cursor, "all", (str, int)) if cursor else ["", 0]
            where.append("(full_name, seq) > (?, ?)")
            order, make = "full_name, seq", lambda r: ("all", [r["full_name"], r["seq"]])
        else:
            key = decode_cursor(cursor, "latest", (str,)) if cursor else [""]
            where += ["is_latest = 1", "full_name > ?"]
            order, make = "full_name", lambda r: ("latest", [r["full_name"]])
        sql = f"select * from versions where {' and '.join(where)} order by {order}"
        return self._paged(sql, [*params, *key], limit, make)

    def search(self, query: str, limit: int | None = 50, cursor: str | None = None) -> Page[Version]:
        """Full-text search over the latest version of each adapter: name, description, task,
        method and base model. The last term matches as a prefix; newest adapters first."""
        check_limit(limit)
        if not query.strip():
            return self.list(limit=limit, cursor=cursor)
        # Quote each term so user punctuation cannot break FTS syntax; prefix-match the last.
        terms = [t.replace('"', "") for t in query.split() if t.replace('"', "")]
        if not terms:
            return Page([])
        fts = " ".join(f'"{t}"' for t in terms[:-1]) + f' "{terms[-1]}"*'
        before = decode_cursor(cursor, "search", (int,))[0] if cursor else 2**63 - 1
        # Relevance order would rank every match before the first page could be cut, so
        # pages follow the index instead: newest first, a page costs the same at any size.
        ids = [
            rowid
            for (rowid,) in self.db.execute(
                "select rowid from latest_fts where latest_fts match ? and rowid < ? order by rowid desc limit ?",
                [fts.strip(), before, (limit or 2**62) + 1],
            )
        ]
        more = limit is not None and len(ids) > limit
        ids = ids[:limit] if limit is not None else ids
        rows = self._rows_by_ids(ids)
        out: Page[Version] = Page(self._versions(rows))
        if more:
            out.next_cursor = encode_cursor("search", [ids[-1]])
        return out

    def _rows_by_ids(self, ids: list[int]) -> list[dict[str, Any]]:
        found: dict[int, dict[str, Any]] = {}
        for i in range(0, len(ids), BATCH):
            chunk = ids[i : i + BATCH]
            sql = f"select * from versions where id in ({','.join('?' * len(chunk))})"
            found.update((r["id"], r) for r in self.db.query(sql, chunk))
        return [found[i] for i in ids if i in found]

    def _paged(self, sql: str, params: list[Any], limit: int | None, make_key: Any) -> Page[Version]:
        if limit is None:
            return Page(self._versions(self.db.query(sql, params)))
        rows = self._query(sql + " limit ?", [*params, limit + 1])
        out: Page[Version] = Page(self._versions(rows[:limit]))
        if len(rows) > limit:
            out.next_cursor = encode_cursor(*make_key(rows[limit - 1]))
        return out

    # ------------------------------------------------------------------ export

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


def _version_from_row(row: dict[str, Any], files: dict[str, str], tags: list[str]) -> Version:
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
