"""`export --merged` of a classifier: a PEFT SEQ_CLS adapter on a bare encoder becomes a
`...ForSequenceClassification` model with the adapter's logits; a deltahub task head is
written beside the model (no transformers class computes it exactly) with a note."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from deltahub import Registry
from deltahub.cli.main import cli
from tests import fusion_helpers as fh


def test_a_peft_seq_cls_adapter_on_a_bare_base_exports_a_sequence_classifier(tmp_path: Path) -> None:
    import transformers as tf
    from peft import LoraConfig, PeftModel, get_peft_model

    bare = fh.bert_dir(tmp_path / "bert")  # a bare BertModel, as all-MiniLM-L6-v2 is
    classifier = tf.BertForSequenceClassification.from_pretrained(str(bare), num_labels=3)
    peft = get_peft_model(
        classifier, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in peft.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    peft.save_pretrained(str(tmp_path / "adapter"))
    Registry().publish(tmp_path / "adapter", "cls")
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["export", "cls", str(out), "--merged", "--base", str(bare)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and len(config["id2label"]) == 3
    served = tf.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    # the reference: PEFT's own model, loaded fresh on a classifier built from the bare base
    fresh = tf.BertForSequenceClassification.from_pretrained(str(bare), num_labels=3)
    reference = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([fh.tokenizer()("the red cat saw a big owl")["input_ids"]])
    with torch.no_grad():
        want, got = reference(input_ids=ids).logits, served(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # float32 merge: W + s B A folded once


def test_a_deltahub_task_head_is_written_beside_the_model_with_a_note(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from deltahub.training import train

    base = fh.bert_dir(tmp_path / "bert")
    data = fh.color_task(tmp_path / "color.jsonl", n=16)
    train(
        str(base), str(data), name="color", r=4, target_modules=["query", "value"], epochs=1, batch_size=8,
        progress=False,
    )  # fmt: skip
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["export", "color", str(out), "--merged", "--base", str(base)])
    assert result.exit_code == 0, result.output
    assert "note: the task head (mean pooling" in result.stderr
    head = load_file(str(out / "deltahub_head.safetensors"))
    stored = load_file(str(Registry().open("color").weights_path))
    assert torch.equal(head["classifier.weight"], stored["deltahub_head.classifier.weight"])
    assert json.loads((out / "deltahub_head.json").read_text())["labels"] == sorted(fh.COLORS)
