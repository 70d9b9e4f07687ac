"""`deltahub.predict` (training/inference.py): classification with a trained head, a base classifier,
embeddings and generation, each checked against the model run one text at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltahub import AdaptedModel, Registry, load_base
from deltahub.errors import InvalidConfig
from deltahub.training import load_task_model, train
from deltahub.training.inference import composition, load, predict
from tests import fusion_helpers as fh
from tests.compose_helpers import randomize

# Different lengths, so a batch of two is padded.
TEXTS = ["the red cat", "a very big blue dog saw one small owl", "gold", "one fox is near the green owl"]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fh.bert_dir(tmp_path_factory.mktemp("bert") / "bert")


def _ids(text: str) -> torch.Tensor:
    return torch.tensor([fh.tokenizer()(text)["input_ids"]])  # (1, T), never padded


def test_classification_with_a_trained_head_matches_the_task_model(bert_path: Path, tmp_path: Path) -> None:
    registry = Registry()
    data = fh.color_task(tmp_path / "color.jsonl", n=16)
    train(
        str(bert_path), str(data), name="color", r=4, target_modules=["query", "value"], registry=registry,
        epochs=1, batch_size=8, progress=False,
    )  # fmt: skip
    loaded = load(str(bert_path), ["color"], registry=registry)
    answers = predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="color", batch_size=2)
    task = load_task_model(str(bert_path), "color", registry=registry)
    assert [a["input"] for a in answers] == TEXTS
    for text, answer in zip(TEXTS, answers, strict=True):
        with torch.no_grad():
            want = task(_ids(text))["logits"][0]  # (K,): the trained TaskModel, one unpadded text
        assert answer["kind"] == "classification" and answer["head"] == "color"
        # logits are rounded to 6 decimals; padding changes float sums by ~1e-7
        torch.testing.assert_close(torch.tensor(answer["logits"]), want, atol=2e-6, rtol=0)
        assert answer["label_id"] == int(want.argmax())
        assert answer["label"] == sorted(fh.COLORS)[int(want.argmax())]


def test_embeddings_in_padded_batches_equal_one_text_at_a_time(bert_path: Path) -> None:
    model = AdaptedModel(load_base(str(bert_path), device="cpu"))
    model.add_adapter("a", {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})
    randomize(model.get_adapter("a"), seed=3)
    tokenizer = fh.tokenizer()
    plain = predict(model, tokenizer, TEXTS, batch_size=3)
    model.activate("a")
    batched = predict(model, tokenizer, TEXTS, batch_size=3)
    single = [predict(model, tokenizer, [t])[0] for t in TEXTS]
    for text, answer, alone, base in zip(TEXTS, batched, single, plain, strict=True):
        with torch.no_grad():
            want = model(input_ids=_ids(text)).last_hidden_state[0].mean(0)  # (d,)
        assert answer["kind"] == "embedding" and answer["dim"] == want.shape[0]
        assert answer["norm"] == pytest.approx(float(want.norm()), abs=2e-6)
        torch.testing.assert_close(torch.tensor(answer["head"]), want[:8], atol=2e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(alone["head"]), want[:8], atol=1e-6, rtol=0)
        assert (
            max(abs(x - y) for x, y in zip(base["head"], answer["head"], strict=True)) > 1e-3
        )  # adapter acts


def test_base_classifier_labels_from_its_config(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=len(fh.SPECIAL + fh.WORDS), max_position_embeddings=32, num_labels=3,
        id2label={0: "neg", 1: "neu", 2: "pos"}, label2id={"neg": 0, "neu": 1, "pos": 2},
    )  # fmt: skip
    base = BertForSequenceClassification(config).eval()
    model = AdaptedModel(base)
    answers = predict(model, fh.tokenizer(), TEXTS, batch_size=4)
    for text, answer in zip(TEXTS, answers, strict=True):
        with torch.no_grad():
            want = base(input_ids=_ids(text)).logits[0]
        torch.testing.assert_close(torch.tensor(answer["logits"]), want, atol=2e-6, rtol=0)
        assert answer["label"] == config.id2label[int(want.argmax())]
        assert "head" not in answer


def test_generation_one_text_at_a_time(tmp_path: Path) -> None:
    path = fh.llama_dir(tmp_path / "llama")
    model = AdaptedModel(load_base(str(path), device="cpu"))
    model.add_adapter(
        "a", {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    )
    randomize(model.get_adapter("a"), seed=5)
    model.activate("a")
    tokenizer = fh.tokenizer()
    answers = predict(model, tokenizer, TEXTS[:2], max_new_tokens=4, batch_size=8)
    for text, answer in zip(TEXTS[:2], answers, strict=True):
        ids = _ids(text)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        new = out[0, ids.shape[1] :]
        assert answer["kind"] == "generation" and answer["input"] == text
        assert answer["output_ids"] == new.tolist() and len(new) == 4
        assert answer["output"] == tokenizer.decode(new)


def test_predict_refuses_a_bare_string_and_unclear_compositions(bert_path: Path) -> None:
    model = AdaptedModel(load_base(str(bert_path), device="cpu"))
    with pytest.raises(InvalidConfig, match="list of texts"):
        predict(model, fh.tokenizer(), "the red cat")
    assert predict(model, fh.tokenizer(), []) == []
    with pytest.raises(InvalidConfig, match="--sum, --average or --stack"):
        composition(["a", "b"])
    with pytest.raises(InvalidConfig, match="not one of"):
        composition(["a"], "mean")
    assert repr(composition(["a", "b"], "sum", [0.5, 2])) == "Sum('a', 'b', weights=[0.5, 2.0])"


def test_predict_is_public() -> None:
    import deltahub
    from deltahub.training import inference

    assert deltahub.predict is inference.predict
