"""`predict` / `run` / `eval` read a head by its problem type: regression heads give their
values (MSE, MAE, Pearson, Spearman in eval), multi-label heads the labels whose sigmoid
reaches --threshold with each label's probability (micro/macro-F1 and exact match in eval),
single-label heads their argmax (accuracy), as before.

The references are independent: each text run alone (unpadded) through the trained task
model (`load_task_model`) or through PEFT's own model, and the scores recomputed here with
plain numpy / Python loops. Tolerances: logits 2e-6 (the CLI pads batches, which moves
float sums by ~1e-7; answers are rounded to 6 decimals), scores 1e-5."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deltahub import Registry
from deltahub.cli.main import cli
from deltahub.errors import InvalidConfig
from deltahub.training import load_task_model, train
from deltahub.training.inference import load, predict
from deltahub.training.metrics import multi_label_metrics, pearson, rank_average, regression_metrics, spearman
from tests import fusion_helpers as fh

TEXTS = ["the red cat", "a very big blue dog saw one small owl", "gold", "one fox is near the green owl"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny BERT with three adapters trained on it: `color` (single-label), `score`
    (regression), `tags` (multi-label); and their labelled files."""
    root = tmp_path_factory.mktemp("problems")
    base = fh.bert_dir(root / "bert")
    home = root / "home"
    registry = Registry(home)
    rng = random.Random(3)
    reg, multi = [], []
    for _ in range(24):
        c, a = rng.choice(fh.COLORS), rng.choice(fh.ANIMALS)
        text = fh.sentence(rng, c, a)
        reg.append({"text": text, "label": fh.COLORS.index(c) + 0.5 * fh.ANIMALS.index(a)})
        multi.append({"text": text, "label": [c, a]})
    files = {
        "color": fh.color_task(root / "color.jsonl", n=24),
        "score": fh.write_jsonl(root / "score.jsonl", reg),
        "tags": fh.write_jsonl(root / "tags.jsonl", multi),
    }
    train(
        str(base), str(files["color"]), name="color", r=4, target_modules=["query", "value"], registry=registry,
        epochs=2, batch_size=8, lr=1e-2, progress=False,
    )  # fmt: skip
    for name, problem_type in (("score", "regression"), ("tags", "multi-label")):  # through `deltahub train`
        result = CliRunner().invoke(
            cli, ["--home", str(home), "train", "--base", str(base), "--data", str(files[name]), "--name", name,
                  "--problem-type", problem_type, "--r", "4", "--target-modules", "query,value", "--epochs", "2",
                  "--batch-size", "8", "--lr", "1e-2", "--quiet"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert registry.manifest(registry.resolve(name)).extra["head"]["problem_type"] == problem_type
    registry.close()
    return {"home": home, "base": base, "files": files}


def _reference(trained: dict[str, Any], ref: str, texts: list[str]) -> np.ndarray:
    """(N, K) logits of the trained task model, each text alone and unpadded."""
    task = load_task_model(str(trained["base"]), ref, registry=Registry(trained["home"]))
    rows = []
    for text in texts:
        ids = torch.tensor([fh.tokenizer()(text)["input_ids"]])
        with torch.no_grad():
            rows.append(task(ids)["logits"][0].double().numpy())
    return np.stack(rows)


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _gold(path: Path) -> list[Any]:
    return [json.loads(line)["label"] for line in path.read_text().splitlines()]


def _cli(trained: dict[str, Any], *args: str) -> Any:
    result = CliRunner().invoke(cli, ["--home", str(trained["home"]), *args])
    assert result.exit_code == 0, result.output
    return result


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _away_threshold(probs: np.ndarray) -> float:
    """A cut near the median probability, at least 1e-4 from every probability (so the
    ~1e-7 that padding moves cannot flip a label)."""
    p = np.sort(probs.ravel())
    mid = len(p) // 2
    for i in sorted(range(1, len(p)), key=lambda i: abs(i - mid)):
        if p[i] - p[i - 1] > 2e-4:
            return float((p[i] + p[i - 1]) / 2)
    raise AssertionError("no gap between probabilities")


# --- the library -------------------------------------------------------------------------


def test_a_regression_head_predicts_its_values(trained: dict[str, Any]) -> None:
    loaded = load(str(trained["base"]), ["score"], registry=Registry(trained["home"]))
    answers = predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="score", batch_size=3)
    want = _reference(trained, "score", TEXTS)  # (N, 1)
    for answer, row in zip(answers, want, strict=True):
        assert answer["kind"] == "regression" and answer["head"] == "score"
        assert "label" not in answer and len(answer["values"]) == 1
        np.testing.assert_allclose(answer["values"], row, atol=2e-6, rtol=0)


def test_a_multi_label_head_gives_the_labels_over_the_threshold(trained: dict[str, Any]) -> None:
    registry = Registry(trained["home"])
    names = registry.manifest(registry.resolve("tags")).extra["head"]["labels"]
    assert sorted(names) == sorted(fh.COLORS + fh.ANIMALS)
    loaded = load(str(trained["base"]), ["tags"], registry=registry)
    probs = _sigmoid(_reference(trained, "tags", TEXTS))  # (N, 8)
    for threshold in (0.5, _away_threshold(probs)):
        if np.abs(probs - threshold).min() < 1e-4:
            continue  # 0.5 too close to a probability to say which side padding puts it
        answers = predict(
            loaded.model, loaded.tokenizer, TEXTS, head_ref="tags", batch_size=3, threshold=threshold
        )
        for answer, p in zip(answers, probs, strict=True):
            assert answer["kind"] == "multi-label" and answer["threshold"] == threshold
            assert list(answer["probabilities"]) == names
            np.testing.assert_allclose(list(answer["probabilities"].values()), p, atol=2e-6, rtol=0)
            on = [k for k in range(len(names)) if p[k] >= threshold]
            assert answer["label_ids"] == on and answer["labels"] == [names[k] for k in on]
    low = predict(loaded.model, loaded.tokenizer, TEXTS[:1], head_ref="tags", threshold=0.0)[0]
    high = predict(loaded.model, loaded.tokenizer, TEXTS[:1], head_ref="tags", threshold=1.0)[0]
    assert low["labels"] == names and high["labels"] == []


def test_a_head_reads_as_trained_and_thresholds_are_checked(trained: dict[str, Any]) -> None:
    loaded = load(str(trained["base"]), ["tags"], registry=Registry(trained["home"]))
    with pytest.raises(InvalidConfig, match="trained for multi-label, not regression"):
        predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="tags", problem_type="regression")
    with pytest.raises(InvalidConfig, match="threshold"):
        predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="tags", threshold=1.5)
    with pytest.raises(InvalidConfig, match="not one of"):
        predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="tags", problem_type="ranking")
    same = predict(
        loaded.model, loaded.tokenizer, TEXTS, head_ref="tags", problem_type="multi_label_classification"
    )
    assert same == predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="tags")


