"""The hub's PostgreSQL schema: numbered migrations, applied once, and connecting.

The schema is versioned in `deltahub_schema`; `migrate()` applies what is missing in one
transaction under a transaction-scoped advisory lock, so servers (or `deltahub hub
migrate` runs) starting together migrate once. Tables mirror the embedded hub's
registry.db + hub.db; `doc` is the full-text search vector of a version (PostgreSQL's own
tsvector, GIN-indexed over latest versions only).

A server talks to PostgreSQL through a pool (psycopg_pool, `open_pool`): at most `size`
connections per process, opened on demand, closed when the server stops.
"""

from __future__ import annotations

import time
from typing import Any

from deltahub.errors import InvalidConfig
from deltahub.hub.metastore import redact

MIGRATION_LOCK = 0x64656C7461  # advisory lock key ("delta")
POOL_TIMEOUT_S = 30.0  # a request waits this long for a free pooled connection
DOC = (
    "to_tsvector('simple', regexp_replace(concat_ws(' ', full_name, description, task, method, base_model),"
    " '[^[:alnum:]]+', ' ', 'g'))"
)

MIGRATIONS: list[str] = [
    # 1: everything the embedded registry.db + hub.db hold
    """
    create table adapters (full_name text primary key, namespace text not null);
    create table versions (
        id bigserial primary key,
        full_name text not null references adapters,
        namespace text not null,
        name text not null,
        version text not null,
        seq integer not null,
        vnum bigint,
        digest text not null,
        method text not null,
        base_model text, base_fingerprint text, task text, description text, license text,
        metrics text, parents text,
        size bigint not null default 0,
        created text not null,
        published double precision,
        is_latest boolean not null default false,
        doc tsvector,
        unique (full_name, version),
        unique (full_name, seq)
    );
    create index versions_digest on versions (digest text_pattern_ops);
    create index versions_latest on versions (full_name) where is_latest;
    create index versions_doc on versions using gin (doc) where is_latest;
    create table files (
        version_id bigint not null references versions on delete cascade,
        filename text not null, blob text not null, size bigint not null,
        primary key (version_id, filename)
    );
    create index files_blob on files (blob);
    create table tags (
        full_name text not null, tag text not null,
        version_id bigint not null references versions on delete cascade,
        updated text not null,
        primary key (full_name, tag)
    );
    create index tags_version on tags (version_id);
    create table tokens (
        id bigserial primary key, lookup text not null, hash text not null, scope text not null,
        namespace text, description text, created double precision not null,
        expires double precision, revoked double precision
    );
    create index tokens_lookup on tokens (lookup);
    create table blob_links (
        namespace text not null, digest text not null, linked double precision not null,
        primary key (namespace, digest)
    );
    create index blob_links_digest on blob_links (digest);
    create table blob_checks (
        digest text primary key, ino bigint, size bigint, mtime_ns bigint, ctime_ns bigint,
        checked double precision
    );
    create table webhooks (
        id bigserial primary key, url text not null, events text not null, namespace text,
        secret text not null, created double precision not null
    );
    create table deliveries (
        id bigserial primary key, hook_id bigint, event text, delivery text, url text,
        status integer, ok boolean, attempts integer, error text, at double precision
    );
    """,
    # 2: durable webhook deliveries (webhooks.py): a delivery is a row from its emit on,
    # `pending` until delivered or out of attempts; `due` is when a worker may next take it
    # (its next attempt, or the end of a claim's lease), `claim` the claimer's token, and
    # `payload` the exact body every attempt signs. Rows logged before this were finished.
    """
    alter table deliveries add column state text not null default 'delivered',
        add column payload text, add column due double precision, add column claim text;
    update deliveries set state = 'failed' where not coalesce(ok, false);
    alter table deliveries alter column state drop default;
    create index deliveries_due on deliveries (due) where state = 'pending';
    """,
    # 3: what each upload's streaming scan saw (blobfacts.py), so a commit on S3 checks a
    # version without downloading its weights. Servers before this migration created the
    # table on first use, hence "if not exists"; a role without CREATE now gets it here.
    """
    create table if not exists blob_facts (
        digest text primary key, size bigint not null, etag text, head bytea not null,
        tensors text, finite boolean, bad text, recorded double precision not null
    );
    """,
]


def connect(url: str) -> Any:
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError:  # pragma: no cover - depends on the install
        raise InvalidConfig(
            "a PostgreSQL hub needs psycopg: pip install 'deltahub[team]' (or 'psycopg[binary]')"
        ) from None
    try:
        return psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=15)
    except psycopg.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidConfig(f"cannot connect to {redact(url)}: {first}") from None


def open_pool(url: str, size: int) -> Any:
    """A pool of at most `size` connections to `url` (opened here; one connection at first)."""
    from psycopg.rows import dict_row

    try:
        from psycopg_pool import ConnectionPool, PoolTimeout
    except ImportError:  # pragma: no cover - depends on the install
        raise InvalidConfig(
            "a PostgreSQL hub needs psycopg-pool: pip install 'deltahub[team]' (or 'psycopg-pool')"
        ) from None
    pool = ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 15},
        name="deltahub",
        timeout=POOL_TIMEOUT_S,
        max_idle=300.0,
        reconnect_timeout=60.0,
        open=False,
    )
    try:
        pool.open(wait=True, timeout=15.0)
    except PoolTimeout:
        pool.close()
        raise InvalidConfig(f"cannot connect to {redact(url)}: no connection within 15 s") from None
    return pool


def schema_version(conn: Any) -> int:
    found = conn.execute("select to_regclass('deltahub_schema') as t").fetchone()
    if found["t"] is None:
        return 0
    return conn.execute("select coalesce(max(version), 0) as v from deltahub_schema").fetchone()["v"]


def migrate(url: str) -> tuple[int, int]:
    """Create or upgrade the schema; return (version before, version after)."""
    conn = connect(url)
    try:
        with conn.transaction():
            conn.execute("select pg_advisory_xact_lock(%s)", [MIGRATION_LOCK])
            conn.execute(
                "create table if not exists deltahub_schema (version integer primary key, applied double precision)"
            )
            before = schema_version(conn)
            for number, sql in enumerate(MIGRATIONS, start=1):
                if number > before:
                    conn.execute(sql)
                    conn.execute("insert into deltahub_schema values (%s, %s)", [number, time.time()])
        return before, len(MIGRATIONS)
    finally:
        conn.close()
