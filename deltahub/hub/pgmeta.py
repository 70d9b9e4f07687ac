"""The hub's metadata in PostgreSQL (psycopg 3): versions, tags, tokens, blob links, webhooks.

Several `deltahub serve` processes share one database. What keeps them correct:

- Every change to an adapter (commit, tag move) runs in one transaction that first locks
  the adapter's row in `adapters` (`SELECT ... FOR UPDATE`, the row created on first use
  with `INSERT ... ON CONFLICT DO NOTHING`): writers of one adapter queue on that lock, so
  the next `seq` is `max(seq) + 1` with no gap or duplicate, and `latest` moves once per
  commit in commit order. Writers of different adapters never wait for each other. The
  unique constraints (name, version) and (name, seq) back this up.
- A version's rows (version, files, tags) commit together or not at all: a server killed
  mid-commit leaves nothing visible.
- Search is PostgreSQL's own full-text search: a `tsvector` of name, description, task,
  method and base model on each row, a GIN index over latest versions only.

The schema and its migrations: pgschema.py.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deltahub import artifact as af
from deltahub.errors import AlreadyExists, InvalidArtifact, InvalidConfig, InvalidRef, NotFound
from deltahub.hub.metastore import MetaStore, check_hook, hook_matches, new_secret, redact
from deltahub.hub.pgschema import DOC, MIGRATIONS, connect, migrate, schema_version
from deltahub.hub.tokens import TokenStore
from deltahub.registry.refs import Ref, check_name, check_tag, check_version, parse_ref
from deltahub.registry.version import Page, Version, check_limit, decode_cursor, encode_cursor, version_key


class PostgresMeta(MetaStore):
    """Hub metadata in one PostgreSQL database (one connection per server thread)."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        super().__init__()
        self.url = url
        if create:
            migrate(url)
        else:
            conn = connect(url)
            try:
                have = schema_version(conn)
            finally:
                conn.close()
            if have < len(MIGRATIONS):
                raise InvalidConfig(
                    f"{redact(url)} has schema {have}, this deltahub needs {len(MIGRATIONS)}: "
                    "run `deltahub hub migrate --db URL`"
                )
        self.handle()

    def _open(self) -> PgHandle:
        return PgHandle(self.url)


def int_version(version: str) -> int | None:
    return int(version) if version.isdigit() and len(version) <= 18 else None


def digest_range(prefix: str) -> tuple[str, str]:
    """A digest prefix as the range [low, high) of full digests (an index range scan)."""
    last = prefix[-1]
    return prefix, prefix[:-1] + chr(ord(last) + 1)


def fts_query(query: str) -> str | None:
    """A tsquery from free text: every word must match, the last as a prefix; no syntax passes."""
    words = [w.lower() for w in re.findall(r"[^\W_]+", query)]
    if not words:
        return None
    return " & ".join([*words[:-1], words[-1] + ":*"])


class PgTokens(TokenStore):
    """`TokenStore` over the `tokens` table of the hub's PostgreSQL database."""

    def __init__(self, handle: PgHandle) -> None:
        self.h = handle

    def close(self) -> None:
        pass

    def _insert(self, row: dict[str, Any]) -> int:
        cols = list(row)
        sql = f"insert into tokens ({', '.join(cols)}) values ({', '.join(['%s'] * len(cols))}) returning id"
        return self.h.one(sql, [row[c] for c in cols])["id"]

    def _get(self, pk: int) -> dict[str, Any]:
        return self.h.one("select * from tokens where id = %s", [pk])

    def _rows(self, column: str | None = None, value: Any = None) -> list[dict[str, Any]]:
        if column is None:
            return self.h.all("select * from tokens order by id")
        assert column in ("id", "lookup")
        return self.h.all(f"select * from tokens where {column} = %s order by id", [value])

    def _update(self, pk: int, values: dict[str, Any]) -> None:
        sets = ", ".join(f"{k} = %s" for k in values)
        self.h.conn.execute(f"update tokens set {sets} where id = %s", [*values.values(), pk])


