"""`deltahub run` on many inputs (a file, stdin, JSON Lines out), `deltahub eval` (accuracy,
recorded beside the version), and inputs that used to reach users as tracebacks (too long,
empty), two versions of one adapter, sampling and chat templates for causal LMs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deltahub import Registry
from deltahub.cli.main import cli
from deltahub.training import train
from deltahub.training.inference import load, predict
from tests import fusion_helpers as fh

TEXTS = ["the red cat", "a very big blue dog saw one small owl", "gold", "one fox is near the green owl"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(home, base dir, labelled eval file): a tiny BERT and a `color` classifier adapter, 2 versions."""
    root = tmp_path_factory.mktemp("batch")
    base = fh.bert_dir(root / "bert")
    home = root / "home"
    registry = Registry(home)
    data = fh.color_task(root / "color.jsonl", n=24)
    for seed in (0, 1):
        train(
            str(base), str(data), name="color", r=4, target_modules=["query", "value"], registry=registry,
            epochs=1, batch_size=8, progress=False, seed=seed,
        )  # fmt: skip
    registry.close()
    return home, base, fh.color_task(root / "eval.jsonl", n=20, seed=7)


def _run(home: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["--home", str(home), *args], input=input)


def _alone(home: Path, base: Path, refs: list[str], texts: list[str], **kw) -> list[dict]:
    """Each text predicted alone (no batch, no padding): the reference the CLI must match."""
    loaded = load(str(base), refs, registry=Registry(home), **kw)
    return [predict(loaded.model, loaded.tokenizer, [t], head_ref=refs[0])[0] for t in texts]


def test_run_input_file_of_text_lines_predicts_each_line(trained, tmp_path: Path) -> None:
    home, base, _ = trained
    lines = tmp_path / "in.txt"
    lines.write_text("\n".join(TEXTS[:2]) + "\n\n" + "\n".join(TEXTS[2:]) + "\n")  # a blank line is skipped
    result = _run(home, "run", "--base", str(base), "color", "--input-file", str(lines), "--batch-size", "3")
    assert result.exit_code == 0, result.output
    want = _alone(home, base, ["color"], TEXTS)
    assert result.stdout.splitlines() == [f"{w['label']}\t{t}" for w, t in zip(want, TEXTS, strict=True)]
    assert "Loading weights" not in result.stderr  # no progress bar of transformers' between answers


def test_run_reads_jsonl_from_stdin_and_writes_jsonl(trained) -> None:
    home, base, _ = trained
    stdin = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS))
    result = _run(home, "run", "--base", str(base), "color", "--input-file", "-", "--json", input=stdin)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    want = _alone(home, base, ["color"], TEXTS)
    assert [r["input"] for r in rows] == TEXTS
    for row, w in zip(rows, want, strict=True):
        assert row["kind"] == "classification" and row["label"] == w["label"]
        # padded batch vs one text alone: float sums differ by ~1e-7; logits rounded to 6 places
        assert row["logits"] == pytest.approx(w["logits"], abs=2e-6)
    # one JSON shape per prediction: a single --input --json has the same keys as each line
    one = _run(home, "run", "--base", str(base), "color", "--input", TEXTS[0], "--json")
    assert one.exit_code == 0, one.output
    assert set(json.loads(one.stdout)) == set(rows[0])


def test_eval_scores_accuracy_and_records_it_beside_the_version(trained) -> None:
    home, base, data = trained
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    want = _alone(home, base, ["color@2"], [r["text"] for r in rows])
    correct = sum(w["label"] == r["label"] for w, r in zip(want, rows, strict=True))
    result = _run(home, "eval", "color@2", "--base", str(base), "--data", str(data), "--json", "--record")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metric"] == "accuracy" and report["rows"] == len(rows) == 20
    assert report["correct"] == correct and report["value"] == pytest.approx(correct / 20)
    assert report["recorded"] is True and report["data_digest"].startswith("sha256:")
    shown = json.loads(_run(home, "show", "color@2", "--json").stdout)
    assert [(e["metric"], e["rows"]) for e in shown["evals"]] == [("accuracy", 20)]
    assert shown["evals"][0]["value"] == pytest.approx(correct / 20)
    assert json.loads(_run(home, "show", "color@1", "--json").stdout)["evals"] == []
    assert "evaluated" in _run(home, "show", "color@2").stdout


