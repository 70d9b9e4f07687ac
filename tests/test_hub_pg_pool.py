"""The PostgreSQL metadata store's connection pool (psycopg_pool), on a real server.

At most `pool_size` connections whatever the number of threads; requests keep working
after every backend is terminated (as a PostgreSQL restart does to them); every
connection closed when the store closes; the size from `DELTAHUB_DB_POOL_SIZE`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deltahub.errors import InvalidConfig
from deltahub.hub.client import HubClient, push
from deltahub.hub.server import ServerThread
from deltahub.registry import Registry
from tests.hub_helpers import lora_dir


def _backends(db: str) -> Callable[[], int]:
    """Count the backends connected to `db`, seen from a connection to another database."""
    import psycopg

    from tests.hub_services import pg_server_url

    name = db.rsplit("/", 1)[1]

    def count() -> int:
        with psycopg.connect(pg_server_url(), autocommit=True) as conn:
            row = conn.execute(
                "select count(*) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()", [name]
            ).fetchone()
            return int(row[0])

    return count


def _terminate_all(db: str) -> int:
    """End every backend connected to `db`, as a restart does, and wait until they are gone."""
    import psycopg

    from tests.hub_services import pg_server_url

    with psycopg.connect(pg_server_url(), autocommit=True) as conn:
        pids = [
            r[0]
            for r in conn.execute(
                "select pid from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
                [db.rsplit("/", 1)[1]],
            ).fetchall()
        ]
        for pid in pids:
            conn.execute("select pg_terminate_backend(%s)", [pid])
        gone = _wait(
            lambda: (
                conn.execute("select count(*) from pg_stat_activity where pid = any(%s)", [pids]).fetchone()[
                    0
                ]
                == 0
            )
        )
        assert gone, f"backends {pids} still there"
    return len(pids)


def _wait(ok: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not ok():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_pool_bounds_connections_and_closes_them() -> None:
    from deltahub.hub.pgmeta import PostgresMeta
    from tests.hub_services import fresh_database

    db = fresh_database()
    count = _backends(db)
    meta = PostgresMeta(db, pool_size=3)
    errors: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    def reader() -> None:
        try:
            h = meta.handle()
            for _ in range(30):
                assert h.list() == [] and h.hooks() == []
        except BaseException as e:
            errors.append(e)

    def sampler() -> None:
        while not done.wait(0.02):
            seen.append(count())

    watch = threading.Thread(target=sampler)
    watch.start()
    threads = [threading.Thread(target=reader) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    done.set()
    watch.join(30)
    assert not errors, errors[:3]
    assert seen and max(seen) <= 3, seen  # 12 threads, never more than 3 connections
    assert meta.pool.get_stats()["pool_size"] <= 3
    meta.close()
    assert _wait(lambda: count() == 0), "connections left open after close()"


def test_a_borrowed_connection_is_never_one_whose_backend_ended() -> None:
    from deltahub.hub.pgmeta import PostgresMeta
    from tests.hub_services import fresh_database

    db = fresh_database()
    meta = PostgresMeta(db, pool_size=2)
    h = meta.handle()
    with h.session() as a, h.session() as b:  # nested: the same connection
        assert a is b
    before = h.one("select pg_backend_pid() as pid")["pid"]
    assert _terminate_all(db) >= 1
    after = h.one("select pg_backend_pid() as pid")["pid"]  # no error: a new backend
    assert after != before
    meta.close()


def test_requests_survive_terminated_backends(tmp_path: Path) -> None:
    from deltahub.hub.pgmeta import PostgresMeta
    from tests.hub_services import fresh_database

    db = fresh_database()
    meta = PostgresMeta(db)
    token = meta.handle().tokens.create("write")[0]
    meta.close()
    local = Registry(tmp_path / "local")
    local.publish(lora_dir(tmp_path / "src1", seed=1), "team/a")
    with ServerThread(tmp_path / "server", db=db) as server:
        client = HubClient(server.url, token)
        push("team/a", client, local)
        for _ in range(20):  # several pooled connections in use
            assert client.resolve("team/a")["version"] == "1"
        assert _terminate_all(db) >= 1  # what a restart does to every open connection
        # Every request after it succeeds: more than the pool holds, reads and a commit.
        for _ in range(20):
            assert client.resolve("team/a@latest")["version"] == "1"
        local.publish(lora_dir(tmp_path / "src2", seed=2), "team/a")
        push("team/a@2", client, local, tags=["prod"])
        assert client.resolve("team/a@prod")["version"] == "2"
        pool = server.app.state.hub.meta.pool
    assert pool.closed  # the server's stop closed its pool


def test_the_pool_size_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub.hub.pgmeta import DEFAULT_POOL_SIZE, PostgresMeta
    from tests.hub_services import fresh_database

    db = fresh_database()
    meta = PostgresMeta(db)
    assert meta.pool.max_size == DEFAULT_POOL_SIZE == 8
    meta.close()
    monkeypatch.setenv("DELTAHUB_DB_POOL_SIZE", "2")
    meta = PostgresMeta(db)
    assert meta.pool.max_size == 2
    meta.close()
    monkeypatch.setenv("DELTAHUB_DB_POOL_SIZE", "many")
    with pytest.raises(InvalidConfig, match="DELTAHUB_DB_POOL_SIZE"):
        PostgresMeta(db)
