"""`deltahub quickstart` end to end on the small built-in base, and what it leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltahub import quickstart as qs
from deltahub.cli.main import cli
from deltahub.registry import Registry


def test_tasks_are_balanced_and_the_target_needs_both_sources(tmp_path: Path) -> None:
    tasks = qs.write_tasks(tmp_path)
    rows = {t: [json.loads(x) for x in tasks[t]["train"].read_text().splitlines()] for t in tasks}
    assert len(rows["review"]) == 160 and len(rows["sentiment"]) == 240
    assert {r["label"] for r in rows["review"]} == {
        "positive-sports",
        "positive-food",
        "negative-sports",
        "negative-food",
    }
    for s, t, r in zip(rows["sentiment"], rows["topic"], rows["review"], strict=False):
        assert s["text"] == t["text"] == r["text"] and r["label"] == f"{s['label']}-{t['label']}"


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qs, "minilm_path", lambda: None)  # always the small built-in base here
    home = tmp_path / "qs"
    result = CliRunner().invoke(cli, ["quickstart", "--home", str(home), "--epochs", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{") :])
    assert summary["home"] == str(home) and "small 2-layer BERT" in summary["base_kind"]

    registry = Registry(home)
    assert [v.version for v in registry.versions("quickstart/sentiment")] == ["1", "2"]
    assert registry.resolve("quickstart/topic").method == "lora"
    fusion = registry.resolve("quickstart/review-fusion")
    assert fusion.method == "fusion"
    pinned = {p["ref"]: p["digest"] for p in fusion.parents}
    assert pinned == {
        "quickstart/sentiment@1": registry.resolve("quickstart/sentiment@1").digest,
        "quickstart/topic@1": registry.resolve("quickstart/topic@1").digest,
    }
    attention = summary["attention"]
    assert set(attention) == {"quickstart/sentiment", "quickstart/topic"}
    assert abs(sum(attention.values()) - 1.0) < 1e-4
    assert summary["diff"]["verdict"] == "changed" and summary["diff"]["relative_change"] > 0
    assert summary["metrics"]["sentiment"]["accuracy"] > 0.6  # it learned something in 2 epochs
    assert registry.verify().ok
    assert (home / "data" / "review-train.jsonl").is_file()
