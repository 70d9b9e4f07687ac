"""Webhook deliveries commit with the change that makes them (a transactional outbox).

On both back-ends (`BACKENDS`): a hub server, a subprocess started from this module, kills
itself with SIGKILL right after the metadata transaction of a commit or tag move has
committed, before anything after it runs (blob links, the worker wake-up; on the embedded
store also, or instead, the relay of registry.db's outbox to hub.db). Every delivery of
that change is then in the store, pending, and a fresh dispatcher delivers it: the event,
the adapter, version, tag and digest, signed, under the id its row holds. And a change
whose transaction fails after its delivery rows were written (an error injected just
after the insert) leaves no version, no tag and no delivery row.

    python -m tests.test_hub_outbox '{"home": ..., "stores": {...}, "port": N, "kill": ...}'

runs that server ("kill": "commit" or "tag": after the store's call returns; "relay":
when the embedded store first relays a non-empty outbox).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deltahub.errors import NotFound
from deltahub.hub.client import HubClient, push
from deltahub.hub.meta import open_meta
from deltahub.hub.webhooks import SIGNATURE_HEADER, Dispatcher, verify_signature
from deltahub.registry import Registry
from tests.hub_helpers import BACKENDS, Hub, backend_stores, lora_dir, make_tokens, serve_app, start_hub
from tests.hub_services import _wait_port, free_port
from tests.test_hub_webhooks import Receiver

ROOT = Path(__file__).resolve().parents[1]
CASES = [(b, "commit") for b in BACKENDS] + [(b, "tag") for b in BACKENDS] + [("embedded", "relay")]


# ----------------------------------------------------------------------------- the server


def _die(*args: Any, **kw: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    import uvicorn

    from deltahub.hub import hubdb
    from deltahub.hub.server import create_app, uvicorn_config

    cfg = json.loads(sys.argv[1])
    app = create_app(cfg["home"], **cfg["stores"])
    app.state.hub.webhooks.poll = 3600.0  # workers claim once at start, then only when woken
    kill = cfg["kill"]
    if kill == "relay":
        relay = hubdb.relay

        def relay_or_die(registry_db: Any, db: Any) -> int:
            if hubdb._outbox(registry_db):
                _die()
            return relay(registry_db, db)

        hubdb.relay = relay_or_die
    else:
        cls = type(app.state.hub.meta.handle())
        call = getattr(cls, kill)

        def call_then_die(self: Any, *args: Any, **kw: Any) -> Any:
            out = call(self, *args, **kw)
            _die()
            return out

        setattr(cls, kill, call_then_die)
    config = uvicorn_config(app, host="127.0.0.1", port=int(cfg["port"]), log_level="warning")
    uvicorn.Server(config).run()


# ----------------------------------------------------------------------------- tests


def _store(backend: str, home: Path) -> dict[str, Any]:
    stores = backend_stores(backend)
    if not stores:
        Registry(home).close()
    return stores


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(30)


@pytest.mark.parametrize(("backend", "kill"), CASES)
def test_a_server_killed_right_after_the_transaction_keeps_its_deliveries(
    backend: str, kill: str, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    home = tmp_path / "server"
    stores = _store(backend, home)
    token = make_tokens(home, stores)["write"]
    meta = open_meta(stores.get("db"), home)
    rx = Receiver()
    try:
        with serve_app(rx.app()) as url:
            hook = meta.handle().add_hook(f"{url}/hook", ["version.published", "tag.moved"], "team")
            local = Registry(tmp_path / "local")
            local.publish(lora_dir(tmp_path / "src", seed=1), "team/a")
            digest = local.resolve("team/a@1").digest
            port = free_port()
            cfg = {"home": str(home), "stores": stores, "port": port, "kill": kill}
            log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.test_hub_outbox", json.dumps(cfg)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            log.close()
            procs.append(proc)
            _wait_port(port, proc, 90, "hub server")
            client = HubClient(f"http://127.0.0.1:{port}", token)
            if kill == "tag":
                push("team/a@1", client, local)  # its version.published is delivered at once
                wait = Dispatcher(meta, poll=0.05)  # (in this process: only to wait for it)
                assert wait.wait_idle(60)
                assert [e["event"] for _, _, e in _bodies(rx)] == ["version.published"]
                rx.got.clear()
                with pytest.raises(Exception):  # noqa: B017 (the server dies mid-request)
                    client.tag("team/a", "prod", "1")
            else:
                with pytest.raises(Exception):  # noqa: B017
                    push("team/a@1", client, local, tags=["prod"])
            assert proc.wait(60) == -signal.SIGKILL, (tmp_path / "server.log").read_text()

            # The change committed, and so did its deliveries; no worker has run.
            h = meta.handle()
            assert h.resolve("team/a@prod").digest == digest
            expected = ["tag.moved"] if kill == "tag" else ["tag.moved", "version.published"]
            assert h.pending() == len(expected)
            rows = [r for r in h.deliveries() if r["state"] == "pending"]
            assert sorted(r["event"] for r in rows) == expected
            assert all(r["attempts"] == 0 and r["hook_id"] == hook["id"] for r in rows)
            assert rx.got == []

            # A fresh dispatcher (a restarted server) delivers exactly those bodies.
            dispatcher = Dispatcher(meta, base_delay=0.05, attempts=3, poll=0.05)
            dispatcher.start()
            try:
                assert dispatcher.wait_idle(60)
            finally:
                dispatcher.stop()
        got = _bodies(rx)
        assert sorted(e["event"] for _, _, e in got) == expected
        assert {r["delivery"] for r in rows} == {headers["x-deltahub-delivery"] for _, headers, _ in got}
        for body, headers, event in got:
            assert verify_signature(hook["secret"], body, headers[SIGNATURE_HEADER.lower()])
            assert event["delivery"] == headers["x-deltahub-delivery"]
            assert headers["x-deltahub-event"] == event["event"]
            assert (event["adapter"], event["version"], event["digest"]) == ("team/a", "1", digest)
            if event["event"] == "tag.moved":
                assert (event["tag"], event["previous"]) == ("prod", None)
            else:
                assert event["tags"] == ["latest", "prod"]
        assert all(r["state"] == "delivered" for r in meta.handle().deliveries())
    finally:
        meta.close()


def _bodies(rx: Receiver) -> list[tuple[bytes, dict[str, str], dict[str, Any]]]:
    return [(body, headers, json.loads(body)) for _, headers, body in rx.got]


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    gen = start_hub(tmp_path, request.param)
    h = next(gen)
    dispatcher = h.server.app.state.hub.webhooks
    dispatcher.base_delay, dispatcher.attempts = 0.05, 3
    yield h
    gen.close()


class Injected(RuntimeError):
    pass


def test_a_failed_transaction_leaves_no_delivery(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    meta = hub.server.app.state.hub.meta
    h = meta.handle()
    cls = type(h)
    record = cls._record_deliveries
    written: list[int] = []

    def record_then_fail(self: Any, *args: Any, **kw: Any) -> None:
        record(self, *args, **kw)
        written.append(1)
        raise Injected("after the delivery rows, inside the transaction")

    def nothing_left() -> None:
        assert h.pending() == 0 and h.deliveries() == []
        if hub.backend == "embedded":
            from deltahub.hub import hubdb

            assert hubdb._outbox(h.registry.db) == []

    rx = Receiver()
    with serve_app(rx.app()) as url:
        h.add_hook(f"{url}/hook", ["version.published", "tag.moved"], None)
        writer = HubClient(hub.url, hub.tokens["write"])
        local = Registry(tmp_path / "local")
        local.publish(lora_dir(tmp_path / "src", seed=1), "team/a")

        monkeypatch.setattr(cls, "_record_deliveries", record_then_fail)
        with pytest.raises(Exception):  # noqa: B017 (a 500)
            push("team/a@1", writer, local, tags=["prod"])
        assert written  # the rows were written, then their transaction rolled back
        with pytest.raises(NotFound):
            h.resolve("team/a@1")
        nothing_left()

        monkeypatch.undo()  # the same push again: everything, once
        push("team/a@1", writer, local)
        assert hub.server.app.state.hub.webhooks.wait_idle(60)
        assert [r["event"] for r in h.deliveries()] == ["version.published"]

        written.clear()
        monkeypatch.setattr(cls, "_record_deliveries", record_then_fail)
        with pytest.raises(Exception):  # noqa: B017
            writer.tag("team/a", "prod", "1")
        assert written
        with pytest.raises(NotFound):
            h.resolve("team/a@prod")
        assert [r["event"] for r in h.deliveries()] == ["version.published"]
        assert h.pending() == 0
    assert [json.loads(b)["event"] for _, _, b in rx.got] == ["version.published"]


def test_a_failed_relay_waits_for_the_next_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded: the outbox row stays in registry.db until a relay succeeds; counted pending meanwhile."""
    from deltahub.hub import hubdb

    home = tmp_path / "home"
    meta = open_meta(None, home)
    h = meta.handle()
    h.add_hook("http://127.0.0.1:9/hook", ["tag.moved"], None)
    local = Registry(home)
    local.publish(lora_dir(tmp_path / "src", seed=1), "team/a")

    def fail(*args: Any) -> int:
        raise OSError("hub.db unavailable")

    monkeypatch.setattr(hubdb, "relay", fail)
    v, previous = h.tag("team/a", "1", "prod", emit=True)  # the relay's error is logged, not raised
    assert (v.version, previous) == ("1", None)
    assert len(hubdb._outbox(h.registry.db)) == 1 and h.pending() == 1
    monkeypatch.undo()
    rows, _ = h.claim(5, 30.0, "t")
    assert [r["event"] for r in rows] == ["tag.moved"] and hubdb._outbox(h.registry.db) == []
    assert json.loads(rows[0]["payload"])["delivery"] == rows[0]["delivery"]
    assert h.pending() == 1  # claimed, still pending: once, not twice
    assert hubdb.relay(h.registry.db, h.db) == 0
    local.close()
    meta.close()


if __name__ == "__main__":
    main()
