"""Webhooks on both back-ends, against a real receiver on 127.0.0.1: signed bodies, retries
with back-off (bounded), namespace filters, the delivery log, and requests that never
wait for a receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from deltahub.cli.main import cli
from deltahub.hub.client import HubClient, push
from deltahub.hub.webhooks import SIGNATURE_HEADER, sign, verify_signature
from tests.hub_helpers import BACKENDS, Hub, lora_dir, published, serve_app, start_hub
from tests.hub_services import free_port


class Receiver:
    """Records every delivery; answers 500 to the first `fail` attempts of each delivery;
    /slow waits for `gate`."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.counts: dict[str, int] = {}
        self.gate = threading.Event()
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        def hook(request: Request) -> Response:
            import anyio.from_thread

            body = anyio.from_thread.run(request.body)
            path = request.url.path
            if path == "/slow":
                self.gate.wait(30)
            delivery = request.headers.get("x-deltahub-delivery", "")
            with self.lock:
                self.counts[delivery] = self.counts.get(delivery, 0) + 1
                if self.counts[delivery] <= self.fail:
                    return Response(status_code=500)
                self.got.append((path, dict(request.headers), body))
            return Response(status_code=204)

        return Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])])

    def events(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(b) for p, _, b in self.got if p == path]


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    gen = start_hub(tmp_path, request.param)
    h = next(gen)
    dispatcher = h.server.app.state.hub.webhooks
    dispatcher.base_delay, dispatcher.attempts = 0.05, 3  # fast, bounded back-off for tests
    yield h
    gen.close()


def _add(hub: Hub, url: str, *args: str) -> dict[str, Any]:
    where = ["--db", hub.stores["db"]] if hub.stores else ["--home", str(hub.home)]
    r = CliRunner().invoke(cli, ["webhook", "add", url, *args, *where, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def _log(hub: Hub) -> list[dict[str, Any]]:
    where = ["--db", hub.stores["db"]] if hub.stores else ["--home", str(hub.home)]
    r = CliRunner().invoke(cli, ["webhook", "log", *where, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def test_signed_deliveries_retries_filters_and_log(hub: Hub, tmp_path: Path) -> None:
    rx = Receiver(fail=2)
    with serve_app(rx.app()) as url:
        moved = _add(hub, f"{url}/moved", "--event", "tag.moved", "--ns", "team")
        published_hook = _add(hub, f"{url}/published", "--event", "version.published")
        dead = _add(hub, f"http://127.0.0.1:{free_port()}/nobody", "--event", "tag.moved")
        writer = HubClient(hub.url, hub.tokens["write"])
        local = published(tmp_path / "local", "team/alpha")
        push("team/alpha", writer, local, tags=["prod"])  # v1, prod -> 1
        local.publish(lora_dir(tmp_path / "src2", seed=2), "team/alpha")
        push("team/alpha@2", writer, local, tags=["prod"])  # prod 1 -> 2
        writer.tag("team/alpha", "prod", "1")  # and back: 2 -> 1
        writer.tag("team/alpha", "prod", "1")  # not a move: nothing sent
        other = published(tmp_path / "other", "other/beta")
        push(
            "other/beta", HubClient(hub.url, hub.tokens["write_other"]), other, tags=["prod"]
        )  # not --ns team
        assert hub.server.app.state.hub.webhooks.wait_idle(60)

    got = rx.events("/moved")  # deliveries run on several threads: in any order
    assert sorted((e["adapter"], e["tag"], e["previous"] or "", e["version"]) for e in got) == [
        ("team/alpha", "prod", "", "1"),
        ("team/alpha", "prod", "1", "2"),
        ("team/alpha", "prod", "2", "1"),
    ]
    assert {e["digest"] for e in got} == {
        local.resolve("team/alpha@1").digest,
        local.resolve("team/alpha@2").digest,
    }
    assert sorted((e["adapter"], e["version"]) for e in rx.events("/published")) == [
        ("other/beta", "1"),
        ("team/alpha", "1"),
        ("team/alpha", "2"),
    ]
    for path, headers, body in rx.got:  # every body signed with its hook's secret
        secret = moved["secret"] if path == "/moved" else published_hook["secret"]
        assert verify_signature(secret, body, headers[SIGNATURE_HEADER.lower()])
        assert not verify_signature(secret, body + b" ", headers[SIGNATURE_HEADER.lower()])
        assert headers["x-deltahub-event"] == json.loads(body)["event"]
    assert headers[SIGNATURE_HEADER.lower()] == sign(secret, body)

    log = _log(hub)
    by_hook = {h["id"]: [r for r in log if r["hook_id"] == h["id"]] for h in (moved, published_hook, dead)}
    assert len(by_hook[moved["id"]]) == 3 and all(r["ok"] for r in by_hook[moved["id"]])
    # The receiver failed the first two attempts of every delivery: each took 3.
    assert [r["attempts"] for r in by_hook[moved["id"]]] == [3, 3, 3]
    assert [r["status"] for r in by_hook[moved["id"]]] == [204, 204, 204]
    # A receiver that never answers: retried `attempts` times, then logged as failed.
    assert len(by_hook[dead["id"]]) == 4  # tag.moved of every namespace: 3 team + 1 other
    assert all(r["attempts"] == 3 and not r["ok"] and "Connect" in r["error"] for r in by_hook[dead["id"]])
    listed = CliRunner().invoke(
        cli,
        [
            "webhook",
            "list",
            "--json",
            *(["--db", hub.stores["db"]] if hub.stores else ["--home", str(hub.home)]),
        ],
    )
    assert listed.exit_code == 0 and "secret" not in listed.output and "whsec_" not in listed.output


def test_a_slow_receiver_never_holds_a_request(hub: Hub, tmp_path: Path) -> None:
    rx = Receiver()
    with serve_app(rx.app()) as url:
        _add(hub, f"{url}/slow", "--event", "version.published", "--event", "tag.moved")
        local = published(tmp_path / "local", "team/alpha")
        # The receiver holds every delivery until the gate opens; the push, its commit and a
        # tag move all return before that.
        push("team/alpha", HubClient(hub.url, hub.tokens["write"]), local, tags=["prod"])
        HubClient(hub.url, hub.tokens["write"]).tag("team/alpha", "stable", "1")
        assert rx.got == [] and not rx.gate.is_set()
        rx.gate.set()
        assert hub.server.app.state.hub.webhooks.wait_idle(60)
    assert sorted(json.loads(b)["event"] for _, _, b in rx.got) == [
        "tag.moved",
        "tag.moved",
        "version.published",
    ]


def test_webhook_add_refuses_bad_input(tmp_path: Path) -> None:
    home = ["--home", str(tmp_path / "h")]
    r = CliRunner().invoke(cli, ["webhook", "add", "ftp://x/y", "--event", "tag.moved", *home])
    assert r.exit_code != 0 and "http(s)" in r.output
    r = CliRunner().invoke(cli, ["webhook", "add", "http://127.0.0.1/x", "--event", "nope", *home])
    assert r.exit_code != 0
    r = CliRunner().invoke(cli, ["webhook", "remove", "42", *home])
    assert r.exit_code != 0 and "no webhook" in r.output
