"""Durable webhook deliveries: rows in the metadata store from their event (written in the
change's own transaction: tests/test_hub_outbox.py) to their outcome.

Against a receiver on 127.0.0.1 that counts every POST by its `X-Deltahub-Delivery` id:
a server killed with SIGKILL while deliveries are pending (receiver down, or holding the
requests) loses none: a new server delivers every event, each id once (a receiver that
held a request when its sender died may see that id again: it drops the repeat by id);
two servers on one PostgreSQL database deliver N events once each, never both the same
row; an existing hub.db or PostgreSQL schema upgrades in place. Servers are subprocesses
(tests/hub_webhook_server.py) stopped by pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from deltahub.hub.client import HubClient, push
from deltahub.hub.meta import open_meta
from deltahub.hub.webhooks import SIGNATURE_HEADER, verify_signature
from deltahub.registry import Registry
from tests.hub_helpers import lora_dir
from tests.hub_services import _wait_port, free_port

ROOT = Path(__file__).resolve().parents[1]
# Short timings so recovery shows within seconds; attempts high enough never to run out.
TIMINGS = {"base_delay": 0.2, "max_delay": 0.5, "attempts": 1000, "timeout": 2.0, "lease": 4.0, "poll": 0.1}


class Receiver:
    """POSTs on 127.0.0.1:`port`, counted by delivery id; with `hold`, each waits for `gate`."""

    def __init__(self, port: int, hold: bool = False) -> None:
        self.counts: dict[str, int] = {}
        self.got: dict[str, tuple[bytes, str]] = {}
        self.lock = threading.Lock()
        self.gate = threading.Event()
        if not hold:
            self.gate.set()
        rx = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                delivery = self.headers.get("X-Deltahub-Delivery", "")
                with rx.lock:
                    rx.counts[delivery] = rx.counts.get(delivery, 0) + 1
                    rx.got[delivery] = (body, self.headers.get(SIGNATURE_HEADER, ""))
                rx.gate.wait(30)
                try:
                    self.send_response(204)
                    self.end_headers()
                except OSError:
                    pass  # the sender died while we held its request

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def arrivals(self) -> int:
        with self.lock:
            return sum(self.counts.values())

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


def reserved_port() -> tuple[int, socket.socket]:
    """A port bound but not listening: a sender is refused there, and no server takes it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1], sock


def wait_for(what: str, ok: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds:.0f} s: {what}")
        time.sleep(0.05)


class Servers:
    """Hub server subprocesses over one store; every one is stopped by pid at the end."""

    def __init__(self, home: Path, db: str | None, logs: Path) -> None:
        self.home, self.db, self.logs = home, db, logs
        self.procs: list[subprocess.Popen] = []

    def launch(self) -> str:
        port = free_port()
        cfg = {"home": str(self.home), "db": self.db, "port": port, "webhooks": TIMINGS}
        with open(self.logs / f"server-{port}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.hub_webhook_server", json.dumps(cfg)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        _wait_port(port, proc, 90, "hub server")
        return f"http://127.0.0.1:{port}"

    def kill9(self, proc: subprocess.Popen) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.kill9(proc)


def _store(backend: str, home: Path) -> str | None:
    if backend == "embedded":
        Registry(home).close()
        return None
    from tests.hub_services import fresh_database

    return fresh_database()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[[str | None], Servers]]:
    made: list[Servers] = []

    def make(db: str | None) -> Servers:
        (tmp_path / "logs").mkdir(exist_ok=True)
        made.append(Servers(tmp_path / "server", db, tmp_path / "logs"))
        return made[-1]

    yield make
    for s in made:
        s.stop_all()


def _events(rx: Receiver) -> list[tuple[str, str, str]]:
    out = []
    for body, _ in rx.got.values():
        e = json.loads(body)
        out.append((e["event"], e["version"], e.get("previous") or ""))
    return sorted(out)


@pytest.mark.parametrize("receiver", ["down", "slow"])
@pytest.mark.parametrize("backend", ["embedded", "postgres"])
def test_a_killed_server_loses_no_delivery(
    backend: str, receiver: str, tmp_path: Path, servers: Callable[[str | None], Servers]
) -> None:
    home = tmp_path / "server"
    db = _store(backend, home)
    meta = open_meta(db, home)
    h = meta.handle()
    token = h.tokens.create("write")[0]
    port, placeholder = reserved_port()
    hook = h.add_hook(f"http://127.0.0.1:{port}/hook", ["version.published", "tag.moved"], None)
    rx = None
    if receiver == "slow":
        placeholder.close()
        rx = Receiver(port, hold=True)
    run = servers(db)
    try:
        first = HubClient(run.launch(), token)
        local = Registry(tmp_path / "local")
        for k in (1, 2, 3):
            local.publish(lora_dir(tmp_path / f"src{k}", seed=k), "team/a")
            push(f"team/a@{k}", first, local, tags=["prod"])
        assert h.pending() == 6  # 3 published + 3 prod moves, written before each request returned
        if rx is None:  # receiver down: every row has failed an attempt, none is delivered
            wait_for("a first attempt at every delivery", lambda: all(r["attempts"] for r in h.deliveries()))
        else:  # receiver up but holding: deliveries are in flight when the server dies
            wait_for("a delivery in flight", lambda: rx.arrivals() >= 1)
        run.kill9(run.procs[0])
        assert h.pending() == 6 and all(r["state"] == "pending" for r in h.deliveries())
        if rx is None:
            placeholder.close()
            rx = Receiver(port)
        else:
            rx.gate.set()  # from now on it answers at once
        run.launch()
        wait_for("every delivery done", lambda: h.pending() == 0)
        rows = h.deliveries()
        assert len(rows) == 6 and all(
            r["state"] == "delivered" and r["ok"] and r["status"] == 204 for r in rows
        )
        # Every event reached the receiver, under the id the store gave it, signed.
        assert set(rx.counts) == {r["delivery"] for r in rows}
        assert _events(rx) == [
            ("tag.moved", "1", ""),
            ("tag.moved", "2", "1"),
            ("tag.moved", "3", "2"),
            ("version.published", "1", ""),
            ("version.published", "2", ""),
            ("version.published", "3", ""),
        ]
        for body, signature in rx.got.values():
            assert verify_signature(hook["secret"], body, signature)
        if receiver == "down":
            assert sorted(rx.counts.values()) == [1] * 6  # never sent twice
        else:
            # Only what the killed server had in flight (one per worker at most) came twice.
            repeats = sum(n - 1 for n in rx.counts.values())
            assert 1 <= repeats <= 4 and max(rx.counts.values()) == 2
    finally:
        placeholder.close()
        if rx is not None:
            rx.close()
        run.stop_all()
        meta.close()


