"""Training data loading, `deltahub.train`/`fuse` end to end on tiny models, and the CLI."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from deltahub.cli.main import cli
from deltahub.errors import InvalidConfig, NotFound
from deltahub.fusion import fuse
from deltahub.registry import Registry
from deltahub.training import load_task_model, train
from deltahub.training.data import IGNORE_INDEX, load_dataset, read_records
from tests import fusion_helpers as fh

FAST = {"epochs": 4, "batch_size": 8, "lr": 3e-2, "progress": False}


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fh.bert_dir(tmp_path_factory.mktemp("bert") / "bert")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    return {
        "color": fh.color_task(d / "color.jsonl", n=48),
        "color_eval": fh.color_task(d / "color_eval.jsonl", n=32, seed=1),
        "animal": fh.animal_task(d / "animal.jsonl", n=48, seed=2),
        "animal_eval": fh.animal_task(d / "animal_eval.jsonl", n=32, seed=3),
    }


# --------------------------------------------------------------------------- data


def test_read_jsonl_and_csv_with_string_labels(tmp_path: Path) -> None:
    tok = fh.tokenizer()
    (tmp_path / "d.csv").write_text('text,label\n"the red cat",pos\n"a blue dog",neg\n')
    ds = load_dataset(tmp_path / "d.csv", "classification", tok)
    assert ds.label_map.labels == ["neg", "pos"]
    assert [f["labels"] for f in ds.features] == [1, 0]
    assert ds.features[0]["input_ids"] == tok("the red cat")["input_ids"]
    assert ds.digest == "sha256:" + hashlib.sha256((tmp_path / "d.csv").read_bytes()).hexdigest()
    fh.write_jsonl(tmp_path / "e.jsonl", [{"text": "red", "label": "pos"}, {"text": "red", "label": "maybe"}])
    with pytest.raises(InvalidConfig, match=r"'maybe'.*does not occur in the training data"):
        load_dataset(tmp_path / "e.jsonl", "classification", tok, label_map=ds.label_map)


def test_clear_errors_for_bad_files(tmp_path: Path) -> None:
    tok = fh.tokenizer()
    fh.write_jsonl(
        tmp_path / "a.jsonl", [{"text": "red cat", "label": "x"}, {"sentence": "dog", "label": "y"}]
    )
    with pytest.raises(InvalidConfig, match=r"row 2 lacks column 'text' \(it has: label, sentence\)"):
        load_dataset(tmp_path / "a.jsonl", "classification", tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidConfig, match="has no examples"):
        read_records(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n{oops\n')
    with pytest.raises(InvalidConfig, match=r"bad\.jsonl:2 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(NotFound):
        read_records(tmp_path / "missing.jsonl")
    fh.write_jsonl(tmp_path / "one.jsonl", [{"text": "red", "label": "x"}])
    with pytest.raises(InvalidConfig, match="one label"):
        load_dataset(tmp_path / "one.jsonl", "classification", tok)
    fh.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "red cat"}])
    with pytest.raises(InvalidConfig, match="'completion'"):
        load_dataset(tmp_path / "p.jsonl", "causal-lm", tok)


def test_causal_lm_loss_only_on_the_completion(tmp_path: Path) -> None:
    tok = fh.tokenizer()
    fh.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the red cat says", "completion": "yes"}])
    (f,) = load_dataset(tmp_path / "p.jsonl", "causal-lm", tok).features
    prompt = tok("the red cat says")["input_ids"]
    assert f["input_ids"][: len(prompt)] == prompt
    assert f["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert f["labels"][len(prompt) :] == [tok.convert_tokens_to_ids("yes"), tok.eos_token_id]
    fh.write_jsonl(tmp_path / "t.jsonl", [{"text": "the red cat"}])
    (f,) = load_dataset(tmp_path / "t.jsonl", "causal-lm", tok).features
    assert f["labels"] == f["input_ids"]


# --------------------------------------------------------------------------- train


@pytest.mark.parametrize("method", ["lora", "pfeiffer"])
def test_train_lowers_loss_and_publishes_everything(
    bert_path: Path, data: dict[str, Path], method: str
) -> None:
    registry = Registry()
    result = train(
        str(bert_path), str(data["color"]), eval_data=str(data["color_eval"]), name="color", method=method, r=4,
        target_modules=["query", "value"], registry=registry, **FAST,
    )  # fmt: skip
    # Chance is 1/4 (loss ln 4 at init, the head starting near zero).
    assert result.metrics["eval_loss"] < math.log(4) - 0.2
    assert result.metrics["accuracy"] > 0.5
    v = result.version
    manifest = registry.manifest(v)
    assert v.method == ("lora" if method == "lora" else "bottleneck") and v.task == "classification"
    assert manifest.metrics["accuracy"] == result.metrics["accuracy"]
    assert manifest.extra["hyperparameters"]["lr"] == FAST["lr"]
    assert manifest.extra["hyperparameters"]["method"] == method
    digest = "sha256:" + hashlib.sha256(data["color"].read_bytes()).hexdigest()
    assert manifest.extra["data"]["train"] == {"path": "color.jsonl", "digest": digest, "examples": 48}
    assert manifest.extra["head"]["labels"] == sorted(fh.COLORS)
    assert manifest.base_fingerprint == result.model.model.fingerprint
    artifact = registry.open(v)
    with safe_open(str(artifact.weights_path), framework="pt") as f:
        assert {"deltahub_head.classifier.weight", "deltahub_head.classifier.bias"} <= set(f.keys())

    # Loaded back by name: same logits.
    batch = torch.tensor([fh.tokenizer()("the red cat")["input_ids"]])
    with torch.no_grad():
        before = result.model(batch)["logits"]
        after = load_task_model(str(bert_path), "color", registry=registry)(batch)["logits"]
    assert torch.allclose(before, after, atol=1e-6)


def test_training_is_deterministic_with_a_seed(
    bert_path: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    def run(seed: int, out: str) -> dict[str, torch.Tensor]:
        r = train(
            str(bert_path), str(data["color"]), name="c", method="lora", r=2, target_modules=["query"],
            seed=seed, publish=False, output_dir=tmp_path / out, epochs=1, batch_size=8, lr=3e-2, progress=False,
        )  # fmt: skip
        with safe_open(str(r.path / "adapter_model.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")  # one epoch of 48 examples each
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_causal_lm_training_on_completions(tmp_path: Path) -> None:
    base = fh.llama_dir(tmp_path / "llama")
    rows = [
        {"prompt": f"the {c} cat says", "completion": "yes" if c == "red" else "no"} for c in fh.COLORS
    ] * 4
    fh.write_jsonl(tmp_path / "p.jsonl", rows)
    result = train(
        str(base), str(tmp_path / "p.jsonl"), eval_data=str(tmp_path / "p.jsonl"), task="causal-lm",
        name="says", method="lora", r=4, target_modules=["q_proj", "v_proj"], epochs=2, batch_size=4, lr=2e-2,
        progress=False,
    )  # fmt: skip
    # The same loss with the adapter switched off: training must have lowered it.
    from deltahub.training.data import Collator

    tok = fh.tokenizer()
    batch = Collator(tok.pad_token_id)(load_dataset(tmp_path / "p.jsonl", "causal-lm", tok).features)
    result.model.model.deactivate()
    with torch.no_grad():
        base_loss = float(result.model(**batch)["loss"])
    assert result.metrics["eval_loss"] < base_loss - 0.2
    assert "accuracy" not in result.metrics
    assert result.version.task == "causal-lm"


def test_fuse_unfreeze_adapters_publishes_tuned_constituents(bert_path: Path, data: dict[str, Path]) -> None:
    registry = Registry()
    train(
        str(bert_path), str(data["color"]), name="color", method="lora", r=4, target_modules=["query"],
        registry=registry, **{**FAST, "epochs": 1},
    )  # fmt: skip
    result = fuse(
        ["color"], str(bert_path), str(data["animal"]), name="fz", registry=registry, unfreeze_adapters=True,
        epochs=1, batch_size=16, progress=False,
    )  # fmt: skip
    manifest = registry.manifest(result.version)
    roles = {p.role: p.ref for p in manifest.parents}
    assert roles == {"trained-from": "color@1", "constituent": "fz.color@1"}
    tuned = registry.open("fz.color@1")
    original = registry.open("color@1")
    with (
        safe_open(str(tuned.weights_path), framework="pt") as t,
        safe_open(str(original.weights_path), "pt") as o,
    ):
        for key in t.keys():  # noqa: SIM118
            assert not torch.equal(t.get_tensor(key), o.get_tensor(key)), key


# --------------------------------------------------------------------------- CLI


def test_cli_train_fuse_show(bert_path: Path, data: dict[str, Path]) -> None:
    runner = CliRunner()
    common = ["--base", str(bert_path), "--epochs", "2", "--batch-size", "16", "--lr", "0.03", "--json"]
    r = runner.invoke(
        cli, ["train", "--method", "lora", "--r", "4", "--target-modules", "query,value", "--data",
              str(data["color"]), "--name", "color", *common],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ref"] == "color@1" and "train_loss" in out["metrics"]
    r = runner.invoke(
        cli, ["train", "--method", "houlsby", "--data", str(data["animal"]), "--name", "animal", *common]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        cli, ["fuse", "color", "animal", "--data", str(data["animal"]), "--eval", str(data["animal_eval"]),
              "--name", "both", *common],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ref"] == "both@1"
    r = runner.invoke(cli, ["show", "both"])
    assert r.exit_code == 0, r.output
    lines = [line.split() for line in r.output.splitlines() if line.startswith("attention")]
    assert sorted(line[1] for line in lines) == ["animal", "color"]
    assert sum(float(line[2]) for line in lines) == pytest.approx(1.0, abs=2e-3)
    assert "constituent" not in r.output or "color@1" in r.output

    bad = Path(data["color"]).parent / "bad.jsonl"
    fh.write_jsonl(bad, [{"sentence": "x", "label": "y"}])
    r = runner.invoke(cli, ["train", "--data", str(bad), "--name", "x", *common])
    assert r.exit_code == 2 and "lacks column 'text'" in r.output
    r = runner.invoke(cli, ["fuse", "nope", "--data", str(data["animal"]), "--name", "y", *common])
    assert r.exit_code == 4 and "nope" in r.output


@pytest.mark.parametrize(
    ("old", "new", "names"),
    [
        ("deltahub.fusion.train", "deltahub.training.adapter", ["train", "load_task_model"]),
        ("deltahub.fusion.train", "deltahub.fusion.learn", ["fuse"]),
        (
            "deltahub.fusion.trainer",
            "deltahub.training.engine",
            ["TaskModel", "run", "load_model", "make_head"],
        ),
        ("deltahub.fusion.trainer", "deltahub.fusion.learn", ["attention_summary"]),
        ("deltahub.fusion.data", "deltahub.training.data", ["Collator", "load_dataset", "read_records"]),
        ("deltahub.fusion.head", "deltahub.training.head", ["TaskHead", "has_head", "HEAD_PREFIX"]),
    ],
)
def test_old_training_paths_import_with_a_deprecation_warning(
    old: str, new: str, names: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=old.replace(".", r"\.")):
        shim = importlib.import_module(old)
    target = importlib.import_module(new)
    for name in names:
        assert getattr(shim, name) is getattr(target, name)


def test_public_train_and_fuse_come_from_their_packages() -> None:
    import deltahub
    from deltahub.fusion.learn import fuse as fuse_impl
    from deltahub.training.adapter import train as train_impl

    assert deltahub.train is train_impl and deltahub.fuse is fuse_impl
    assert train is train_impl and fuse is fuse_impl


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to load the base or train fails the test: checks must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("training started before the name, version and tags were checked")

    monkeypatch.setattr("deltahub.training.adapter.load_model", refuse)
    monkeypatch.setattr("deltahub.training.adapter.run", refuse)
    monkeypatch.setattr("deltahub.fusion.learn.load_model", refuse)


def test_a_taken_version_or_bad_tag_fails_before_training(
    bert_path: Path, data: dict[str, Path], no_training: None, tmp_path: Path
) -> None:
    from deltahub import artifact as af
    from deltahub.errors import AlreadyExists, InvalidRef

    registry = Registry()
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["query"]}
    w = {
        "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(1, 32),
        "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": torch.zeros(32, 1),
    }
    registry.publish(af.write_dir(tmp_path / "a", w, cfg), "color", version="1")
    with pytest.raises(AlreadyExists, match="color@1 already exists"):
        train(str(bert_path), str(data["color"]), name="color", version="1", registry=registry, **FAST)
    with pytest.raises(AlreadyExists, match="color@1 already exists"):
        fuse(
            ["color"],
            str(bert_path),
            str(data["color"]),
            name="color",
            version="1",
            registry=registry,
            **FAST,
        )
    with pytest.raises(InvalidRef, match="tag '1st'"):
        train(str(bert_path), str(data["color"]), name="color", tags=["1st"], registry=registry, **FAST)
    with pytest.raises(InvalidRef, match="not an adapter name"):
        train(str(bert_path), str(data["color"]), name="-bad", publish=False, **FAST)

    runner = CliRunner()
    args = ["train", "--base", str(bert_path), "--data", str(data["color"]), "--name", "color", "--quiet"]
    r = runner.invoke(cli, [*args, "--version", "1"])
    assert r.exit_code == AlreadyExists.exit_code and "color@1 already exists" in r.output
    r = runner.invoke(cli, [*args, "--tag", "1st"])
    assert r.exit_code == InvalidRef.exit_code and "tag '1st'" in r.output
    r = runner.invoke(cli, [*args, "--no-publish", "--version", "2"])
    assert r.exit_code == 2 and "--no-publish" in r.output
    full = Path(data["color"]).parent / "full"
    full.mkdir(exist_ok=True)
    (full / "x").write_text("x")
    r = runner.invoke(cli, [*args, "--output-dir", str(full)])
    assert r.exit_code == 2 and "not empty" in r.output
    assert [v.version for v in registry.versions("color")] == ["1"]


def test_cli_train_no_publish_and_output_dir(bert_path: Path, data: dict[str, Path], tmp_path: Path) -> None:
    from deltahub import artifact as af

    runner = CliRunner()
    args = ["train", "--base", str(bert_path), "--data", str(data["color"]), "--name", "color", "--r", "4",
            "--target-modules", "query,value", "--epochs", "1", "--batch-size", "16", "--json"]  # fmt: skip
    r = runner.invoke(cli, [*args, "--no-publish", "--output-dir", str(tmp_path / "only")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ref"] is None and out["path"] == str(tmp_path / "only") and "train_loss" in out["metrics"]
    written = af.load_dir(tmp_path / "only")
    assert written.method == "lora" and written.manifest.name == "color"
    assert not Registry().exists("color")  # nothing published

    r = runner.invoke(cli, [*args, "--output-dir", str(tmp_path / "copy")])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["ref"] == "color@1" and out["path"] == str(tmp_path / "copy")
    stored = Registry().open("color@1")
    copy = tmp_path / "copy" / "adapter_model.safetensors"
    with safe_open(str(stored.weights_path), framework="pt") as a, safe_open(str(copy), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():  # noqa: SIM118 (safe_open is not a dict)
            assert torch.equal(a.get_tensor(k), b.get_tensor(k))

    r = runner.invoke(cli, [*args[:-1], "--no-publish", "--quiet"])  # text output, temporary directory
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.split()[1])
    assert r.stdout.startswith("wrote ") and (path / "adapter_model.safetensors").is_file()
    shutil.rmtree(path)
    assert [v.version for v in Registry().versions("color")] == ["1"]
