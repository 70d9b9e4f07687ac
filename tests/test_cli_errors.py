"""No traceback reaches a user: the Hugging Face Hub without network or a token, a quote in
a search, a home that cannot be created; messages name CLI flags, and flags share one scheme."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.registry import Registry
from tests.test_artifact import make_good


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")


def _one_line(result, code: int) -> str:
    assert result.exit_code == code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_hf_pull_without_network_is_one_line_exit_10(offline_hub) -> None:
    line = _one_line(CliRunner().invoke(cli, ["pull", "hf://org/repo"]), 10)
    assert "cannot reach" in line and "network" in line


def test_hf_push_without_a_token_is_one_line_exit_10(offline_hub, tmp_path: Path) -> None:
    Registry().publish(make_good(tmp_path / "art"), "a")
    line = _one_line(CliRunner().invoke(cli, ["push", "a", "--to", "hf://org/repo"]), 10)
    assert "HF_TOKEN" in line


def test_hf_push_with_a_token_but_no_network_is_one_line_exit_10(
    offline_hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    Registry().publish(make_good(tmp_path / "art"), "a")
    line = _one_line(CliRunner().invoke(cli, ["push", "a", "--to", "hf://org/repo"]), 10)
    assert "network" in line


def test_a_quote_in_a_search_and_an_uncreatable_home(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["search", '"'])
    assert result.exit_code == 0 and "nothing matches" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _one_line(CliRunner().invoke(cli, ["--home", str(blocker / "home"), "list"]), 2)
    assert "DELTAHUB_HOME" in line


def test_an_incompatible_base_names_the_force_flag(tmp_path: Path) -> None:
    from tests import fusion_helpers as fh

    other = fh.bert_dir(tmp_path / "other", seed=1)
    from deltahub import AdaptedModel, load_base

    model = AdaptedModel(load_base(str(other), device="cpu"))
    model.add_adapter("a", {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["query"]})
    model.save_adapter("a", tmp_path / "a")
    Registry().publish(tmp_path / "a", "a")
    # a base of another width has another fingerprint
    from transformers import BertConfig, BertModel

    wide = BertModel(BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=24))
    wide.save_pretrained(str(tmp_path / "wide"))
    fh.tokenizer().save_pretrained(str(tmp_path / "wide"))
    result = CliRunner().invoke(cli, ["run", "--base", str(tmp_path / "wide"), "a", "--input", "the red cat"])
    assert result.exit_code == 7
    assert "--force" in result.stderr and "force=True to" not in result.stderr


def test_train_rank_flag_and_its_old_name() -> None:
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert "--rank" in help_text
