"""`deltahub list` fitted to the terminal: at 80 and 120 columns every row keeps its full
name, version and tags; the other columns are shortened or dropped first."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.cli.output import fit_columns
from deltahub.registry import Registry
from tests.test_artifact import make_good

NAMES = ["acme-research/sentiment-reviews-large", "acme-research/topic-classifier", "x"]
BASE = "sentence-transformers/all-MiniLM-L6-v2-with-a-rather-long-suffix"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry()
    art = make_good(tmp_path / "art")
    for name in NAMES:
        registry.publish(
            art, name, tags=["production", "q4-2026"], task="sequence-classification", base_model=BASE
        )
    registry.publish(art, NAMES[0], version="10.2.0-rc1", tags=["canary"], base_model=BASE)
    return registry


@pytest.mark.parametrize("columns", [80, 120])
def test_list_keeps_name_version_and_tags_within_the_width(registry: Registry, columns: int) -> None:
    result = CliRunner().invoke(cli, ["list"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= columns, lines
    header = lines[0].split()
    assert header[:3] == ["name", "version", "tags"]
    body = lines[1:]
    for v in registry.list():
        [line] = [line for line in body if line.split()[0] == v.full_name]
        assert line.split()[1] == v.version and ",".join(v.tags) in line
    if columns == 80:
        assert "created" not in header and "digest" not in header
    else:
        assert "digest" in header or "task" in header  # more room, more columns


def test_a_pipe_without_columns_keeps_every_column(registry: Registry, monkeypatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0
    assert result.stdout.split("\n")[0].split() == [
        "name", "version", "tags", "method", "task", "base_model", "digest", "created"
    ]  # fmt: skip
    assert BASE in result.stdout


def test_fit_columns_shortens_before_it_drops() -> None:
    cells = [["a", "b" * 30, "c" * 30]]
    assert fit_columns(["k", "x", "y"], cells, None, ["y", "x"]) == (["k", "x", "y"], {})
    # 1 + 2 + 30 + 2 + 30 = 65 wide: to fit 55, y is cut to 20 (not dropped)
    assert fit_columns(["k", "x", "y"], cells, 55, ["y", "x"]) == (["k", "x", "y"], {"y": 20})
    # to fit 40, y would be cut below 10: dropped; then 33 fits
    assert fit_columns(["k", "x", "y"], cells, 40, ["y", "x"]) == (["k", "x"], {})
