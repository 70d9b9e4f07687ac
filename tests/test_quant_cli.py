"""`deltahub train/fuse --quantize nf4` (QLoRA) and `deltahub export REF --merged --base PATH OUT`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.compose import AdaptedModel, load_base
from deltahub.training.data import Collator, load_dataset
from tests import fusion_helpers as fh

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """bitsandbytes' CPU double-quant dequantization is ~500x slower with 2 threads on a
    busy 2-core machine (thread contention on tiny blocks); these models are tiny anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def llama64(path: Path) -> Path:
    """A Llama whose quantized layers are all kernel-friendly widths (64, 128), with the toy tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(fh.SPECIAL + fh.WORDS), max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(path))
    fh.tokenizer().save_pretrained(str(path))
    return path


def loss_of(model: AdaptedModel, data: Path) -> float:
    tok = fh.tokenizer()
    batch = Collator(tok.pad_token_id)(load_dataset(data, "causal-lm", tok).features)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()))


def test_train_and_fuse_on_a_4bit_base(tmp_path: Path) -> None:
    base = llama64(tmp_path / "llama")
    rows = [
        {"prompt": f"the {c} cat says", "completion": "yes" if c == "red" else "no"} for c in fh.COLORS
    ] * 4
    data = fh.write_jsonl(tmp_path / "p.jsonl", rows)
    common = ["--base", str(base), "--data", str(data), "--task", "causal-lm", "--quiet", "--json"]
    runner = CliRunner()
    r = runner.invoke(
        cli,
        ["train", "--name", "says", "--r", "4", "--target-modules", "q_proj,v_proj", "--epochs", "2",
         "--batch-size", "4", "--lr", "2e-2", "--quantize", "nf4", "--gradient-checkpointing", *common],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ref = json.loads(r.stdout)["ref"]
    # Trained on the 4-bit base; it lowers the loss on the full-precision base, where it
    # loads without force (one fingerprint).
    full = AdaptedModel(load_base(base, device="cpu"))
    before = loss_of(full, data)
    full.activate(full.load(ref))
    assert loss_of(full, data) < before - 0.2
    r = runner.invoke(
        cli,
        [
            "fuse",
            ref,
            "--name",
            "says-fused",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--quantize",
            "nf4",
            *common,
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ref"].startswith("says-fused@")
    r = runner.invoke(cli, ["train", "--name", "x", "--quantize", "int4", *common])
    assert r.exit_code != 0 and "int4" in r.output


def test_export_merged_writes_a_full_precision_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = llama64(tmp_path / "llama")
    model = AdaptedModel(load_base(base, device="cpu"))
    model.add_adapter("lo", {"method": "lora", "r": 4, "target_modules": "all-linear", "use_dora": True})
    model.add_adapter("bo", {"method": "bottleneck", "variant": "pfeiffer"})
    with torch.no_grad():
        for p in model.adapter_parameters("lo") + model.adapter_parameters("bo"):
            p.add_(torch.randn_like(p) * 0.1)
    from deltahub.registry import Registry

    registry = Registry()
    for name in ("lo", "bo"):
        model.save_adapter(name, tmp_path / name)
        registry.publish(tmp_path / name, name)
    model.activate("lo")
    ids = torch.randint(0, 24, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits

    runner = CliRunner()
    out = tmp_path / "merged"
    r = runner.invoke(cli, ["export", "lo", str(out), "--merged", "--base", str(base)])
    assert r.exit_code == 0, r.output
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    served = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert getattr(served.config, "quantization_config", None) is None
    with torch.no_grad():
        got = served(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max()) + 1e-6

    r = runner.invoke(cli, ["export", "bo", str(tmp_path / "b"), "--merged", "--base", str(base)])
    assert r.exit_code != 0 and "cannot be folded" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["export", "lo", str(tmp_path / "c"), "--merged"])
    assert r.exit_code != 0 and "--base" in r.output
    r = runner.invoke(cli, ["export", "lo", str(out), "--merged", "--base", str(base)])
    assert r.exit_code != 0 and "not empty" in r.output
