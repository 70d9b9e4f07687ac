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
    deliveries    one row per delivery, from its emit on: the durable queue while `pending`
                  (webhooks.py), then the delivery log (its last status and attempts)
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from sqlite_utils import Database, Migrations

migrations = Migrations("deltahub.hub")


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
    """Deliveries become rows from their emit on (webhooks.py): `state` pending, delivered or
    failed; `payload` the body every attempt signs; `due` when a worker may next take the
    row (its next attempt, or the end of a claim's lease); `claim` the claimer's token.
    Rows logged before this were finished deliveries."""
    table = db["deliveries"]
    for column, kind in (("state", str), ("payload", str), ("due", float), ("claim", str)):
        table.add_column(column, kind)
    db.execute("update deliveries set state = case when ok then 'delivered' else 'failed' end")
    table.create_index(["state", "due"])
