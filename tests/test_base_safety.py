"""load_base never unpickles weights and never runs a repository's code (issue 14 item 21)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltahub import load_base
from deltahub.errors import Unsupported
from tests.compose_helpers import tiny


def _saved(tmp_path: Path) -> Path:
    d = tmp_path / "base"
    tiny("llama").save_pretrained(d)
    return d


def test_pickled_weights_are_refused_unopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    d = _saved(tmp_path)
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")

    def no_unpickling(*a: object, **k: object) -> None:
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(Unsupported, match=r"pickled weights only \(pytorch_model\.bin\).*safetensors"):
        load_base(d, device="cpu")


def test_custom_code_base_is_refused(tmp_path: Path) -> None:
    d = _saved(tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(config))
    (d / "modeling_evil.py").write_text("raise SystemExit('repository code ran')\n")
    with pytest.raises(Unsupported, match="trust_remote_code"):
        load_base(d, device="cpu")


def test_a_safetensors_base_still_loads(tmp_path: Path) -> None:
    model = load_base(_saved(tmp_path), device="cpu")
    assert not any(p.requires_grad for p in model.parameters())
