"""Merges keep the task head their inputs share (same labels): `run` on the merge still
classifies; inputs with different labels give a merge without a head, and a warning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deltahub import Registry
from deltahub.cli.main import cli
from deltahub.training import train
from deltahub.training.inference import load
from tests import fusion_helpers as fh


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("heads")
    base = fh.bert_dir(root / "bert")
    home = root / "home"
    registry = Registry(home)
    colors = fh.color_task(root / "color.jsonl", n=16)
    for seed in (0, 1):
        train(
            str(base), str(colors), name="color", r=4, target_modules=["query", "value"], registry=registry,
            epochs=1, batch_size=8, progress=False, seed=seed,
        )  # fmt: skip
    train(
        str(base), str(fh.animal_task(root / "animal.jsonl", n=16)), name="animal", r=4,
        target_modules=["query", "value"], registry=registry, epochs=1, batch_size=8, progress=False,
    )  # fmt: skip
    registry.close()
    return home, base


def _head(registry: Registry, ref: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    artifact = registry.open(ref)
    return {k: t for k, t in load_file(str(artifact.weights_path)).items() if k.startswith("deltahub_head.")}


def test_a_merge_of_same_label_heads_classifies_with_their_weighted_average(world) -> None:
    home, base = world
    merged = CliRunner().invoke(
        cli,
        ["--home", str(home), "merge", "color@1", "color@2", "--method", "cat", "--weights", "0.25,0.75",
         "--name", "color-avg"],
    )  # fmt: skip
    assert merged.exit_code == 0, merged.output
    assert "warning" not in merged.stderr
    registry = Registry(home)
    h1, h2 = _head(registry, "color@1"), _head(registry, "color@2")
    got = _head(registry, "color-avg")
    for key in h1:  # weights normalized to sum 1: 0.25 and 0.75
        torch.testing.assert_close(got[key], 0.25 * h1[key] + 0.75 * h2[key], atol=1e-7, rtol=0)
    manifest = registry.manifest("color-avg")
    assert manifest.extra["head"]["labels"] == sorted(fh.COLORS)
    assert manifest.extra["merge"]["task_head"].startswith("averaged")
    result = CliRunner().invoke(
        cli,
        ["--home", str(home), "run", "--base", str(base), "color-avg", "--input", "the red cat", "--json"],
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["kind"] == "classification" and answer["label"] in fh.COLORS
    # independently: the merged model's hidden states, mean-pooled, through the averaged head by hand
    loaded = load(str(base), ["color-avg"], registry=registry)
    ids = torch.tensor([fh.tokenizer()("the red cat")["input_ids"]])
    with torch.no_grad():
        pooled = loaded.model(input_ids=ids).last_hidden_state[0].mean(0)  # (d,)
    w, b = got["deltahub_head.classifier.weight"], got["deltahub_head.classifier.bias"]
    torch.testing.assert_close(torch.tensor(answer["logits"]), w @ pooled + b, atol=2e-6, rtol=0)


def test_identical_heads_are_kept_as_they_are(world) -> None:
    home, _ = world
    result = CliRunner().invoke(
        cli, ["--home", str(home), "merge", "color@1", "color@1", "--method", "svd", "--name", "color-twice"]
    )
    assert result.exit_code == 0, result.output
    registry = Registry(home)
    assert registry.manifest("color-twice").extra["merge"]["task_head"].startswith("kept")
    for key, value in _head(registry, "color@1").items():
        assert torch.equal(_head(registry, "color-twice")[key], value)


def test_heads_with_different_labels_are_dropped_with_a_warning(world) -> None:
    home, _ = world
    result = CliRunner().invoke(
        cli, ["--home", str(home), "merge", "color@1", "animal", "--method", "cat", "--name", "mixed"]
    )
    assert result.exit_code == 0, result.output
    assert "warning: task head dropped" in result.stderr and "different labels" in result.stderr
    registry = Registry(home)
    assert _head(registry, "mixed") == {} and "head" not in registry.manifest("mixed").extra