def test_two_servers_on_one_database_deliver_each_event_once(
    tmp_path: Path, servers: Callable[[str | None], Servers]
) -> None:
    home = tmp_path / "server"
    db = _store("postgres", home)
    meta = open_meta(db, home)
    h = meta.handle()
    token = h.tokens.create("write")[0]
    port, placeholder = reserved_port()
    h.add_hook(f"http://127.0.0.1:{port}/hook", ["tag.moved"], None)
    run = servers(db)
    rx = None
    try:
        clients = [HubClient(run.launch(), token), HubClient(run.launch(), token)]
        local = Registry(tmp_path / "local")
        for k in (1, 2):
            local.publish(lora_dir(tmp_path / f"src{k}", seed=k), "team/a")
            push(f"team/a@{k}", clients[0], local)
        n = 40
        # The receiver is down while the events pile up: both servers' workers keep
        # claiming and retrying the same due rows, so every row is contended.
        for i in range(n):
            clients[i % 2].tag("team/a", "prod", "1" if i % 2 == 0 else "2")
        assert h.pending() == n
        wait_for("a first attempt at every delivery", lambda: all(r["attempts"] for r in h.deliveries(n)))
        placeholder.close()
        rx = Receiver(port)
        wait_for("every delivery done", lambda: h.pending() == 0)
        rows = h.deliveries(n + 10)
        assert len(rows) == n and all(r["state"] == "delivered" for r in rows)
        assert set(rx.counts) == {r["delivery"] for r in rows}
        assert sorted(rx.counts.values()) == [1] * n  # no row sent by both servers
        assert sorted(_events(rx)) == sorted(
            [("tag.moved", "1", "" if i == 0 else "2") for i in range(0, n, 2)]
            + [("tag.moved", "2", "1") for i in range(1, n, 2)]
        )
    finally:
        placeholder.close()
        if rx is not None:
            rx.close()
        run.stop_all()
        meta.close()


# ----------------------------------------------------------------------------- upgrades


def test_an_existing_hub_db_upgrades_in_place(tmp_path: Path) -> None:
    from sqlite_utils import Database

    from deltahub.hub import hubdb

    home = tmp_path / "hub"
    home.mkdir()
    db = Database(sqlite3.connect(str(home / "hub.db")))
    hubdb.migrations.apply(db, stop_before="m004_durable_deliveries")  # the schema before
    assert "state" not in db["deliveries"].columns_dict
    db["deliveries"].insert_all(
        [
            {"hook_id": 1, "event": "tag.moved", "delivery": "old-ok", "status": 204, "ok": 1, "attempts": 1},
            {"hook_id": 1, "event": "tag.moved", "delivery": "old-bad", "status": 0, "ok": 0, "attempts": 5},
        ]
    )
    db.conn.commit()
    db.conn.close()
    meta = open_meta(None, home)
    h = meta.handle()
    assert {r["delivery"]: r["state"] for r in h.deliveries()} == {"old-ok": "delivered", "old-bad": "failed"}
    assert h.pending() == 0 and h.claim(10, 30.0, "t") == ([], None)
    meta.close()


def test_an_existing_postgres_schema_upgrades_in_place() -> None:
    import psycopg

    from deltahub.hub.pgmeta import PostgresMeta
    from deltahub.hub.pgschema import MIGRATIONS
    from tests.hub_services import fresh_database

    db = fresh_database()
    with psycopg.connect(db, autocommit=True) as conn:  # the schema before: migration 1
        conn.execute("create table deltahub_schema (version integer primary key, applied double precision)")
        conn.execute(MIGRATIONS[0])
        conn.execute("insert into deltahub_schema values (1, 0)")
        conn.execute(
            "insert into deliveries (hook_id, event, delivery, status, ok, attempts) values"
            " (1, 'tag.moved', 'old-ok', 204, true, 1), (1, 'tag.moved', 'old-bad', 0, false, 5)"
        )
    meta = PostgresMeta(db)
    h = meta.handle()
    assert {r["delivery"]: r["state"] for r in h.deliveries()} == {"old-ok": "delivered", "old-bad": "failed"}
    assert h.pending() == 0 and h.claim(10, 30.0, "t") == ([], None)
    with psycopg.connect(db) as conn:
        versions = conn.execute("select version from deltahub_schema order by 1").fetchall()
        assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
    meta.close()
