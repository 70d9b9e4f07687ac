"""The hub commands through Click's CliRunner, against a real server on 127.0.0.1.

Each runs on both back-ends (tests/hub_helpers.py `BACKENDS`): the embedded home, and
PostgreSQL + S3 (`--db`, `--blobs`, `--s3-endpoint-url`).
"""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.registry import Registry
from tests.hub_helpers import BACKENDS, Hub, backend_stores, lora_dir, start_hub, token_store


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path, request.param)


@pytest.fixture(params=BACKENDS)
def where(request: pytest.FixtureRequest, tmp_path: Path) -> list[str]:
    """The options that name a hub's token store: its home, or a fresh PostgreSQL database."""
    if request.param == "embedded":
        return ["--home", str(tmp_path / "srv")]
    from tests.hub_services import fresh_database

    return ["--db", fresh_database()]


def run(*args: str, input: str | None = None, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result.output if ok else f"{result.exit_code}:{result.output}"


def test_token_commands(where: list[str]) -> None:
    token = run("token", "create", *where, "--scope", "write", "--namespace", "team").strip().splitlines()[0]
    assert token.startswith("dh_")
    rows = json.loads(run("token", "list", *where, "--json"))
    assert rows[0]["scope"] == "write" and rows[0]["namespace"] == "team" and rows[0]["status"] == "active"
    assert token not in json.dumps(rows)
    run("token", "revoke", *where, str(rows[0]["id"]))
    assert json.loads(run("token", "list", *where, "--json"))[0]["status"] == "revoked"
    assert run("token", "revoke", *where, "99", ok=False).startswith("4:")


def test_remote_login_push_pull_search(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    Registry(home_a).publish(lora_dir(tmp_path / "src"), "team/alpha", description="sentiment adapter")

    monkeypatch.setenv("DELTAHUB_HOME", str(home_a))
    run("remote", "add", "origin", hub.url)
    assert run("remote", "add", "origin", hub.url, ok=False).startswith("5:")
    out = run("login", "origin", input=hub.tokens["write"] + "\n")
    assert "write, namespace team" in out
    creds = home_a / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert json.loads(creds.read_text()) == {"origin": hub.tokens["write"]}
    assert "pushed team/alpha@1 to origin" in run("push", "team/alpha")
    assert json.loads(run("remote", "list", "--json")) == [
        {"name": "origin", "url": hub.url, "logged_in": True}
    ]
    assert run("login", "origin", "--token", "dh_wrong", ok=False).startswith("9:")

    monkeypatch.setenv("DELTAHUB_HOME", str(home_b))
    run("remote", "add", "hub", hub.url)
    assert run("pull", "team/alpha", ok=False).startswith("9:")  # no token yet
    monkeypatch.setenv("DELTAHUB_TOKEN", hub.tokens["read"])  # overrides any stored token
    pulled = json.loads(run("pull", "team/alpha", "--remote", "hub", "--json"))
    assert pulled["digest"] == Registry(home_a).resolve("team/alpha").digest
    found = json.loads(run("search", "--remote", "hub", "sentiment", "--json"))
    assert [f["ref"] for f in found] == ["team/alpha@1"]
    assert "team/alpha" in run("search", "--remote", "hub", "sentiment")
    assert run("verify")
    run("remote", "remove", "hub")
    assert run("pull", "team/alpha", ok=False).startswith("4:")  # no remotes left


def test_serve_refuses_a_public_address_without_the_flag() -> None:
    # no back-end: refused before any store opens
    out = run("serve", "--host", "0.0.0.0", ok=False)
    assert out.startswith("8:") and "--allow-insecure-http" in out


def test_token_revoke_takes_the_exact_prefix_only(where: list[str]) -> None:
    run("token", "create", *where, "--scope", "read")
    prefix = json.loads(run("token", "list", *where, "--json"))[0]["prefix"].rstrip("…")
    for wrong in (prefix[:3] + prefix[3:].swapcase(), prefix[:5] + "_" + prefix[6:], prefix[:-2]):
        assert run("token", "revoke", *where, wrong, ok=False).startswith("4:")
    assert json.loads(run("token", "list", *where, "--json"))[0]["status"] == "active"
    assert "revoked token 1" in run("token", "revoke", *where, prefix + "…")


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_applies_its_connection_limits(tmp_path: Path, backend: str) -> None:
    """`deltahub serve` in a subprocess on 127.0.0.1: a silent connection is closed, and
    the server answers from the stores its options name."""
    home = tmp_path / "srv"
    stores = backend_stores(backend)
    store_args = []
    if stores:
        store_args = ["--db", stores["db"], "--blobs", stores["blobs"], "--s3-endpoint-url"]
        store_args.append(stores["s3_endpoint_url"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--home", str(home), "--port", str(port), "--header-timeout", "1", "--log-level", "warning"]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from deltahub.cli.main import cli; cli()", "serve", *args, *store_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.1)
        with conn:
            conn.settimeout(8)
            assert conn.recv(1024) == b""  # closed by the server well before 8 s
        # a token made in the store the options name (not the home's, for PostgreSQL) works
        tokens = token_store(home, stores)
        read = tokens.create("read")[0]
        tokens.close()
        r = httpx.get(
            f"http://127.0.0.1:{port}/v1/adapters", headers={"Authorization": f"Bearer {read}"}, timeout=30
        )
        assert r.status_code == 200 and r.json() == [], r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
