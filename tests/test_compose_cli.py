"""`deltahub run` on tiny models saved to disk with a tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from deltahub import AdaptedModel, Registry, Sum, load_base
from deltahub.cli.main import cli
from tests.compose_helpers import peft_dir, tiny

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "adapters", "are", "small"]


def save_with_tokenizer(model, path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


def test_run_generates_with_an_adapter_by_name(tmp_path):
    base_dir = save_with_tokenizer(tiny("llama"), tmp_path / "base")
    adapter_dir, _ = peft_dir(tmp_path / "lora", tiny("llama"), ["q_proj", "v_proj"], seed=4)
    registry = Registry()
    registry.publish(adapter_dir, "greeter")
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--base",
            str(base_dir),
            "greeter",
            "--input",
            "hello world",
            "--max-new-tokens",
            "5",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "generation" and data["adapters"] == ["greeter"]
    # the same run through the library API
    model = AdaptedModel(load_base(str(base_dir), device="cpu"), registry=registry)
    model.activate(model.load("greeter"))
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([[4, 5]]), max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    assert data["output_ids"] == out[0, 2:].tolist()


def test_run_sums_classifier_adapters(tmp_path):
    base = tiny("bert-cls")
    base_dir = save_with_tokenizer(base, tmp_path / "base")
    for name, seed in (("a", 1), ("b", 2)):
        path, _ = peft_dir(tmp_path / name, tiny("bert-cls"), ["query", "value"], seed=seed)
        Registry().publish(path, name)
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--base",
            str(base_dir),
            "a",
            "b",
            "--sum",
            "0.5,2",
            "--input",
            "adapters are small",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    model = AdaptedModel(load_base(str(base_dir), device="cpu"))
    model.load("a")
    model.load("b")
    model.activate(Sum("a", "b", weights=[0.5, 2]))
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor([[6, 7, 8]]), token_type_ids=torch.zeros(1, 3, dtype=torch.long)
        ).logits[0]
    assert torch.allclose(torch.tensor(data["logits"]), logits, atol=1e-5)
    assert data["label_id"] == int(logits.argmax())


def test_run_errors_are_one_line(tmp_path):
    base_dir = save_with_tokenizer(tiny("llama"), tmp_path / "base")
    result = CliRunner().invoke(cli, ["run", "--base", str(base_dir), "nope", "--input", "hello"])
    assert result.exit_code == 4
    assert "no adapter named 'nope'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["run", "--base", str(base_dir), "a", "b", "--sum", "1", "--input", "x"])
    assert result.exit_code == 2 and "1 weights for 2 adapters" in result.output