def _peft_classifier(
    tmp_path: Path, num_labels: int, problem_type: str | None, seed: int
) -> tuple[Path, Any]:
    """A `BertForSequenceClassification` base directory, and a PEFT SEQ_CLS LoRA adapter on
    it (its classifier saved in `modules_to_save`) published as `cls`; returns PEFT's model."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    bare = fh.bert_dir(tmp_path / "bare")
    labels = {i: name for i, name in enumerate(["joy", "anger", "fear"][:num_labels])}
    base = tf.BertForSequenceClassification.from_pretrained(
        str(bare), num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()},
        problem_type=problem_type,
    )  # fmt: skip
    base_dir = tmp_path / "base"
    base.save_pretrained(str(base_dir))
    fh.tokenizer().save_pretrained(str(base_dir))
    peft = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft.named_parameters():
            if p.requires_grad:  # LoRA factors and the saved classifier
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    peft.save_pretrained(str(tmp_path / "adapter"))
    Registry().publish(tmp_path / "adapter", "cls")
    return base_dir, peft.eval()


def _peft_logits(peft: Any, texts: list[str]) -> np.ndarray:
    rows = []
    for text in texts:
        ids = torch.tensor([fh.tokenizer()(text)["input_ids"]])
        with torch.no_grad():
            rows.append(peft(input_ids=ids).logits[0].double().numpy())
    return np.stack(rows)


def test_a_peft_seq_cls_adapter_reads_its_base_config_problem_type(tmp_path: Path) -> None:
    base_dir, peft = _peft_classifier(tmp_path, 3, "multi_label_classification", seed=1)
    loaded = load(str(base_dir), ["cls"])
    answers = predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="cls", batch_size=2)
    probs = _sigmoid(_peft_logits(peft, TEXTS))
    assert np.abs(probs - 0.5).min() > 1e-4
    for answer, p in zip(answers, probs, strict=True):
        assert answer["kind"] == "multi-label" and "head" not in answer
        np.testing.assert_allclose(list(answer["probabilities"].values()), p, atol=2e-6, rtol=0)
        assert answer["labels"] == [
            name for name, q in zip(["joy", "anger", "fear"], p, strict=True) if q >= 0.5
        ]


def test_a_one_output_classifier_without_a_problem_type_is_regression(tmp_path: Path) -> None:
    base_dir, peft = _peft_classifier(tmp_path, 1, None, seed=2)  # transformers' loss: regression
    loaded = load(str(base_dir), ["cls"])
    answers = predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="cls", batch_size=2)
    want = _peft_logits(peft, TEXTS)
    for answer, row in zip(answers, want, strict=True):
        assert answer["kind"] == "regression"
        np.testing.assert_allclose(answer["values"], row, atol=2e-6, rtol=0)


def test_the_caller_says_the_problem_type_a_base_config_does_not(tmp_path: Path) -> None:
    base_dir, peft = _peft_classifier(tmp_path, 3, None, seed=3)  # read as single-label by default
    loaded = load(str(base_dir), ["cls"])
    plain = predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="cls")
    z = _peft_logits(peft, TEXTS)
    assert [a["label_id"] for a in plain] == list(z.argmax(1))
    multi = predict(
        loaded.model, loaded.tokenizer, TEXTS, head_ref="cls", problem_type="multi-label", threshold=0.3
    )
    for answer, row in zip(multi, _sigmoid(z), strict=True):
        assert answer["label_ids"] == [k for k in range(3) if row[k] >= 0.3]
    values = predict(loaded.model, loaded.tokenizer, TEXTS, head_ref="cls", problem_type="regression")
    np.testing.assert_allclose([a["values"] for a in values], z, atol=2e-6, rtol=0)


# --- the scores ----------------------------------------------------------------------------


def _ranks_by_counting(x: list[float]) -> list[float]:
    """Average ranks straight from the definition: below + (equal + 1) / 2."""
    return [sum(y < v for y in x) + (sum(y == v for y in x) + 1) / 2 for v in x]


def test_rank_and_correlations_against_definitions() -> None:
    assert list(rank_average(np.array([10.0, 20.0, 20.0, 30.0]))) == [1.0, 2.5, 2.5, 4.0]
    assert list(rank_average(np.array([3.0, 1.0, 3.0, 3.0, 0.0]))) == [4.0, 2.0, 4.0, 4.0, 1.0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, size=12).astype(float)  # many ties
        b = a + rng.normal(size=12)
        assert list(rank_average(a)) == _ranks_by_counting(list(a))
        want = np.corrcoef(_ranks_by_counting(list(a)), _ranks_by_counting(list(b)))[0, 1]
        assert spearman(a, b) == pytest.approx(want, abs=1e-12)
        assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert pearson(np.ones(5), np.arange(5.0)) is None and spearman(np.ones(5), np.arange(5.0)) is None
    assert spearman(np.arange(6.0), np.arange(6.0) ** 3) == pytest.approx(1.0)  # monotone
    m = regression_metrics([[1.0], [2.0], [4.0]], [[1.5], [2.0], [3.0]])
    assert m["mse"] == pytest.approx((0.25 + 0 + 1) / 3) and m["mae"] == pytest.approx(1.5 / 3)


def _f1_by_sets(predicted: list[set[int]], gold: list[set[int]], k: int) -> tuple[float, float, float]:
    """Micro-F1, macro-F1 (a label nobody names counts 1.0) and exact match, by counting."""

    def f1(tp: int, fp: int, fn: int) -> float:
        return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)

    counts = []
    for label in range(k):
        tp = sum(label in p and label in g for p, g in zip(predicted, gold, strict=True))
        fp = sum(label in p and label not in g for p, g in zip(predicted, gold, strict=True))
        fn = sum(label not in p and label in g for p, g in zip(predicted, gold, strict=True))
        counts.append((tp, fp, fn))
    micro = f1(*(sum(c[i] for c in counts) for i in range(3)))
    macro = sum(f1(*c) for c in counts) / k
    exact = sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
    return micro, macro, exact


def _rows_as_sets(hot: np.ndarray) -> list[set[int]]:
    return [{k for k in range(hot.shape[1]) if row[k]} for row in hot]


def test_multi_label_scores_against_counting() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        p, g = rng.random((9, 5)) < 0.4, rng.random((9, 5)) < 0.4
        g[:, 4] = p[:, 4] = False  # a label nobody names
        m = multi_label_metrics(p, g)
        micro, macro, exact = _f1_by_sets(_rows_as_sets(p), _rows_as_sets(g), 5)
        assert (m["f1_micro"], m["f1_macro"], m["exact_match"]) == pytest.approx(
            (micro, macro, exact), abs=1e-12
        )


# --- the CLI: one test a problem type ------------------------------------------------------


def test_cli_regression_run_and_eval(trained: dict[str, Any]) -> None:
    base, data = str(trained["base"]), trained["files"]["score"]
    texts, gold = _texts(data), np.array(_gold(data), dtype=float)
    want = _reference(trained, "score", texts)[:, 0]  # (N,)
    out = _cli(
        trained, "run", "score", "--base", base, "--input-file", str(data), "--json", "--batch-size", "5"
    )
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [g["kind"] for g in got] == ["regression"] * len(texts)
    np.testing.assert_allclose([g["values"][0] for g in got], want, atol=2e-6, rtol=0)
    one = _cli(trained, "run", "score", "--base", base, "--input", texts[0])
    assert float(one.stdout.split("value: ")[1].split()[0]) == pytest.approx(want[0], abs=1e-5)
    result = json.loads(
        _cli(trained, "eval", "score", "--base", base, "--data", str(data), "--json", "--record").stdout
    )
    diff = want - gold
    ranks = np.corrcoef(_ranks_by_counting(list(want)), _ranks_by_counting(list(gold)))[0, 1]
    expected = {
        "mse": float(np.mean(diff**2)),
        "mae": float(np.mean(np.abs(diff))),
        "pearson": float(np.corrcoef(want, gold)[0, 1]),
        "spearman": float(ranks),
    }
    assert result["problem_type"] == "regression" and result["metric"] == "mse" and result["correct"] is None
    assert result["metrics"] == pytest.approx(expected, abs=1e-5)
    assert result["value"] == result["metrics"]["mse"] and result["rows"] == len(texts)
    recorded = {e["metric"]: e["value"] for e in Registry(trained["home"]).evals("score")}
    assert recorded == pytest.approx(result["metrics"])
    text = _cli(trained, "eval", "score", "--base", base, "--data", str(data))
    assert text.stdout.startswith(f"regression, {len(texts)} rows: mse: {expected['mse']:.4f}")


def test_cli_multi_label_run_and_eval(trained: dict[str, Any]) -> None:
    base, data = str(trained["base"]), trained["files"]["tags"]
    texts, gold = _texts(data), _gold(data)
    registry = Registry(trained["home"])
    names = registry.manifest(registry.resolve("tags")).extra["head"]["labels"]
    probs = _sigmoid(_reference(trained, "tags", texts))  # (N, 8)
    t = _away_threshold(probs)
    out = _cli(
        trained, "run", "tags", "--base", base, "--input-file", str(data), "--json", "--threshold", str(t)
    )
    got = [json.loads(line) for line in out.stdout.splitlines()]
    predicted = [{k for k in range(len(names)) if row[k] >= t} for row in probs]
    assert [set(g["label_ids"]) for g in got] == predicted
    assert [g["labels"] for g in got] == [[names[k] for k in sorted(p)] for p in predicted]
    one = _cli(trained, "run", "tags", "--base", base, "--input", texts[0], "--threshold", str(t))
    assert one.stdout.splitlines()[-1].startswith(
        f"labels: {','.join(got[0]['labels']) or '(none)'}  probabilities: "
    )
    result = json.loads(
        _cli(
            trained, "eval", "tags", "--base", base, "--data", str(data), "--json", "--threshold", str(t)
        ).stdout
    )
    truth = [{names.index(label) for label in row} for row in gold]
    micro, macro, exact = _f1_by_sets(predicted, truth, len(names))
    assert 0 < exact < 1 or 0 < micro < 1  # a cut that tells something apart
    assert result["problem_type"] == "multi-label" and result["metric"] == "f1_micro"
    assert result["metrics"] == pytest.approx(
        {"f1_micro": micro, "f1_macro": macro, "exact_match": exact}, abs=1e-9
    )
    assert result["correct"] == round(exact * len(texts))


def test_cli_single_label_run_and_eval_as_before(trained: dict[str, Any]) -> None:
    base, data = str(trained["base"]), trained["files"]["color"]
    texts, gold = _texts(data), _gold(data)
    registry = Registry(trained["home"])
    names = registry.manifest(registry.resolve("color")).extra["head"]["labels"]
    z = _reference(trained, "color", texts)
    out = _cli(trained, "run", "color", "--base", base, "--input-file", str(data), "--json")
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert [g["kind"] for g in got] == ["classification"] * len(texts)
    assert [g["label"] for g in got] == [names[k] for k in z.argmax(1)]
    result = json.loads(_cli(trained, "eval", "color", "--base", base, "--data", str(data), "--json").stdout)
    correct = sum(names[k] == label for k, label in zip(z.argmax(1), gold, strict=True))
    assert (result["metric"], result["correct"], result["rows"]) == ("accuracy", correct, len(texts))
    assert result["value"] == pytest.approx(correct / len(texts)) and result["metrics"] == {
        "accuracy": result["value"]
    }
    assert "problem_type" not in result
    text = _cli(trained, "eval", "color", "--base", base, "--data", str(data))
    assert text.stdout.startswith(f"accuracy: {correct / len(texts):.4f} ({correct}/{len(texts)})")
    # a problem type that contradicts the head is a clean error, not a traceback
    bad = CliRunner().invoke(
        cli, ["--home", str(trained["home"]), "eval", "color", "--base", base, "--data", str(data),
              "--problem-type", "regression"],
    )  # fmt: skip
    assert bad.exit_code != 0 and "trained for single-label" in bad.stderr and "Traceback" not in bad.output