def test_eval_reads_csv_and_refuses_unlabelled_rows(trained, tmp_path: Path) -> None:
    home, base, _ = trained
    csv_file = tmp_path / "d.csv"
    csv_file.write_text("sentence,y\nthe red cat,red\none blue owl,blue\n")
    result = _run(
        home, "eval", "color", "--base", str(base), "--data", str(csv_file),
        "--text-column", "sentence", "--label-column", "y",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("accuracy: ")
    unlabelled = tmp_path / "u.jsonl"
    unlabelled.write_text('{"text": "the red cat"}\n')
    bad = _run(home, "eval", "color", "--base", str(base), "--data", str(unlabelled))
    assert bad.exit_code == 2 and "no 'label'" in bad.output and "Traceback" not in bad.output


def test_input_longer_than_the_model_is_truncated_and_empty_input_is_one_line(trained) -> None:
    home, base, _ = trained
    long = " ".join(["the red cat saw a big owl"] * 20)  # 140 words: past 32 positions
    result = _run(home, "run", "--base", str(base), "color", "--input", long, "--json")
    assert result.exit_code == 0, result.output
    cut = " ".join(long.split()[:30])  # [CLS] + 30 words + [SEP] = the 32 positions
    assert json.loads(result.stdout)["logits"] == _alone(home, base, ["color"], [cut])[0]["logits"]
    empty = _run(home, "run", "--base", str(base), "color", "--input", "  ")
    assert empty.exit_code == 2 and empty.stdout == ""
    assert empty.stderr.splitlines() == ["Error: the input is empty: give some text to run"]
    neither = _run(home, "run", "--base", str(base), "color")
    assert neither.exit_code == 2 and "--input-file" in neither.output


def test_two_versions_of_one_adapter_combine(trained) -> None:
    home, base, _ = trained
    result = _run(
        home, "run", "--base", str(base), "color@1", "color@2", "--average", "0.5,0.5", "--input", TEXTS[1],
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["adapters"] == ["color.v1", "color.v2"]
    assert "Average" in data["composition"]


def _llama(tmp_path: Path, template: bool) -> Path:
    path = fh.llama_dir(tmp_path / "llama")
    if template:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        tok.chat_template = "{% for m in messages %}says {{ m['content'] }} is{% endfor %}"
        tok.save_pretrained(str(path))
    return path


def test_sampling_is_seeded_and_the_chat_template_is_applied(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from tests.compose_helpers import peft_dir

    base = _llama(tmp_path, template=True)
    adapter, _ = peft_dir(
        tmp_path / "lora", LlamaForCausalLM.from_pretrained(str(base)), ["q_proj", "v_proj"], seed=4
    )
    registry = Registry()
    registry.publish(adapter, "talker")
    run = ["run", "--base", str(base), "talker", "--input", "red cat", "--max-new-tokens", "6", "--json"]
    sampled = [
        json.loads(
            CliRunner().invoke(cli, [*run, "--temperature", "1.5", "--top-p", "0.9", "--seed", "3"]).stdout
        )
        for _ in range(2)
    ]
    assert sampled[0]["output_ids"] == sampled[1]["output_ids"]  # same seed, same sample
    greedy = json.loads(CliRunner().invoke(cli, run).stdout)
    plain = json.loads(CliRunner().invoke(cli, [*run, "--no-chat"]).stdout)
    # the templated prompt, run by hand: "says red cat is" without special tokens
    loaded = load(str(base), ["talker"], registry=registry)
    ids = loaded.tokenizer("says red cat is", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert greedy["output_ids"] == out[0, ids.shape[1] :].tolist()
    ids = loaded.tokenizer("red cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert plain["output_ids"] == out[0, ids.shape[1] :].tolist()
    bad = CliRunner().invoke(cli, [*run, "--top-p", "0.5"])
    assert bad.exit_code == 2 and "--temperature" in bad.output


def test_run_quantize_nf4_loads_a_4bit_base(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from deltahub.compose.quant import is_quantized
    from tests.compose_helpers import peft_dir

    base = _llama(tmp_path, template=False)
    adapter, _ = peft_dir(tmp_path / "lora", LlamaForCausalLM.from_pretrained(str(base)), ["q_proj"], seed=1)
    registry = Registry()
    registry.publish(adapter, "talker")
    args = ["run", "--base", str(base), "talker", "--input", "red cat", "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(cli, [*args, "--quantize", "nf4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    loaded = load(str(base), ["talker"], registry=registry, quantize="nf4", device="cpu")
    assert is_quantized(loaded.model.base)
    want = predict(loaded.model, loaded.tokenizer, ["red cat"], max_new_tokens=4)[0]
    assert json.loads(result.stdout)["output_ids"] == want["output_ids"]
