"""`deltahub whoami`, `logout` and `doctor`."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.hub.server import ServerThread
from deltahub.hub.tokens import TokenStore
from deltahub.registry import Registry
from deltahub.settings import default_home


def test_whoami_and_logout(tmp_path: Path) -> None:
    hub_home = tmp_path / "hub"
    Registry(hub_home).close()
    secret, _ = TokenStore(hub_home).create("write", "team", None, "laptop")
    runner = CliRunner()
    with ServerThread(hub_home) as server:
        assert runner.invoke(cli, ["remote", "add", "origin", server.url]).exit_code == 0
        out = runner.invoke(cli, ["whoami", "--json"])
        assert out.exit_code == 0 and json.loads(out.stdout)["logged_in"] is False
        assert runner.invoke(cli, ["login", "origin", "--token", secret]).exit_code == 0
        who = json.loads(runner.invoke(cli, ["whoami", "--json"]).stdout)
        assert (who["scope"], who["namespace"], who["token_from"]) == ("write", "team", "login")
        assert "a write token on team/*" in runner.invoke(cli, ["whoami"]).stdout
        out = runner.invoke(cli, ["logout"])
        assert out.exit_code == 0 and "logged out of origin" in out.stdout
        assert "origin" not in json.loads((default_home() / "credentials.json").read_text())
        assert json.loads(runner.invoke(cli, ["whoami", "--json"]).stdout)["logged_in"] is False
        assert "no token was stored" in runner.invoke(cli, ["logout", "origin"]).stdout
    missing = runner.invoke(cli, ["logout", "nowhere"])
    assert missing.exit_code == 4 and "no remote named 'nowhere'" in missing.stderr


def test_doctor_reports_versions_home_and_remotes(tmp_path: Path) -> None:
    from importlib import metadata

    runner = CliRunner()
    runner.invoke(cli, ["remote", "add", "origin", "http://127.0.0.1:8600"])
    report = json.loads(runner.invoke(cli, ["doctor", "--json"]).stdout)
    assert report["packages"]["torch"] == metadata.version("torch")
    assert report["packages"]["transformers"] == metadata.version("transformers")
    assert set(report["packages"]) >= {"peft", "bitsandbytes"}
    assert report["home"]["path"] == str(default_home()) and report["home"]["writable"] is True
    assert report["remotes"] == [{"name": "origin", "url": "http://127.0.0.1:8600", "logged_in": False}]
    assert isinstance(report["accelerator"]["cuda"], bool)
    text = runner.invoke(cli, ["doctor"])
    assert text.exit_code == 0 and "transformers" in text.stdout and "origin" in text.stdout
    # a home that does not exist yet: reported, not created
    fresh = tmp_path / "not-yet"
    report = json.loads(runner.invoke(cli, ["--home", str(fresh), "doctor", "--json"]).stdout)
    assert report["home"]["exists"] is False and not fresh.exists()