class PgHandle:
    """One thread's connection, and every query the hub asks of its metadata."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn = connect(url)
        self.tokens = PgTokens(self)

    @property
    def broken(self) -> bool:
        return bool(self.conn.broken or self.conn.closed)

    def close(self) -> None:
        self.conn.close()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return self.conn.execute(sql, params).fetchall()

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self.conn.transaction():
            yield self.conn

    # ------------------------------------------------------------------ versions

    def _versions(self, rows: list[dict[str, Any]]) -> list[Version]:
        if not rows:
            return []
        ids = [r["id"] for r in rows]
        files: dict[int, dict[str, str]] = {i: {} for i in ids}
        tags: dict[int, list[str]] = {i: [] for i in ids}
        for r in self.all(
            "select version_id, filename, blob from files where version_id = any(%s) order by filename", [ids]
        ):
            files[r["version_id"]][r["filename"]] = r["blob"]
        for r in self.all("select version_id, tag from tags where version_id = any(%s) order by tag", [ids]):
            tags[r["version_id"]].append(r["tag"])
        return [
            Version(
                id=r["id"],
                full_name=r["full_name"],
                version=r["version"],
                digest=r["digest"],
                method=r["method"],
                created=r["created"],
                base_model=r["base_model"],
                base_fingerprint=r["base_fingerprint"],
                task=r["task"],
                description=r["description"] or "",
                license=r["license"],
                metrics=json.loads(r["metrics"] or "{}"),
                parents=json.loads(r["parents"] or "[]"),
                size=r["size"] or 0,
                tags=tags[r["id"]],
                files=files[r["id"]],
            )
            for r in rows
        ]

    def list(
        self,
        *,
        name: str | None = None,
        base_model: str | None = None,
        method: str | None = None,
        task: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> list[Version]:
        check_limit(limit)
        where, params = ["is_latest"], []
        for column, value in (
            ("full_name", name),
            ("base_model", base_model),
            ("method", method),
            ("task", task),
        ):
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        after = decode_cursor(cursor, "latest", (str,))[0] if cursor else ""
        sql = f"select * from versions where {' and '.join(where)} and full_name > %s order by full_name"
        return self._paged(sql, [*params, after], limit, lambda r: ("latest", [r["full_name"]]))

    def search(self, query: str, limit: int | None = 50, cursor: str | None = None) -> list[Version]:
        check_limit(limit)
        if not query.strip():
            return self.list(limit=limit, cursor=cursor)
        tsq = fts_query(query)
        if tsq is None:
            return Page([])
        before = decode_cursor(cursor, "search", (int,))[0] if cursor else 2**63 - 1
        sql = "select * from versions where is_latest and doc @@ to_tsquery('simple', %s) and id < %s order by id desc"
        return self._paged(sql, [tsq, before], limit, lambda r: ("search", [r["id"]]))

    def versions(self, name: str, limit: int | None = None, cursor: str | None = None) -> list[Version]:
        check_name(name)
        check_limit(limit)
        after = decode_cursor(cursor, "versions", (str, int)) if cursor else [name, 0]
        if after[0] != name:
            raise InvalidRef(f"this cursor pages through {after[0]!r}, not {name!r}")
        sql = "select * from versions where full_name = %s and seq > %s order by seq"
        out = self._paged(sql, [name, after[1]], limit, lambda r: ("versions", [name, r["seq"]]))
        if not out and cursor is None:
            raise NotFound(f"no adapter named {name!r} on this hub")
        return out

    def _paged(self, sql: str, params: list[Any], limit: int | None, key: Any) -> Page[Version]:
        """One page (all rows without `limit`), its `next_cursor` from the last row's sort key."""
        if limit is None:
            return Page(self._versions(self.all(sql, params)))
        rows = self.all(sql + " limit %s", [*params, limit + 1])
        out: Page[Version] = Page(self._versions(rows[:limit]))
        if len(rows) > limit:
            out.next_cursor = encode_cursor(*key(rows[limit - 1]))
        return out

    def _row(self, full_name: str, version: str) -> dict[str, Any] | None:
        return self.one("select * from versions where full_name = %s and version = %s", [full_name, version])

    def _tagged_row(self, full_name: str, tag: str) -> dict[str, Any] | None:
        return self.one(
            "select v.* from tags t join versions v on v.id = t.version_id where t.full_name = %s and t.tag = %s",
            [full_name, tag],
        )

    def _resolve_row(self, ref: str | Ref) -> dict[str, Any]:
        r = parse_ref(ref) if isinstance(ref, str) else ref
        if r.kind == "digest":
            low, high = digest_range(r.selector)
            rows = self.all(
                "select * from versions where digest >= %s and digest < %s and full_name = %s limit 2",
                [low, high, r.full_name],
            )
            if not rows:
                raise NotFound(f"no version for {r.full_name} has digest {r.selector}")
            if len(rows) > 1:
                raise InvalidRef(f"digest prefix {r.selector} is ambiguous: give more hex digits")
            return rows[0]
        row = (
            self._row(r.full_name, r.selector)
            if r.kind == "version"
            else self._tagged_row(r.full_name, r.selector)
        )
        if row is None:
            if self.one("select 1 from adapters a where full_name = %s and exists "
                        "(select 1 from versions v where v.full_name = a.full_name)", [r.full_name]) is None:  # fmt: skip
                raise NotFound(f"no adapter named {r.full_name!r} on this hub")
            raise NotFound(f"{r.full_name} has no {r.kind} {r.selector!r}")
        return row

    def resolve(self, ref: str | Ref) -> Version:
        return self._versions([self._resolve_row(ref)])[0]

    def every_version(self) -> Iterator[Version]:
        last = 0
        while True:
            rows = self.all("select * from versions where id > %s order by id limit 500", [last])
            if not rows:
                return
            yield from self._versions(rows)
            last = rows[-1]["id"]

    # ------------------------------------------------------------------ writes

    def _lock_adapter(self, full_name: str) -> None:
        ns, _ = check_name(full_name)
        self.conn.execute(
            "insert into adapters (full_name, namespace) values (%s, %s) on conflict do nothing",
            [full_name, ns or ""],
        )
        self.conn.execute("select 1 from adapters where full_name = %s for update", [full_name])

    def _set_tag(self, full_name: str, tag: str, version_id: int) -> None:
        if tag == "latest":
            self.conn.execute(
                "update versions set is_latest = false where full_name = %s and is_latest", [full_name]
            )
            self.conn.execute("update versions set is_latest = true where id = %s", [version_id])
        self.conn.execute(
            "insert into tags (full_name, tag, version_id, updated) values (%s, %s, %s, %s) "
            "on conflict (full_name, tag) do update set version_id = excluded.version_id, updated = excluded.updated",
            [full_name, tag, version_id, af.utc_now()],
        )

    def commit(
        self, files: dict[str, str], paths: dict[str, Path], tags: Sequence[str]
    ) -> tuple[Version, bool]:
        """Record a version whose blobs are stored (the same files again: a no-op)."""
        tags = [check_tag(t) for t in tags]
        artifact = af.load_files(paths)  # the same validation as the embedded registry's commit
        manifest = artifact.manifest
        if manifest is None or manifest.version is None:
            raise InvalidArtifact(
                "manifest-schema", "a committed version needs a deltahub.json naming its version"
            )
        name, version = manifest.name, check_version(manifest.version)
        check_name(name)
        digest = af.artifact_digest(files)
        sizes = {f: paths[f].stat().st_size for f in files}
        with self._tx():
            self._lock_adapter(name)
            row = self._row(name, version)
            if row is not None:
                if row["digest"] != digest:
                    raise AlreadyExists(
                        f"{name}@{version} already exists with digest {row['digest']}, not {digest}"
                    )
                for tag in tags:
                    self._set_tag(name, tag, row["id"])
                created = False
            else:
                current = self._tagged_row(name, "latest")
                newer = current is None or version_key(version, manifest.created) >= version_key(
                    current["version"], current["created"]
                )
                seq = self.one(
                    "select coalesce(max(seq), 0) + 1 as s from versions where full_name = %s", [name]
                )["s"]
                ns, short = check_name(name)
                row = self.one(
                    "insert into versions (full_name, namespace, name, version, seq, vnum, digest, method, base_model,"
                    " base_fingerprint, task, description, license, metrics, parents, size, created, published)"
                    " values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) returning *",
                    [
                        name, ns or "", short, version, seq, int_version(version), digest, manifest.method,
                        manifest.base_model, manifest.base_fingerprint, manifest.task, manifest.description,
                        manifest.license, json.dumps(manifest.metrics, sort_keys=True),
                        json.dumps([asdict(p) for p in manifest.parents]), sum(sizes.values()),
                        manifest.created, time.time(),
                    ],
                )  # fmt: skip
                self.conn.execute(f"update versions set doc = {DOC} where id = %s", [row["id"]])
                with self.conn.cursor() as cur:
                    cur.executemany(
                        "insert into files (version_id, filename, blob, size) values (%s, %s, %s, %s)",
                        [(row["id"], f, d, sizes[f]) for f, d in files.items()],
                    )
                for tag in ("latest", *tags) if newer else tags:
                    self._set_tag(name, tag, row["id"])
                created = True
            return self._versions([self.one("select * from versions where id = %s", [row["id"]])])[0], created

    def tag(self, name: str, selector: str, tag: str) -> tuple[Version, str | None]:
        check_tag(tag)
        with self._tx():
            self._lock_adapter(name)
            before = self._tagged_row(name, tag)
            row = self._resolve_row(f"{name}@{selector}")
            self._set_tag(name, tag, row["id"])
            return self.resolve(f"{name}@{row['version']}"), before["version"] if before else None

    # ------------------------------------------------------------------ blobs

    def link(self, namespace: str, digests: Iterable[str]) -> None:
        now = time.time()
        with self.conn.cursor() as cur:
            cur.executemany(
                "insert into blob_links (namespace, digest, linked) values (%s, %s, %s) on conflict do nothing",
                [(namespace, d, now) for d in sorted(set(digests))],
            )

    def namespace_uses(self, namespace: str, digest: str) -> bool:
        return (
            self.one(
                "select 1 from blob_links where namespace = %s and digest = %s union all "
                "select 1 from files f join versions v on v.id = f.version_id where f.blob = %s and v.namespace = %s "
                "limit 1",
                [namespace, digest, digest, namespace],
            )
            is not None
        )

    def checked_key(self, digest: str) -> tuple[int, int, int, int] | None:
        r = self.one("select ino, size, mtime_ns, ctime_ns from blob_checks where digest = %s", [digest])
        return (r["ino"], r["size"], r["mtime_ns"], r["ctime_ns"]) if r else None

    def record_check(self, digest: str, key: tuple[int, int, int, int]) -> None:
        self.conn.execute(
            "insert into blob_checks (digest, ino, size, mtime_ns, ctime_ns, checked) values (%s, %s, %s, %s, %s, %s)"
            " on conflict (digest) do update set ino = excluded.ino, size = excluded.size,"
            " mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, checked = excluded.checked",
            [digest, *key, time.time()],
        )

    # ------------------------------------------------------------------ webhooks

    def hooks(self, event: str | None = None, full_name: str | None = None) -> list[dict[str, Any]]:
        out = [
            {**r, "events": json.loads(r["events"])} for r in self.all("select * from webhooks order by id")
        ]
        return [h for h in out if hook_matches(h, event, full_name)]

    def add_hook(
        self, url: str, events: Sequence[str], namespace: str | None, secret: str | None = None
    ) -> dict[str, Any]:
        check_hook(url, events, namespace)
        row = self.one(
            "insert into webhooks (url, events, namespace, secret, created) values (%s, %s, %s, %s, %s) returning id",
            [url, json.dumps(sorted(set(events))), namespace, secret or new_secret(), time.time()],
        )
        return next(h for h in self.hooks() if h["id"] == row["id"])

    def remove_hook(self, hook_id: int) -> None:
        if self.conn.execute("delete from webhooks where id = %s", [hook_id]).rowcount == 0:
            raise NotFound(f"no webhook with id {hook_id} (see `deltahub webhook list`)")

    def log_delivery(self, row: dict[str, Any]) -> None:
        cols = list(row)
        self.conn.execute(
            f"insert into deliveries ({', '.join(cols)}) values ({', '.join(['%s'] * len(cols))})",
            [bool(row[c]) if c == "ok" else row[c] for c in cols],
        )

    def deliveries(self, limit: int = 50) -> list[dict[str, Any]]:
        return [
            {**r, "ok": int(bool(r["ok"]))}
            for r in self.all("select * from deliveries order by id desc limit %s", [limit])
        ]
