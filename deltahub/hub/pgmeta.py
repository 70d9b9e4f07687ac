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

Connections come from a pool (psycopg_pool): at most `pool_size` per server process
(`DELTAHUB_DB_POOL_SIZE`, default 8), whatever the number of request threads. Each handle
method borrows one connection for its duration (a transaction keeps its connection), and a
borrowed connection is checked first (`usable`): after a PostgreSQL restart, or a backend
terminated by an administrator, the broken connections are dropped and the request runs on
a new one instead of failing.

The schema and its migrations: pgschema.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from deltahub import artifact as af
from deltahub.errors import AlreadyExists, InvalidArtifact, InvalidConfig, InvalidRef, NotFound
from deltahub.hub.metastore import DELIVERY_COLUMNS, MetaStore, check_hook, hook_matches, new_secret, redact
from deltahub.hub.pgschema import DOC, MIGRATIONS, connect, migrate, open_pool, schema_version
from deltahub.hub.tokens import TokenStore
from deltahub.registry.refs import Ref, check_name, check_tag, check_version, parse_ref
from deltahub.registry.version import Page, Version, check_limit, decode_cursor, encode_cursor, version_key

POOL_SIZE_ENV = "DELTAHUB_DB_POOL_SIZE"
DB_NOW = "extract(epoch from statement_timestamp())::float8"
DEFAULT_POOL_SIZE = 8


def pool_size_from_env() -> int:
    raw = os.environ.get(POOL_SIZE_ENV, "").strip()
    if not raw:
        return DEFAULT_POOL_SIZE
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise InvalidConfig(f"{POOL_SIZE_ENV}={raw!r} must be a whole number of connections, 1 to 1000")
    return int(raw)


class PostgresMeta(MetaStore):
    """Hub metadata in one PostgreSQL database, through a pool of `pool_size` connections."""

    def __init__(self, url: str, *, create: bool = True, pool_size: int | None = None) -> None:
        super().__init__()
        self.url = url
        self.pool_size = pool_size or pool_size_from_env()
        if self.pool_size < 1:
            raise InvalidConfig(f"a connection pool needs at least one connection, not {self.pool_size}")
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
        self.pool = open_pool(url, self.pool_size)
        self.handle()

    def _open(self) -> PgHandle:
        return PgHandle(self)

    def borrow(self) -> Any:
        """A pooled connection that answers; give it back with `self.pool.putconn`.

        A broken connection (PostgreSQL restarted, backend terminated) goes back to the
        pool, which closes it and opens another; at most every pooled connection is tried
        once, then a new one serves (or its error is raised).
        """
        import psycopg

        for _ in range(self.pool_size):
            conn = self.pool.getconn()
            try:
                if usable(conn):
                    return conn
            except psycopg.Error:
                pass
            self.pool.putconn(conn)
        return self.pool.getconn()

    def close(self) -> None:
        super().close()
        self.pool.close()


def usable(conn: Any) -> bool:
    """Whether an idle pooled connection still works (raises psycopg.Error if it does not).

    PostgreSQL tells a client when it ends its backend (terminated, or the server shutting
    down for a restart): a FATAL error, then the socket closes. So a connection whose
    socket has nothing to read is as good as when it went back to the pool, and costs a
    poll (microseconds); one with something to read runs an empty query, which raises if
    the connection is gone. A round trip on every borrow cost ~70 us of the request.
    """
    if conn.closed:
        return False
    try:
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        if not poller.poll(0):
            return True
    except (AttributeError, OSError, ValueError):  # no poll() here: ask the server
        pass
    conn.execute("")
    return True


F = TypeVar("F", bound=Callable[..., Any])


def borrowing(fn: F) -> F:
    """Run a handle method on one pooled connection (the caller's, if it holds one)."""

    @functools.wraps(fn)
    def wrapper(self: PgHandle, *args: Any, **kw: Any) -> Any:
        with self.session():
            return fn(self, *args, **kw)

    return wrapper  # type: ignore[return-value]


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
        self.h.execute(f"update tokens set {sets} where id = %s", [*values.values(), pk])


