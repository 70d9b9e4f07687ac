"""Model cards: every published version carries a README.md the Hugging Face Hub can read.

The front matter is parsed by huggingface_hub's own `ModelCard` (the Hub's reader), not
by string matching.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard

from deltahub import artifact as af
from deltahub.cards import CARD_MARKER, model_card
from deltahub.hub.hf import build_hf_folder
from deltahub.registry import Registry
from tests.hub_helpers import lora_dir


def _card(reg: Registry, ref: str) -> str:
    v = reg.resolve(ref)
    return reg.store.path(v.files[af.README_FILE]).read_text()


def _parse(text: str, tmp: Path) -> ModelCard:
    path = tmp / "README.md"
    path.write_text(text)
    return ModelCard.load(path)


def test_publish_writes_a_card_the_hub_reads(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "home")
    v = reg.publish(
        lora_dir(tmp_path / "src"), "team/alpha", description="sentiment of short reviews",
        license="apache-2.0", task="sentiment", metrics={"accuracy": 0.875, "f1": 0.5},
    )  # fmt: skip
    assert af.README_FILE in v.files
    text = _card(reg, v.ref)
    card = _parse(text, tmp_path)
    data = card.data.to_dict()
    assert data["base_model"] == "tiny-llama" and data["library_name"] == "peft"
    assert data["license"] == "apache-2.0"
    assert data["tags"] == ["deltahub", "lora", "sentiment"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 0.875, "f1": 0.5}
    body = card.text
    assert body.startswith("\n# team/alpha\n\nsentiment of short reviews")
    for section in ("## What it is", "## How it was made", "## Lineage", "## How to load it"):
        assert section in body
    assert "deltahub pull team/alpha@1" in body and "PeftModel.from_pretrained" in body
    assert CARD_MARKER in body
    # It is the card of the version's own manifest, reproducibly.
    assert text == model_card(
        reg.manifest(v), json.loads(reg.store.path(v.files[af.CONFIG_FILE]).read_text())
    )


def test_the_card_is_deterministic_and_part_of_the_digest(tmp_path: Path) -> None:
    src = lora_dir(tmp_path / "src")
    a, b = Registry(tmp_path / "a"), Registry(tmp_path / "b")
    va = a.publish(src, "team/alpha", description="d", metrics={"acc": 0.5})
    vb = b.publish(src, "team/alpha", description="d", metrics={"acc": 0.5})
    # Same artifact, name and version: the same card bytes (no clock in it) ...
    assert va.files[af.README_FILE] == vb.files[af.README_FILE]
    # ... and the version digest covers it, like every file.
    assert va.digest == af.artifact_digest(va.files)
    assert a.verify().ok and b.verify().ok


def test_a_readme_someone_wrote_is_kept_and_ours_is_rewritten(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "home")
    src = lora_dir(tmp_path / "src")
    (src / "README.md").write_text("# my own card\n")
    v = reg.publish(src, "team/own")
    assert _card(reg, v.ref) == "# my own card\n"

    plain = reg.publish(lora_dir(tmp_path / "plain", seed=1), "team/first")
    out = reg.export(plain.ref, tmp_path / "exported")
    assert CARD_MARKER in (out / "README.md").read_text()  # export is byte for byte
    again = reg.publish(out, "team/second", description="re-published")
    text = _card(reg, again.ref)
    assert "# team/second" in text and "team/first" not in text and "re-published" in text


def test_values_that_yaml_would_misread_are_quoted(tmp_path: Path) -> None:
    manifest = af.Manifest(
        name="team/x", method="lora", version="1", base_model="yes", license="no: really",
        task="null", description="line one\n---\nnot: front matter",
    )  # fmt: skip
    data = _parse(model_card(manifest, {"peft_type": "LORA"}), tmp_path).data.to_dict()
    assert (data["base_model"], data["license"]) == ("yes", "no: really")
    assert data["tags"] == ["deltahub", "lora", "null"]


def test_non_peft_methods_say_deltahub_and_skip_the_peft_snippet(tmp_path: Path) -> None:
    manifest = af.Manifest(name="team/b", method="bottleneck", version="2", base_model="bert-tiny")
    card = _parse(model_card(manifest, {"method": "bottleneck"}), tmp_path)
    assert card.data.to_dict()["library_name"] == "deltahub"
    assert "PeftModel" not in card.text and "deltahub pull team/b@2" in card.text


def test_lineage_lists_parents_pinned_by_digest(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "home")
    parent = reg.publish(lora_dir(tmp_path / "p"), "team/p")
    child = reg.publish(
        lora_dir(tmp_path / "c", seed=1), "team/c", parents=[{"ref": parent.ref, "digest": parent.digest}]
    )
    assert f"- parent: `{parent.ref}` pinned at `{parent.digest}`" in _card(reg, child.ref)


def test_push_to_hf_uploads_the_versions_card(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "home")
    v = reg.publish(lora_dir(tmp_path / "src"), "team/alpha", metrics={"acc": 0.75})
    folder = build_hf_folder(v.ref, tmp_path / "folder", reg)
    assert (folder / "README.md").read_text() == _card(reg, v.ref)
