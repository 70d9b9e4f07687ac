"""The hub's metadata store: one small interface, two implementations.

    sqlite:///path (default)   the embedded store: the home's registry.db (the local
                               registry, unchanged) plus hub.db (tokens, blob links, checks,
                               webhooks) -- `EmbeddedMeta` below
    postgresql://...           the team store: every table in one PostgreSQL database,
                               several server processes writing at once -- pgmeta.py

`open_meta(url, home)` picks one; the shared protocol and base class live in metastore.py. A `MetaStore` is shared by the server's threads and
hands each thread its own handle (`handle()`): a SQLite or PostgreSQL connection is not
for concurrent use. A handle answers what the routes ask:

    list / search / versions / resolve        registry reads (Version objects)
    commit(files, paths, tags, emit=)         record a version whose blobs are stored;
                                              returns (Version, created)
    tag(name, selector, tag, emit=)           move a tag; returns (Version, previous version)
                                              (`emit`: with the change's webhook deliveries,
                                              in its transaction)
    tokens                                    create / list / revoke / check (tokens.py)
    link / namespace_uses                     blob links per namespace (state.py)
    checked_key / record_check                the last hash check of a local blob
    hooks / add_hook / remove_hook / deliveries     webhooks and their delivery log
    claim / finish / pending                  the durable delivery queue (webhooks.py)
    every_version()                           all versions, for `deltahub hub copy`
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from deltahub.errors import InvalidConfig, InvalidRef, NotFound
from deltahub.hub.metastore import (
    DELIVERY_COLUMNS,
    EVENTS,
    MetaHandle,
    MetaStore,
    check_hook,
    hook_matches,
    new_secret,
    redact,
)
from deltahub.registry.refs import Ref, check_tag, parse_ref
from deltahub.registry.version import Version

log = logging.getLogger("deltahub.hub.meta")

__all__ = ["EVENTS", "EmbeddedMeta", "MetaHandle", "MetaStore", "check_pairing", "open_meta", "redact"]


def open_meta(url: str | None, home: Path | str | None = None) -> MetaStore:
    """The metadata store a URL names: `sqlite:///path` (a hub home) or `postgresql://...`.

    No URL means the embedded store in `home` (default `$DELTAHUB_HOME`).
    """
    from deltahub.settings import default_home

    if not url:
        return EmbeddedMeta(Path(home) if home is not None else default_home())
    if url.startswith("sqlite:///"):
        return EmbeddedMeta(Path(url[len("sqlite:///") :]))
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        from deltahub.hub.pgmeta import PostgresMeta

        return PostgresMeta(url.replace("postgresql+psycopg://", "postgresql://", 1))
    raise InvalidConfig(
        f"--db {redact(url)!r} is neither sqlite:///PATH (a hub home) nor postgresql://USER@HOST/DB"
    )


def check_pairing(meta: MetaStore, blobs_url: str | None) -> None:
    """The embedded registry reads its blobs from its own home: it takes no other blob store."""
    if not isinstance(meta, EmbeddedMeta) or not blobs_url:
        return
    if blobs_url.startswith("s3://"):
        raise InvalidConfig(
            "S3 blobs need the PostgreSQL metadata store (--db postgresql://...): the embedded "
            "registry reads its blobs from its home"
        )
    path = Path(blobs_url[len("file://") :] if blobs_url.startswith("file://") else blobs_url)
    if path.resolve() != meta.home.resolve():
        raise InvalidConfig(
            f"the embedded metadata store keeps its blobs in its home ({meta.home}), not {path}: "
            "drop --blobs, or use --db postgresql://..."
        )


# ----------------------------------------------------------------------------- embedded


class EmbeddedMeta(MetaStore):
    """The embedded default: the home's registry.db and hub.db (SQLite), as before."""

    def __init__(self, home: Path) -> None:
        super().__init__()
        self.home = Path(home)
        self.url = f"sqlite:///{self.home}"
        self.handle()  # create the home and apply migrations once, up front

    def _open(self) -> MetaHandle:
        return EmbeddedHandle(self.home)