class PgHandle:
    """One thread's view of the store: every query the hub asks of its metadata.

    It holds no connection between calls: each public method borrows one from the pool
    (`session`), a transaction keeps it until it commits.
    """

    broken = False

    def __init__(self, meta: PostgresMeta) -> None:
        self.meta = meta
        self.url = meta.url
        self._conn: Any = None
        self.tokens = PgTokens(self)

    @contextmanager
    def session(self) -> Iterator[Any]:
        """A pooled connection for the block (reentrant: nested blocks share it)."""
        if self._conn is not None:
            yield self._conn
            return
        conn = self.meta.borrow()
        self._conn = conn
        try:
            yield conn
        finally:
            self._conn = None
            self.meta.pool.putconn(conn)  # rolls back what is left open; drops a broken one

    @property
    def conn(self) -> Any:
        if self._conn is None:
            raise RuntimeError("PgHandle.conn outside a session (use `with handle.session():`)")
        return self._conn

    def close(self) -> None:
        pass  # the pool owns the connections

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        with self.session() as conn:
            return conn.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self.session() as conn:
            return conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it touched."""
        with self.session() as conn:
            return conn.execute(sql, params).rowcount

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self.session() as conn, conn.transaction():
            yield conn

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

    @borrowing
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

    @borrowing
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

    @borrowing
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

    @borrowing
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

    @borrowing
    def commit(
        self, files: dict[str, str], paths: dict[str, Path], tags: Sequence[str], *, emit: bool = False
    ) -> tuple[Version, bool]:
        """Record a version whose blobs are stored (the same files again: a no-op).

        With `emit`, its webhook deliveries are written in the same transaction."""
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
            before = {t: self._tagged_version(name, t) for t in tags} if emit else {}
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
            v = self._versions([self.one("select * from versions where id = %s", [row["id"]])])[0]
            if emit:
                self._record_deliveries(v, created=created, before=before)
            return v, created

    @borrowing
    def tag(self, name: str, selector: str, tag: str, *, emit: bool = False) -> tuple[Version, str | None]:
        check_tag(tag)
        with self._tx():
            self._lock_adapter(name)
            before = self._tagged_version(name, tag)
            row = self._resolve_row(f"{name}@{selector}")
            self._set_tag(name, tag, row["id"])
            v = self.resolve(f"{name}@{row['version']}")
            if emit:
                self._record_deliveries(v, created=False, before={tag: before})
            return v, before

    def _tagged_version(self, name: str, tag: str) -> str | None:
        row = self._tagged_row(name, tag)
        return row["version"] if row else None

    # ------------------------------------------------------------------ blobs

    @borrowing
    def link(self, namespace: str, digests: Iterable[str]) -> None:
        now = time.time()
        with self.conn.cursor() as cur:
            cur.executemany(
                "insert into blob_links (namespace, digest, linked) values (%s, %s, %s) on conflict do nothing",
                [(namespace, d, now) for d in sorted(set(digests))],
            )

    @borrowing
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

    @borrowing
    def checked_key(self, digest: str) -> tuple[int, int, int, int] | None:
        r = self.one("select ino, size, mtime_ns, ctime_ns from blob_checks where digest = %s", [digest])
        return (r["ino"], r["size"], r["mtime_ns"], r["ctime_ns"]) if r else None

    @borrowing
    def record_check(self, digest: str, key: tuple[int, int, int, int]) -> None:
        self.conn.execute(
            "insert into blob_checks (digest, ino, size, mtime_ns, ctime_ns, checked) values (%s, %s, %s, %s, %s, %s)"
            " on conflict (digest) do update set ino = excluded.ino, size = excluded.size,"
            " mtime_ns = excluded.mtime_ns, ctime_ns = excluded.ctime_ns, checked = excluded.checked",
            [digest, *key, time.time()],
        )

    # ------------------------------------------------------------------ webhooks

    @borrowing
    def hooks(self, event: str | None = None, full_name: str | None = None) -> list[dict[str, Any]]:
        out = [
            {**r, "events": json.loads(r["events"])} for r in self.all("select * from webhooks order by id")
        ]
        return [h for h in out if hook_matches(h, event, full_name)]

    @borrowing
    def add_hook(
        self, url: str, events: Sequence[str], namespace: str | None, secret: str | None = None
    ) -> dict[str, Any]:
        check_hook(url, events, namespace)
        row = self.one(
            "insert into webhooks (url, events, namespace, secret, created) values (%s, %s, %s, %s, %s) returning id",
            [url, json.dumps(sorted(set(events))), namespace, secret or new_secret(), time.time()],
        )
        return next(h for h in self.hooks() if h["id"] == row["id"])

    @borrowing
    def remove_hook(self, hook_id: int) -> None:
        if self.conn.execute("delete from webhooks where id = %s", [hook_id]).rowcount == 0:
            raise NotFound(f"no webhook with id {hook_id} (see `deltahub webhook list`)")

    # A delivery is one row from its event on (see webhooks.py): written in the transaction
    # of the change that makes it, `pending` until delivered or out of attempts. A claim
    # takes due rows with FOR UPDATE SKIP LOCKED and moves their `due` past the lease in the
    # same transaction, so no other process takes them until the claimer finishes or dies.

    def _record_deliveries(self, v: Version, *, created: bool, before: dict[str, str | None]) -> None:
        """Write a change's delivery rows (webhooks.outbox_rows) in its open transaction."""
        from deltahub.hub.webhooks import outbox_rows

        rows = outbox_rows(self.hooks, v.full_name, v, created=created, before=before)
        if not rows:
            return
        with self.conn.cursor() as cur:
            cur.executemany(
                "insert into deliveries (hook_id, event, delivery, url, payload, state, ok, attempts, due, at)"
                f" values (%s, %s, %s, %s, %s, 'pending', false, 0, {DB_NOW}, %s)",
                [(r["hook_id"], r["event"], r["delivery"], r["url"], r["payload"], r["due"]) for r in rows],
            )

    @borrowing
    def claim(self, limit: int, lease: float, token: str) -> tuple[list[dict[str, Any]], float | None]:
        # Due and lease by the database's clock: servers on other machines may disagree.
        with self._tx():
            rows = self.all(
                "select d.id, d.hook_id, d.event, d.delivery, d.url, d.payload, d.attempts, w.secret"
                " from deliveries d left join webhooks w on w.id = d.hook_id"
                f" where d.state = 'pending' and d.due <= {DB_NOW} order by d.due, d.id limit %s"
                " for update of d skip locked",
                [limit],
            )
            if rows:
                self.execute(
                    f"update deliveries set due = {DB_NOW} + %s, claim = %s where id = any(%s)",
                    [lease, token, [r["id"] for r in rows]],
                )
                return rows, None
        soonest = self.one("select min(due) as due from deliveries where state = 'pending'")
        return [], soonest["due"] if soonest else None

    @borrowing
    def finish(self, delivery_id: int, token: str, outcome: dict[str, Any]) -> bool:
        cols = [c for c in outcome if c != "due"]
        sets = [f"{c} = %s" for c in cols]
        params = [bool(outcome[c]) if c == "ok" else outcome[c] for c in cols]
        if "due" in outcome:  # the next attempt: the same delay, by the database's clock
            sets.append(f"due = {DB_NOW} + %s")
            params.append(max(0.0, outcome["due"] - time.time()))
        sql = f"update deliveries set {', '.join(sets)}, claim = null where id = %s and claim = %s and state = 'pending'"
        return self.execute(sql, [*params, delivery_id, token]) == 1

    def pending(self) -> int:
        return self.one("select count(*) as n from deliveries where state = 'pending'")["n"]

    @borrowing
    def deliveries(self, limit: int = 50) -> list[dict[str, Any]]:
        return [
            {**r, "ok": int(bool(r["ok"]))}
            for r in self.all(
                f"select {', '.join(DELIVERY_COLUMNS)} from deliveries order by id desc limit %s", [limit]
            )
        ]
