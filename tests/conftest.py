"""Shared fixtures: every test gets its own registry home; tiny models build in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def deltahub_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "deltahub-home"
    monkeypatch.setenv("DELTAHUB_HOME", str(home))
    monkeypatch.delenv("DELTAHUB_TOKEN", raising=False)
    return home
