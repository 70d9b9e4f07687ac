"""CLI tests for the registry commands (CliRunner): exit codes, output, --json, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.registry import Registry
from tests.test_artifact import make_good


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def art(tmp_path: Path) -> Path:
    return make_good(tmp_path / "art")


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_every_command(runner: CliRunner) -> None:
    result = invoke(runner, "--help")
    assert result.exit_code == 0
    for command in ("publish", "list", "search", "show", "tag", "export", "rm", "verify", "gc"):
        assert command in result.output
        sub = invoke(runner, command, "--help")
        assert sub.exit_code == 0 and "Usage:" in sub.output and len(sub.output.splitlines()) > 3


def test_publish_prints_ref_and_digest(runner: CliRunner, art: Path) -> None:
    result = invoke(runner, "publish", str(art), "--name", "ns/a", "--tag", "prod", "--metric", "acc=0.75")
    assert result.exit_code == 0, result.output
    ref, digest = result.output.split()[1:3]
    assert ref == "ns/a@1" and digest == Registry().resolve("ns/a@prod").digest
    data = json.loads(
        invoke(runner, "publish", str(art), "--name", "ns/a", "--json").stdout
    )  # notices go to stderr
    assert data["version"] == "2" and data["ref"] == "ns/a@2"


def test_publish_errors_are_one_line_without_traceback(runner: CliRunner, art: Path, tmp_path: Path) -> None:
    (art / "adapter_config.json").write_text("{")
    result = invoke(runner, "publish", str(art), "--name", "x")
    assert result.exit_code == 3
    assert result.output.startswith("Error: invalid artifact [config-json]")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert invoke(runner, "publish", str(tmp_path), "--name", "bad name!").exit_code != 0
    bad_metric = invoke(runner, "publish", str(tmp_path), "--name", "x", "--metric", "acc")
    assert bad_metric.exit_code == 2 and "KEY=NUMBER" in bad_metric.output


def test_duplicate_version_is_refused(runner: CliRunner, art: Path) -> None:
    assert invoke(runner, "publish", str(art), "--name", "d", "--version", "1.0").exit_code == 0
    result = invoke(runner, "publish", str(art), "--name", "d", "--version", "1.0")
    assert result.exit_code == 5 and "already exists" in result.output


def test_list_search_show_json_fields(runner: CliRunner, art: Path) -> None:
    invoke(
        runner,
        "publish",
        str(art),
        "--name",
        "alpha",
        "--task",
        "sentiment",
        "--description",
        "movie reviews",
    )
    invoke(runner, "publish", str(art), "--name", "beta", "--task", "topic")
    table = invoke(runner, "list")
    assert table.exit_code == 0 and "alpha" in table.output and "beta" in table.output
    listed = json.loads(invoke(runner, "list", "--json").stdout)
    required = {"name", "version", "digest", "method", "base_model", "tags", "parents", "created"}
    assert [d["name"] for d in listed] == ["alpha", "beta"] and all(required <= set(d) for d in listed)
    assert [d["name"] for d in json.loads(invoke(runner, "list", "--task", "topic", "--json").stdout)] == [
        "beta"
    ]
    found = json.loads(invoke(runner, "search", "movie", "--json").stdout)
    assert [d["name"] for d in found] == ["alpha"]
    assert "nothing matches" in invoke(runner, "search", "zebra").output
    shown = json.loads(invoke(runner, "show", "alpha", "--json").stdout)
    assert required <= set(shown) and shown["manifest"]["task"] == "sentiment"
    text = invoke(runner, "show", "alpha@1").output
    assert "alpha@1" in text and "sentiment" in text and "adapter_model.safetensors" in text
    versions = json.loads(invoke(runner, "show", "alpha", "--versions", "--json").stdout)
    assert [v["version"] for v in versions] == ["1"]


def test_empty_registry_list(runner: CliRunner) -> None:
    result = invoke(runner, "list")
    assert result.exit_code == 0 and "no adapters" in result.output
    assert json.loads(invoke(runner, "list", "--json").stdout) == []


def test_show_unknown_ref_errors(runner: CliRunner) -> None:
    result = invoke(runner, "show", "missing")
    assert result.exit_code == 4 and "no adapter named 'missing'" in result.output
    assert invoke(runner, "show", "bad@@ref").exit_code == 2


def test_tag_export_rm_verify_gc(runner: CliRunner, art: Path, tmp_path: Path) -> None:
    invoke(runner, "publish", str(art), "--name", "t")
    invoke(runner, "publish", str(art), "--name", "t")
    result = invoke(runner, "tag", "t@1", "stable")
    assert result.exit_code == 0 and "t@stable -> 1" in result.output
    assert Registry().resolve("t@stable").version == "1"
    assert invoke(runner, "tag", "t@1", "9bad").exit_code == 2
    assert invoke(runner, "tag", "t", "stable", "--delete").exit_code == 0
    assert invoke(runner, "show", "t@stable").exit_code == 4

    out = tmp_path / "exported"
    assert invoke(runner, "export", "t@1", str(out)).exit_code == 0
    assert (out / "adapter_model.safetensors").read_bytes() == (
        art / "adapter_model.safetensors"
    ).read_bytes()
    assert invoke(runner, "export", "t@1", str(out)).exit_code == 5  # refuses to overwrite

    assert invoke(runner, "rm", "t@2", "--yes").exit_code == 0
    assert json.loads(invoke(runner, "show", "t", "--json").stdout)["version"] == "1"
    verified = json.loads(invoke(runner, "verify", "--json").stdout)
    assert verified["ok"] and verified["versions"] == 1
    gc = json.loads(invoke(runner, "gc", "--grace", "0", "--json").stdout)
    assert len(gc["removed"]) == 2  # only v2's manifest and card (README.md) were unique to it
    assert "removed 0 blobs" in invoke(runner, "gc").output


def test_verify_exit_code_on_corruption(runner: CliRunner, art: Path) -> None:
    invoke(runner, "publish", str(art), "--name", "c")
    v = Registry().resolve("c")
    Registry().store.path(v.files["adapter_config.json"]).write_text("{}")
    result = invoke(runner, "verify")
    assert result.exit_code == 1 and "corrupt" in result.output


def test_home_option_overrides_env(runner: CliRunner, art: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-home"
    assert invoke(runner, "--home", str(other), "publish", str(art), "--name", "h").exit_code == 0
    assert (other / "registry.db").exists()
    assert json.loads(invoke(runner, "--home", str(other), "list", "--json").stdout)[0]["name"] == "h"


def test_list_search_and_show_versions_page_with_a_cursor(runner: CliRunner, art: Path) -> None:
    import shlex

    registry = Registry()
    for i in range(5):
        registry.publish(art, name=f"n{i}", description="pageable adapter")
    for _ in range(4):
        registry.publish(art, name="n0")

    def follow(*args: str) -> tuple[list[str], int]:
        """Run a command, then the `more:` command it prints, until the last page."""
        seen, pages, argv = [], 0, list(args)
        while True:
            result = invoke(runner, *argv, "--json")
            assert result.exit_code == 0, result.output
            seen += [d["ref"] for d in json.loads(result.stdout)]
            pages += 1
            more = [line for line in result.stderr.splitlines() if line.startswith("more: ")]
            if not more:
                return seen, pages
            argv = shlex.split(more[0][len("more: ") :])[1:]
            assert pages < 10

    assert follow("list", "--limit", "2") == ([f"n{i}@{5 if i == 0 else 1}" for i in range(5)], 3)
    refs, pages = follow("list", "--all", "--limit", "4")
    assert len(refs) == len(set(refs)) == 9 and pages == 3
    refs, pages = follow("search", "pageable", "--limit", "3")
    assert sorted(refs) == sorted(r.ref for r in registry.list()) and pages == 2
    assert follow("show", "n0", "--versions", "--limit", "2") == ([f"n0@{i}" for i in range(1, 6)], 3)
    bad = invoke(runner, "list", "--cursor", "garbage")
    assert bad.exit_code == 2 and "cursor" in bad.output and "Traceback" not in bad.output
