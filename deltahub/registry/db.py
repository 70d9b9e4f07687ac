"""The registry database: SQLite through sqlite-utils, WAL, schema by `Migrations`.

Writes go through `write_transaction`, which takes the write lock up front with
`BEGIN IMMEDIATE` so two publishers serialize instead of failing mid-transaction.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlite_utils import Database, Migrations

from deltahub.errors import DeltahubError, ReadOnly, StorageFull

BUSY_TIMEOUT_S = 60.0

migrations = Migrations("deltahub.registry")


@migrations()
def m001_initial(db: Database) -> None:
    db["versions"].create(
        {
            "id": int,
            "full_name": str,
            "namespace": str,
            "name": str,
            "version": str,
            "seq": int,
            "digest": str,
            "method": str,
            "base_model": str,
            "base_fingerprint": str,
            "task": str,
            "description": str,
            "license": str,
            "metrics": str,
            "parents": str,
            "size": int,
            "created": str,
            "published": float,
        },
        pk="id",
        not_null={"full_name", "name", "version", "seq", "digest", "method", "created"},
    )
    db["versions"].create_index(["full_name", "version"], unique=True)
    db["versions"].create_index(["full_name", "seq"], unique=True)
    db["versions"].create_index(["digest"])
    db["files"].create(
        {"version_id": int, "filename": str, "blob": str, "size": int},
        pk=("version_id", "filename"),
        foreign_keys=[("version_id", "versions", "id")],
    )
    db["files"].create_index(["blob"])
    db["tags"].create(
        {"full_name": str, "tag": str, "version_id": int, "updated": str},
        pk=("full_name", "tag"),
        foreign_keys=[("version_id", "versions", "id")],
    )
    db["versions"].enable_fts(
        ["full_name", "description", "task", "method", "base_model"], create_triggers=True
    )


FILTERS = ("task", "method", "base_model")


@migrations()
def m002_indexes_for_scale(db: Database) -> None:
    """Every hot query served by an index, at a million versions, wide or deep.

    `vnum` (the version as an integer, when it is one) makes the next version number an
    index lookup; `is_latest` mirrors the `latest` tag on the row so that listing the latest
    version of each adapter, with or without a filter, walks small partial indexes in page
    order; `latest_fts` indexes only latest versions, so a search page stops early in any
    registry shape.
    """
    versions = db["versions"]
    versions.add_column("vnum", int)
    versions.add_column("is_latest", int)
    db.execute(
        "update versions set vnum = cast(version as integer) where version glob '[0-9]*' "
        "and version not glob '*[^0-9]*' and length(version) <= 18"
    )
    db.execute(
        "update versions set is_latest = 1 where id in (select version_id from tags where tag = 'latest')"
    )
    versions.create_index(["full_name", "vnum"])
    db.execute("create index idx_versions_latest on versions (full_name) where is_latest = 1")
    for column in FILTERS:
        versions.create_index([column, "full_name", "seq"])
        db.execute(
            f"create index idx_versions_latest_{column} on versions ({column}, full_name) where is_latest = 1"
        )
    db["tags"].create_index(["version_id"])
    versions.disable_fts()
    db.execute("create virtual table latest_fts using fts5(full_name, description, task, method, base_model)")
    db.execute(
        "insert into latest_fts (rowid, full_name, description, task, method, base_model) "
        "select id, full_name, description, task, method, base_model from versions where is_latest = 1"
    )


@migrations()
def m003_pins(db: Database) -> None:
    """Which versions pin which digests (a fusion's or merge's parents), found by index.

    `rm` asks it before removing a version others depend on; `verify` for dangling pins.
    """
    db["pins"].create(
        {"version_id": int, "digest": str},
        pk=("version_id", "digest"),
        foreign_keys=[("version_id", "versions", "id")],
    )
    db["pins"].create_index(["digest"])
    db.execute(
        "insert or ignore into pins (version_id, digest) "
        "select v.id, json_extract(p.value, '$.digest') from versions v, json_each(v.parents) p "
        "where json_valid(v.parents) and json_extract(p.value, '$.digest') is not null"
    )


@migrations()
def m004_evals(db: Database) -> None:
    """Scores measured after publishing (`deltahub eval --record`): versions are immutable."""
    db["evals"].create(
        {
            "id": int,
            "version_id": int,
            "metric": str,
            "value": float,
            "data_digest": str,
            "rows": int,
            "base": str,
            "created": str,
        },
        pk="id",
        not_null={"version_id", "metric", "value"},
        foreign_keys=[("version_id", "versions", "id")],
    )
    db["evals"].create_index(["version_id"])


def connect(path: Path) -> Database:
    """Open (creating if needed) the registry database and apply pending migrations.

    Where the home is read-only (a shared mount, an image layer), the database opens
    read-only: every read works, every write raises `ReadOnly`.
    """
    if not writable(path):
        return connect_read_only(path)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    db = Database(conn, execute_plugins=False)
    if migrations.pending(db):
        # Concurrent first opens: take the write lock, then re-check under it.
        with write_transaction(db):
            migrations.apply(db)
    return db


def sqlite_error(e: BaseException, path: str | Path = "the registry database") -> DeltahubError | None:
    """The one-line error for a full disk or a read-only database (None for anything else)."""
    if not isinstance(e, sqlite3.Error):
        return None
    text = str(e)
    if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in text:
        return StorageFull(f"no space left for {path}: free some (`deltahub gc`) and try again")
    if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_READONLY or "readonly database" in text:
        return ReadOnly(f"{path} is read-only here: reading works, writing needs a writable DELTAHUB_HOME")
    return None


def writable(path: Path) -> bool:
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def connect_read_only(path: Path) -> Database:
    if not path.exists():  # nothing published here: an empty registry that refuses writes
        conn = sqlite3.connect(":memory:", check_same_thread=False)
        db = Database(conn, execute_plugins=False)
        migrations.apply(db)
    else:
        uri = "file:" + urllib.parse.quote(str(path.resolve()))
        # A WAL database needs its -shm file; where that cannot be made, read the file as
        # it is (the last writer to close checkpointed it).
        for suffix in ("?mode=ro", "?mode=ro&immutable=1"):
            try:
                conn = sqlite3.connect(
                    uri + suffix, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False
                )
                conn.execute("select count(*) from sqlite_master").fetchone()
                break
            except sqlite3.Error:
                continue
        else:
            raise ReadOnly(f"{path} cannot be read from this read-only home")
        db = Database(conn, execute_plugins=False)
        if migrations.pending(db):
            raise ReadOnly(
                f"{path} was written by an older deltahub and needs a one-time upgrade: "
                "open it once where its home is writable"
            )
    conn.execute("PRAGMA query_only = ON")
    return db


@contextmanager
def write_transaction(db: Database) -> Iterator[Database]:
    """`BEGIN IMMEDIATE` ... `COMMIT`, rolled back on any exception.

    Inside another write_transaction on the same connection it joins that one as a
    savepoint (the hub records a commit's webhook deliveries in the commit's transaction).
    A full disk or a read-only database becomes `StorageFull` or `ReadOnly`.
    """
    conn = db.conn
    if getattr(db, "writing", False):
        conn.execute("SAVEPOINT joined")
        try:
            yield db
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK TO joined")
                conn.execute("RELEASE joined")
            raise
        conn.execute("RELEASE joined")
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
        db.writing = True  # type: ignore[attr-defined]
        try:
            yield db
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                conn.execute("ROLLBACK")
            raise
        finally:
            db.writing = False  # type: ignore[attr-defined]
        try:
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as e:
        mapped = sqlite_error(e, db_path(db))
        if mapped is None:
            raise
        raise mapped from None


def db_path(db: Database) -> str:
    row = db.conn.execute("PRAGMA database_list").fetchone()
    return row[2] if row and row[2] else "the registry database"
