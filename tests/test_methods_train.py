"""`deltahub train --method ia3|bitfit|ssf|prompt|prefix|ptuning-v2` through the shared trainer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.registry import Registry
from deltahub.training import load_task_model, train
from tests import fusion_helpers as fh

STORED = {"prompt": "prompt_tuning", "prefix": "prefix_tuning", "ptuning-v2": "prefix_tuning"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("methods-train")
    return fh.bert_dir(d / "bert"), fh.color_task(d / "color.jsonl", n=32)


@pytest.mark.parametrize("method", ["ia3", "bitfit", "ssf", "prompt", "prefix", "ptuning-v2"])
def test_train_publishes_and_reloads_each_method(setup, method):
    bert, data = setup
    registry = Registry()
    result = train(
        str(bert), str(data), eval_data=str(data), name="c", method=method, epochs=3, batch_size=8, lr=3e-2,
        registry=registry, progress=False,
    )  # fmt: skip
    assert result.metrics["eval_loss"] < math.log(4)  # chance is ln 4
    assert result.version.method == STORED.get(method, method)
    batch = torch.tensor([fh.tokenizer()("the red cat")["input_ids"]])
    with torch.no_grad():
        before = result.model(batch)["logits"]
        after = load_task_model(str(bert), "c", registry=registry)(batch)["logits"]
    assert (before - after).abs().max().item() <= 1e-5


def test_cli_train_method_ia3(setup):
    bert, data = setup
    out = CliRunner().invoke(
        cli, ["train", "--base", str(bert), "--data", str(data), "--name", "c3", "--method", "ia3",
              "--epochs", "1", "--quiet", "--json"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert Registry().resolve("c3").method == "ia3"
