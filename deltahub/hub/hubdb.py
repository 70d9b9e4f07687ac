"""The hub's own database, `hub.db` in the server's home (the registry's is `registry.db`).

Schema by sqlite-utils `Migrations` ("deltahub.hub"):

    tokens        bearer tokens (SHA-256 only; see tokens.py)
    blob_links    (namespace, digest): the blob was uploaded to, or committed in, that
                  namespace. Blobs are scoped per namespace as Docker's registry scopes
                  them per repository: a namespaced token reads, HEADs and commits only
                  blobs linked to its namespace (see state.HubState.can_use_blob).
    blob_checks   digest -> the (inode, size, mtime, ctime) at which its bytes last hashed
                  to the digest; a blob is re-hashed before it is served whenever these
                  change (see blobs.verified_path).
    webhooks      URL, events, namespace and signing secret of each webhook (webhooks.py)
    deliveries    one row per delivery, from its event on: the durable queue while `pending`
                  (webhooks.py), then the delivery log (its last status and attempts)

and one table of the hub's in registry.db ("deltahub.hub.outbox"), so that an event's
delivery rows commit in the registry transaction that makes the event:

    hub_outbox    delivery rows (as `deliveries` takes them) written with the commit or tag
                  move that causes them; `relay` moves them into hub.db's `deliveries`
                  right after that commit, or later (the next claim) after a crash
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from sqlite_utils import Database, Migrations

migrations = Migrations("deltahub.hub")
outbox_migrations = Migrations("deltahub.hub.outbox")  # applied to registry.db
OUTBOX_COLUMNS = ("hook_id", "event", "delivery", "url", "payload", "due")


@migrations()
def m001_tokens(db: Database) -> None:
    db["tokens"].create(
        {
            "id": int,
            "lookup": str,
            "hash": str,
            "scope": str,
            "namespace": str,
            "description": str,
            "created": float,
            "expires": float,
            "revoked": float,
        },
        pk="id",
        not_null={"lookup", "hash", "scope", "created"},
    )
    db["tokens"].create_index(["lookup"])


@migrations()
def m002_blob_links_and_checks(db: Database) -> None:
    db["blob_links"].create(
        {"namespace": str, "digest": str, "linked": float}, pk=("namespace", "digest"), not_null={"linked"}
    )
    db["blob_links"].create_index(["digest"])
    db["blob_checks"].create(
        {"digest": str, "ino": int, "size": int, "mtime_ns": int, "ctime_ns": int, "checked": float},
        pk="digest",
    )


def connect(home: Path | str) -> Database:
    """Open (creating if needed) `<home>/hub.db` and apply pending migrations."""
    path = Path(home) / "hub.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    db = Database(conn, execute_plugins=False)
    if migrations.pending(db):
        conn.execute("BEGIN IMMEDIATE")
        try:
            migrations.apply(db)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return db


def link(db: Database, namespace: str, digests: Iterable[str]) -> None:
    """Record that `namespace` ("" for bare names) may use these blobs."""
    now = time.time()
    with db.conn:
        db.conn.executemany(
            "insert or ignore into blob_links (namespace, digest, linked) values (?, ?, ?)",
            [(namespace, d, now) for d in set(digests)],
        )


def is_linked(db: Database, namespace: str, digest: str) -> bool:
    return (
        db.execute(
            "select 1 from blob_links where namespace = ? and digest = ? limit 1", [namespace, digest]
        ).fetchone()
        is not None
    )


StatKey = tuple[int, int, int, int]


def checked_key(db: Database, digest: str) -> StatKey | None:
    row = db.execute(
        "select ino, size, mtime_ns, ctime_ns from blob_checks where digest = ?", [digest]
    ).fetchone()
    return tuple(row) if row else None  # type: ignore[return-value]


def record_check(db: Database, digest: str, key: StatKey) -> None:
    with db.conn:
        db.conn.execute(
            "insert or replace into blob_checks (digest, ino, size, mtime_ns, ctime_ns, checked)"
            " values (?, ?, ?, ?, ?, ?)",
            [digest, *key, time.time()],
        )


@migrations()
def m003_webhooks(db: Database) -> None:
    """Webhooks (see webhooks.py) and the log of their deliveries."""
    db["webhooks"].create(
        {"id": int, "url": str, "events": str, "namespace": str, "secret": str, "created": float},
        pk="id",
        not_null={"url", "events", "secret", "created"},
    )
    db["deliveries"].create(
        {
            "id": int,
            "hook_id": int,
            "event": str,
            "delivery": str,
            "url": str,
            "status": int,
            "ok": int,
            "attempts": int,
            "error": str,
            "at": float,
        },
        pk="id",
    )


@migrations()
def m004_durable_deliveries(db: Database) -> None:
    """Deliveries become rows from their event on (webhooks.py): `state` pending, delivered or
    failed; `payload` the body every attempt signs; `due` when a worker may next take the
    row (its next attempt, or the end of a claim's lease); `claim` the claimer's token.
    Rows logged before this were finished deliveries."""
    table = db["deliveries"]
    for column, kind in (("state", str), ("payload", str), ("due", float), ("claim", str)):
        table.add_column(column, kind)
    db.execute("update deliveries set state = case when ok then 'delivered' else 'failed' end")
    table.create_index(["state", "due"])


@migrations()
def m005_delivery_index(db: Database) -> None:
    """`relay` looks deliveries up by their X-Deltahub-Delivery id."""
    db["deliveries"].create_index(["delivery"])


# ----------------------------------------------------------------------------- the outbox


@outbox_migrations()
def m001_hub_outbox(db: Database) -> None:
    db["hub_outbox"].create(
        {"id": int, "hook_id": int, "event": str, "delivery": str, "url": str, "payload": str, "due": float},
        pk="id",
        not_null={"event", "delivery", "payload", "due"},
    )


def prepare_outbox(registry_db: Database) -> None:
    """Create registry.db's `hub_outbox` if it is not there (a read-only home has none)."""
    from deltahub.registry.db import write_transaction

    if registry_db.execute("PRAGMA query_only").fetchone()[0]:
        return
    if outbox_migrations.pending(registry_db):
        with write_transaction(registry_db):
            outbox_migrations.apply(registry_db)


def add_outbox(registry_db: Database, rows: list[dict]) -> None:
    """Write delivery rows in the registry transaction the caller holds (no commit here)."""
    registry_db.conn.executemany(
        f"insert into hub_outbox ({', '.join(OUTBOX_COLUMNS)}) values ({', '.join('?' * len(OUTBOX_COLUMNS))})",
        [tuple(r[c] for c in OUTBOX_COLUMNS) for r in rows],
    )


def _outbox(registry_db: Database) -> list[tuple]:
    if "hub_outbox" not in _tables(registry_db):
        return []
    cols = ", ".join(OUTBOX_COLUMNS)
    return registry_db.execute(f"select id, {cols} from hub_outbox order by id").fetchall()


def _tables(db: Database) -> set[str]:
    return {r[0] for r in db.execute("select name from sqlite_master where type = 'table'").fetchall()}


def relay(registry_db: Database, db: Database) -> int:
    """Move outbox rows into `deliveries` (pending, as written); the number moved.

    A row already in `deliveries` (a relay that died before its delete) is not added
    again: its X-Deltahub-Delivery id is the key. Two relays at once add each row once.
    """
    from deltahub.registry.db import write_transaction

    rows = _outbox(registry_db)
    if not rows:
        return 0
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        for _, hook_id, event, delivery, url, payload, due in rows:
            conn.execute(
                "insert into deliveries (hook_id, event, delivery, url, payload, state, ok, attempts, due, at)"
                " select ?, ?, ?, ?, ?, 'pending', 0, 0, ?, ?"
                " where not exists (select 1 from deliveries where delivery = ?)",
                [hook_id, event, delivery, url, payload, due, due, delivery],
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    with write_transaction(registry_db):
        registry_db.conn.executemany("delete from hub_outbox where id = ?", [(r[0],) for r in rows])
    return len(rows)


def unrelayed(registry_db: Database, db: Database) -> int:
    """Outbox rows not yet in `deliveries` (pending deliveries a relay has still to move)."""
    ids = [r[3] for r in _outbox(registry_db)]
    if not ids:
        return 0
    found = db.execute(
        f"select count(distinct delivery) from deliveries where delivery in ({', '.join('?' * len(ids))})",
        ids,
    ).fetchone()[0]
    return len(ids) - found
