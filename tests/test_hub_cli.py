"""The hub commands through Click's CliRunner, against a real server on 127.0.0.1."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.registry import Registry
from tests.hub_helpers import Hub, lora_dir, start_hub


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path)


def run(*args: str, input: str | None = None, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result.output if ok else f"{result.exit_code}:{result.output}"


def test_token_commands(tmp_path: Path) -> None:
    home = str(tmp_path / "srv")
    token = (
        run("token", "create", "--home", home, "--scope", "write", "--namespace", "team")
        .strip()
        .splitlines()[0]
    )
    assert token.startswith("dh_")
    rows = json.loads(run("token", "list", "--home", home, "--json"))
    assert rows[0]["scope"] == "write" and rows[0]["namespace"] == "team" and rows[0]["status"] == "active"
    assert token not in json.dumps(rows)
    run("token", "revoke", "--home", home, str(rows[0]["id"]))
    assert json.loads(run("token", "list", "--home", home, "--json"))[0]["status"] == "revoked"
    assert run("token", "revoke", "--home", home, "99", ok=False).startswith("4:")


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
    out = run("serve", "--host", "0.0.0.0", ok=False)
    assert out.startswith("8:") and "--allow-insecure-http" in out


def test_token_revoke_takes_the_exact_prefix_only(tmp_path: Path) -> None:
    home = str(tmp_path / "srv")
    run("token", "create", "--home", home, "--scope", "read")
    prefix = json.loads(run("token", "list", "--home", home, "--json"))[0]["prefix"].rstrip("…")
    for wrong in (prefix[:3] + prefix[3:].swapcase(), prefix[:5] + "_" + prefix[6:], prefix[:-2]):
        assert run("token", "revoke", "--home", home, wrong, ok=False).startswith("4:")
    assert json.loads(run("token", "list", "--home", home, "--json"))[0]["status"] == "active"
    assert "revoked token 1" in run("token", "revoke", "--home", home, prefix + "…")


def test_serve_applies_its_connection_limits(tmp_path: Path) -> None:
    """`deltahub serve` in a subprocess on 127.0.0.1: a silent connection is closed."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        "--home",
        str(tmp_path / "srv"),
        "--port",
        str(port),
        "--header-timeout",
        "1",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", "from deltahub.cli.main import cli; cli()", "serve", *args],
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
    finally:
        proc.terminate()
        proc.wait(timeout=30)