class EmbeddedHandle:
    """A `Registry` and a `TokenStore` (hub.db) on this thread's own connections."""

    def __init__(self, home: Path) -> None:
        from deltahub.hub import hubdb
        from deltahub.hub.tokens import TokenStore
        from deltahub.registry import Registry

        self.registry = Registry(home)
        self.tokens = TokenStore(home)
        self.db = self.tokens.db  # hub.db
        hubdb.prepare_outbox(self.registry.db)

    def close(self) -> None:
        self.registry.close()
        self.tokens.close()

    # registry
    def list(self, **filters: Any) -> list[Version]:
        return self.registry.list(**filters)  # a Page: a list with .next_cursor

    def search(self, query: str, limit: int | None = 50, cursor: str | None = None) -> list[Version]:
        return self.registry.search(query, limit=limit, cursor=cursor)

    def versions(self, name: str, limit: int | None = None, cursor: str | None = None) -> list[Version]:
        return self.registry.versions(name, limit=limit, cursor=cursor)

    def resolve(self, ref: str | Ref) -> Version:
        return self.registry.resolve(ref)

    def manifest(self, ref: str | Ref) -> Any:
        return self.registry.manifest(ref)

    # A change with `emit` writes its delivery rows to registry.db's outbox in the registry's
    # own transaction (joined by the Registry's), then relays them to hub.db (hubdb.py).
    def commit(
        self, files: dict[str, str], paths: dict[str, Path], tags: Sequence[str], *, emit: bool = False
    ) -> tuple[Version, bool]:
        from deltahub.registry.db import write_transaction

        tags = [check_tag(t) for t in tags]
        with write_transaction(self.registry.db):  # reads before the change under its lock
            existed = _exists(self, files, paths)
            name = _manifest(paths).name if emit else ""
            before = {t: _tagged_version(self, name, t) for t in tags} if emit else {}
            v = self.registry.commit(files, tags)
            if emit:
                self._record_deliveries(v, created=not existed, before=before)
        if emit:
            self._relay()
        return v, not existed

    def tag(self, name: str, selector: str, tag: str, *, emit: bool = False) -> tuple[Version, str | None]:
        from deltahub.registry.db import write_transaction

        check_tag(tag)
        with write_transaction(self.registry.db):
            before = _tagged_version(self, name, tag)
            v = self.registry.tag(f"{name}@{selector}", tag)
            if emit:
                self._record_deliveries(v, created=False, before={tag: before})
        if emit:
            self._relay()
        return v, before

    def _record_deliveries(self, v: Version, *, created: bool, before: dict[str, str | None]) -> None:
        from deltahub.hub import hubdb
        from deltahub.hub.webhooks import outbox_rows

        rows = outbox_rows(self.hooks, v.full_name, v, created=created, before=before)
        if rows:
            hubdb.add_outbox(self.registry.db, rows)

    def _relay(self) -> None:
        """Outbox rows to hub.db's deliveries; what fails here waits for the next claim."""
        from deltahub.hub import hubdb

        try:
            hubdb.relay(self.registry.db, self.db)
        except Exception:
            log.exception("cannot move webhook deliveries to hub.db yet (the next claim will)")

    # hub.db
    def link(self, namespace: str, digests: Iterable[str]) -> None:
        from deltahub.hub import hubdb

        hubdb.link(self.db, namespace, digests)

    def namespace_uses(self, namespace: str, digest: str) -> bool:
        from deltahub.hub import hubdb

        if hubdb.is_linked(self.db, namespace, digest):
            return True
        # Versions committed without the hub (a publish or pull into the hub's home).
        found = self.registry.db.execute(
            "select 1 from files f join versions v on v.id = f.version_id"
            " where f.blob = ? and v.namespace = ? limit 1",
            [digest, namespace],
        )
        return found.fetchone() is not None

    def checked_key(self, digest: str) -> tuple[int, int, int, int] | None:
        from deltahub.hub import hubdb

        return hubdb.checked_key(self.db, digest)

    def record_check(self, digest: str, key: tuple[int, int, int, int]) -> None:
        from deltahub.hub import hubdb

        hubdb.record_check(self.db, digest, key)

    # webhooks
    def hooks(self, event: str | None = None, full_name: str | None = None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "select id, url, events, namespace, secret, created from webhooks order by id"
        ).fetchall()
        out = [
            {
                "id": r[0],
                "url": r[1],
                "events": json.loads(r[2]),
                "namespace": r[3],
                "secret": r[4],
                "created": r[5],
            }
            for r in rows
        ]
        return [h for h in out if hook_matches(h, event, full_name)]

    def add_hook(
        self, url: str, events: Sequence[str], namespace: str | None, secret: str | None = None
    ) -> dict[str, Any]:
        check_hook(url, events, namespace)
        with self.db.conn:
            cur = self.db.conn.execute(
                "insert into webhooks (url, events, namespace, secret, created) values (?, ?, ?, ?, ?)",
                [url, json.dumps(sorted(set(events))), namespace, secret or new_secret(), time.time()],
            )
        return next(h for h in self.hooks() if h["id"] == cur.lastrowid)

    def remove_hook(self, hook_id: int) -> None:
        with self.db.conn:
            if self.db.conn.execute("delete from webhooks where id = ?", [hook_id]).rowcount == 0:
                raise NotFound(f"no webhook with id {hook_id} (see `deltahub webhook list`)")

    # The delivery queue: one process per hub.db, but BEGIN IMMEDIATE keeps a claim whole
    # even if another process shares the file. A claim first relays what a change left in
    # registry.db's outbox (a server that died between the commit and its relay).
    def claim(self, limit: int, lease: float, token: str) -> tuple[list[dict[str, Any]], float | None]:
        from deltahub.hub import hubdb

        hubdb.relay(self.registry.db, self.db)
        conn, now = self.db.conn, time.time()
        due = "select 1 from deliveries where state = 'pending' and due <= ? limit 1"
        if conn.execute(due, [now]).fetchone() is None:  # idle: no write lock taken
            return [], conn.execute(_SOONEST).fetchone()[0]
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                "select d.id, d.hook_id, d.event, d.delivery, d.url, d.payload, d.attempts, w.secret"
                " from deliveries d left join webhooks w on w.id = d.hook_id"
                " where d.state = 'pending' and d.due <= ? order by d.due, d.id limit ?",
                [now, limit],
            )
            rows = [dict(zip([c[0] for c in cur.description], r, strict=True)) for r in cur.fetchall()]
            conn.executemany(
                "update deliveries set due = ?, claim = ? where id = ?",
                [(now + lease, token, r["id"]) for r in rows],
            )
            soonest = None if rows else conn.execute(_SOONEST).fetchone()[0]
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return rows, soonest

    def finish(self, delivery_id: int, token: str, outcome: dict[str, Any]) -> bool:
        sets = ", ".join(f"{c} = ?" for c in outcome)
        with self.db.conn:
            cur = self.db.conn.execute(
                f"update deliveries set {sets}, claim = null where id = ? and claim = ? and state = 'pending'",
                [*outcome.values(), delivery_id, token],
            )
        return cur.rowcount == 1

    def pending(self) -> int:
        from deltahub.hub import hubdb

        # The outbox first: a relay in between may count a row twice, never zero times.
        waiting = hubdb.unrelayed(self.registry.db, self.db)
        return (
            waiting + self.db.execute("select count(*) from deliveries where state = 'pending'").fetchone()[0]
        )

    def deliveries(self, limit: int = 50) -> list[dict[str, Any]]:
        self._relay()
        cur = self.db.execute(
            f"select {', '.join(DELIVERY_COLUMNS)} from deliveries order by id desc limit ?", [limit]
        )
        return [dict(zip(DELIVERY_COLUMNS, r, strict=True)) for r in cur.fetchall()]

    def every_version(self) -> Iterator[Version]:
        cursor = None
        while True:
            page = self.registry.list(all_versions=True, limit=500, cursor=cursor)
            yield from page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor


_SOONEST = "select min(due) from deliveries where state = 'pending'"


def _manifest(paths: dict[str, Path]) -> Any:
    from deltahub import artifact as af

    return af.Manifest.from_dict(
        af.read_json_file(paths[af.MANIFEST_FILE], af.MAX_MANIFEST_BYTES, "manifest-json")
    )


def _exists(h: Any, files: dict[str, str], paths: dict[str, Path]) -> bool:
    """Whether the version a commit names is already recorded (so the commit adds nothing)."""
    manifest = _manifest(paths)
    if manifest.version is None:
        return False
    try:
        h.resolve(f"{manifest.name}@{manifest.version}")
    except (NotFound, InvalidRef):
        return False
    return True


def _tagged_version(h: Any, name: str, tag: str) -> str | None:
    try:
        return h.resolve(parse_ref(f"{name}@{tag}")).version
    except (NotFound, InvalidRef):
        return None
