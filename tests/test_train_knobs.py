"""Training knobs reach the adapter config and transformers' Trainer; data through HF datasets;
regression and multi-label heads; column mapping and sentence pairs."""

from __future__ import annotations

import json
import math
import random
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from deltahub import artifact as af
from deltahub.cli.main import cli
from deltahub.registry import Registry
from deltahub.training import engine, load_task_model, train
from deltahub.training.data import Columns, load_dataset, read_records
from tests import fusion_helpers as fh


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("knobs")
    return fh.bert_dir(d / "bert"), fh.color_task(d / "color.jsonl", n=32)


@pytest.fixture
def seen_args(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What `run` hands to transformers' TrainingArguments."""
    calls: list[dict[str, Any]] = []
    real = engine.training_arguments

    def spy(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(engine, "training_arguments", spy)
    return calls


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_cli_lora_and_schedule_flags_reach_config_and_trainer(
    setup: tuple[Path, Path], tmp_path: Path, seen_args: list[dict[str, Any]]
) -> None:
    bert, data = setup
    r = CliRunner().invoke(
        cli, ["train", "--base", str(bert), "--data", str(data), "--eval", str(data), "--name", "k", "--r", "4",
              "--target-modules", "query,value", "--dora", "--rslora", "--lora-dropout", "0.1", "--warmup-ratio",
              "0.25", "--weight-decay", "0.01", "--gradient-accumulation-steps", "2", "--eval-steps", "2",
              "--epochs", "1", "--batch-size", "8", "--no-publish", "--output-dir", str(tmp_path / "o"), "--json",
              "--base-model", "acme/tiny-bert"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    (args,) = seen_args
    assert args["warmup_steps"] == 0.25 and args["weight_decay"] == 0.01
    assert args["gradient_accumulation_steps"] == 2
    assert args["eval_strategy"] == "steps" and args["eval_steps"] == 2
    written = af.load_dir(tmp_path / "o")
    assert written.config["use_dora"] is True and written.config["use_rslora"] is True
    assert written.config["lora_dropout"] == 0.1
    assert any(k.endswith("lora_magnitude_vector") for k in written.tensors)  # DoRA trained
    assert written.manifest.base_model == "acme/tiny-bert"
    hyper = written.manifest.extra["hyperparameters"]
    assert hyper["gradient_accumulation_steps"] == 2 and hyper["warmup_ratio"] == 0.25
    # 32 examples, batches of 8, two batches a step: 2 optimizer steps, so 1 evaluation at step 2.
    assert json.loads(r.stdout)["metrics"]["epochs"] == 1.0

    r = CliRunner().invoke(
        cli, ["train", "--base", str(bert), "--data", str(data), "--name", "k", "--warmup-ratio", "0.1",
              "--warmup-steps", "3", "--quiet"],
    )  # fmt: skip
    assert r.exit_code == 2 and "not both" in r.output
    r = CliRunner().invoke(
        cli,
        [
            "train",
            "--base",
            str(bert),
            "--data",
            str(data),
            "--name",
            "k",
            "--method",
            "ia3",
            "--dora",
            "--quiet",
        ],
    )
    assert r.exit_code == 2 and "LoRA options" in r.output


def test_rslora_scaling_and_virtual_tokens_reach_the_adapter(setup: tuple[Path, Path]) -> None:
    bert, data = setup
    one = {"epochs": 1, "batch_size": 16, "publish": False, "progress": False}
    r = train(str(bert), str(data), name="k", r=4, alpha=8, target_modules=["query"], use_rslora=True, **one)
    layer = r.model.model.get_adapter("k").layers[0]
    assert layer.scaling == pytest.approx(8 / math.sqrt(4))  # alpha / sqrt(r), not alpha / r
    r = train(str(bert), str(data), name="p", method="prompt", num_virtual_tokens=5, **one)
    written = af.load_dir(r.path)  # type: ignore[arg-type]
    assert written.config["num_virtual_tokens"] == 5
    with safe_open(str(written.weights_path), framework="pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys() if not k.startswith("deltahub_head")]  # noqa: SIM118
    assert shapes == [[5, 32]]


def test_tokenizer_flag(setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bert, data = setup
    tok_dir = tmp_path / "tok"
    fh.tokenizer().save_pretrained(str(tok_dir))
    loaded: list[str] = []
    real = engine._load_tokenizer
    monkeypatch.setattr(engine, "_load_tokenizer", lambda source: loaded.append(str(source)) or real(source))
    args = ["train", "--base", str(bert), "--data", str(data), "--name", "t", "--epochs", "1", "--no-publish",
            "--quiet", "--target-modules", "query"]  # fmt: skip
    r = CliRunner().invoke(cli, [*args, "--tokenizer", str(tok_dir)])
    assert r.exit_code == 0, r.output
    assert loaded == [str(tok_dir)]  # not the base's
    r = CliRunner().invoke(cli, [*args, "--tokenizer", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "cannot load a tokenizer" in r.output


def test_columns_and_sentence_pairs(setup: tuple[Path, Path], tmp_path: Path) -> None:
    bert, _ = setup
    rng = random.Random(0)
    rows = []
    for _ in range(32):
        c1, c2 = rng.choice(fh.COLORS), rng.choice(fh.COLORS)
        rows.append(
            {"premise": f"the {c1} cat", "hypothesis": f"a {c2} cat", "gold": "same" if c1 == c2 else "diff"}
        )
    path = fh.write_jsonl(tmp_path / "pairs.jsonl", rows)
    tok = fh.tokenizer()
    cols = Columns(text="premise", label="gold", text_pair="hypothesis")
    ds = load_dataset(path, "classification", tok, columns=cols)
    assert (
        ds.features[0]["input_ids"]
        == tok("the " + rows[0]["premise"][4:], rows[0]["hypothesis"])["input_ids"]
    )
    assert ds.label_map.labels == ["diff", "same"]
    r = CliRunner().invoke(
        cli, ["train", "--base", str(bert), "--data", str(path), "--name", "pairs", "--text-column", "premise",
              "--text-pair-column", "hypothesis", "--label-column", "gold", "--epochs", "1", "--quiet", "--json",
              "--target-modules", "query"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = Registry().manifest(Registry().resolve("pairs"))
    assert manifest.extra["hyperparameters"]["columns"] == {
        "text": "premise", "label": "gold", "text_pair": "hypothesis"
    }  # fmt: skip
    r = CliRunner().invoke(
        cli,
        [
            "train",
            "--base",
            str(bert),
            "--data",
            str(path),
            "--name",
            "x",
            "--quiet",
            "--label-column",
            "nope",
        ],
    )
    assert r.exit_code == 2 and "'nope'" in r.output


def test_regression_and_multi_label(setup: tuple[Path, Path], tmp_path: Path) -> None:
    bert, _ = setup
    rng = random.Random(1)
    reg, multi = [], []
    for _ in range(48):
        c, a = rng.choice(fh.COLORS), rng.choice(fh.ANIMALS)
        text = fh.sentence(rng, c, a)
        reg.append({"text": text, "label": float(fh.COLORS.index(c))})
        multi.append({"text": text, "label": [c, a]})
    fh.write_jsonl(tmp_path / "reg.jsonl", reg)
    fh.write_jsonl(tmp_path / "multi.jsonl", multi)
    registry = Registry()
    fast = {"epochs": 4, "batch_size": 8, "lr": 3e-2, "progress": False, "registry": registry, "r": 4}
    r = train(
        str(bert), str(tmp_path / "reg.jsonl"), eval_data=str(tmp_path / "reg.jsonl"), name="reg",
        problem_type="regression", target_modules=["query", "value"], **{**fast, "epochs": 8},
    )  # fmt: skip
    variance = float(torch.tensor([row["label"] for row in reg]).var(unbiased=False))
    assert r.metrics["mse"] < 0.5 * variance  # better than predicting the mean
    assert r.model.head.classifier.out_features == 1
    loaded = load_task_model(str(bert), "reg", registry=registry)
    assert loaded.problem_type == "regression"

    r = train(
        str(bert), str(tmp_path / "multi.jsonl"), eval_data=str(tmp_path / "multi.jsonl"), name="multi",
        problem_type="multi-label", target_modules=["query", "value"], **{**fast, "epochs": 8},
    )  # fmt: skip
    assert r.model.head.classifier.out_features == 8 and "f1" in r.metrics
    assert r.metrics["f1"] > 0.5  # chance with 2 of 8 labels on is about 0.25
    assert registry.manifest(r.version).extra["head"]["problem_type"] == "multi-label"
    batch = {"input_ids": torch.tensor([fh.tokenizer()("the red cat")["input_ids"]])}
    with torch.no_grad():
        before = r.model(**batch)["logits"]
        after = load_task_model(str(bert), "multi", registry=registry)(**batch)["logits"]
    assert torch.allclose(before, after, atol=1e-6)


def test_data_through_hf_datasets_without_network(tmp_path: Path, no_network: None) -> None:
    import datasets

    rows = [{"text": "the red cat", "label": "pos"}, {"text": "a blue dog", "label": "neg"}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.tsv").write_text("text\tlabel\nthe red cat\tpos\na blue dog\tneg\n")
    fh.write_jsonl(tmp_path / "d.jsonl", rows)
    for name in ("d.parquet", "d.tsv", "d.jsonl"):
        assert read_records(tmp_path / name) == rows, name
    tok = fh.tokenizer()
    ds = load_dataset(datasets.Dataset.from_list(rows), "classification", tok)
    assert ds.label_map.labels == ["neg", "pos"] and ds.digest.startswith("datasets:")
    assert ds.features[1]["input_ids"] == tok("a blue dog")["input_ids"]


def test_a_datasets_dataset_trains_in_the_python_api(setup: tuple[Path, Path]) -> None:
    import datasets

    bert, data = setup
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    r = train(
        str(bert), datasets.Dataset.from_list(rows), name="hf", epochs=1, batch_size=16, progress=False,
        publish=False, target_modules=["query"],
    )  # fmt: skip
    assert af.load_dir(r.path).manifest.extra["data"]["train"]["examples"] == 32  # type: ignore[arg-type]


def test_lora_dropout_applies_only_while_training(setup: tuple[Path, Path]) -> None:
    from deltahub.compose.base import load_base
    from deltahub.compose.model import AdaptedModel

    bert, _ = setup
    model = AdaptedModel(load_base(bert, device="cpu"))
    model.add_adapter("d", {"method": "lora", "r": 4, "target_modules": ["query"], "lora_dropout": 0.5})
    with torch.no_grad():
        for p in model.get_adapter("d").parameters():
            p.normal_()
    model.activate("d")
    ids = torch.tensor([fh.tokenizer()("the red cat")["input_ids"]])
    model.train()
    a, b = model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
    assert not torch.equal(a, b)  # dropout on the LoRA input
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    model.eval()
    assert torch.equal(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
