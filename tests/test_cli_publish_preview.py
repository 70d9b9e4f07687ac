"""`publish --dry-run` validates and shows what would be stored, storing nothing; publishing
the same weights and config again says so."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.registry import Registry
from tests.test_artifact import make_good


def test_dry_run_stores_nothing_and_says_what_would_be(tmp_path: Path) -> None:
    art = make_good(tmp_path / "art")
    registry = Registry()
    result = CliRunner().invoke(
        cli, ["publish", str(art), "--name", "ns/a", "--tag", "prod", "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert (plan["name"], plan["version"], plan["tags"]) == ("ns/a", "1", ["latest", "prod"])
    weights = (art / "adapter_model.safetensors").read_bytes()
    import hashlib

    entry = plan["files"]["adapter_model.safetensors"]
    assert entry["digest"] == "sha256:" + hashlib.sha256(weights).hexdigest() and entry["stored"] is False
    assert plan["bytes_new"] == sum(f["size"] for f in plan["files"].values())
    assert registry.list() == []
    assert not [p for p in (registry.home / "blobs").rglob("*") if p.is_file()]  # nothing stored
    text = CliRunner().invoke(cli, ["publish", str(art), "--name", "ns/a", "--dry-run"])
    assert text.exit_code == 0 and text.stdout.startswith("would publish ns/a@1")
    # the same rules as a real publish: a bad name fails, a taken version fails
    assert CliRunner().invoke(cli, ["publish", str(art), "--name", "bad name", "--dry-run"]).exit_code == 2
    registry.publish(art, "ns/a")
    taken = CliRunner().invoke(cli, ["publish", str(art), "--name", "ns/a", "--version", "1", "--dry-run"])
    assert taken.exit_code == 5 and "immutable" in taken.stderr
    again = json.loads(
        CliRunner().invoke(cli, ["publish", str(art), "--name", "ns/a", "--dry-run", "--json"]).stdout
    )
    assert again["version"] == "2" and again["bytes_new"] == 0 and again["same_content_as"] == ["ns/a@1"]
    assert [v.version for v in Registry().versions("ns/a")] == ["1"]


def test_publishing_identical_content_again_gives_a_notice(tmp_path: Path) -> None:
    art = make_good(tmp_path / "art")
    first = CliRunner().invoke(cli, ["publish", str(art), "--name", "a"])
    assert first.exit_code == 0 and "notice" not in first.stderr
    second = CliRunner().invoke(cli, ["publish", str(art), "--name", "b"])
    assert second.exit_code == 0
    assert "notice: b@1 has the same weights and config as a@1" in second.stderr
