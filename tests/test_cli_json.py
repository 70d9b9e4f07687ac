"""One JSON shape per object: a version prints with the same keys from publish, list, show,
merge and train (show adds its manifest and evaluations)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from deltahub.cli.main import cli
from tests import fusion_helpers as fh
from tests.test_artifact import make_good


def _json(*args: str):
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_version_has_one_json_shape(tmp_path: Path) -> None:
    published = _json("publish", str(make_good(tmp_path / "art")), "--name", "a")
    keys = set(published)
    assert {"ref", "digest", "name", "version", "tags", "metrics", "base_model"} <= keys
    assert set(_json("list")[0]) == keys
    assert set(_json("show", "a")) == keys | {"manifest", "evals"}
    base = fh.bert_dir(tmp_path / "bert")
    data = fh.color_task(tmp_path / "color.jsonl", n=8)
    trained = _json(
        "train", "--base", str(base), "--data", str(data), "--name", "t", "--rank", "2",
        "--target-modules", "query", "--epochs", "1", "--quiet",
    )  # fmt: skip
    assert set(trained) == keys and trained["ref"] == "t@1"
