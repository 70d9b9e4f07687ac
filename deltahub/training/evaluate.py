"""Batch inputs and scoring: read rows from a file (or stdin), score a labelled file.

`read_rows(source)` reads what `deltahub run --input-file` and `deltahub eval --data`
take: JSON Lines (one object a line, or one JSON string a line), CSV with a header
(`.csv`), or plain text (one input a line); blank lines are skipped. `"-"` reads stdin.

`evaluate(loaded, rows)` predicts every row in batches and compares with its label:
accuracy for single-label classification (the label matches the predicted label's name,
or its index when the label is an integer), exact match for generation (stripped text);
for a regression head MSE, MAE, Pearson and Spearman (the label a number, or a list of
num_labels numbers); for a multi-label head micro- and macro-F1 and exact-match accuracy
(the label a list of label names, or a comma-separated string). `deltahub.training.metrics`
computes them. An encoder without a head has nothing to score and is refused.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from deltahub.errors import InvalidConfig, NotFound


def read_rows(source: str | Path | TextIO, text_column: str = "text") -> tuple[list[dict[str, Any]], str]:
    """The rows of `source` (a path, "-" for stdin, or an open text stream) and the sha256 of its bytes."""
    if isinstance(source, (str, Path)) and str(source) != "-":
        path = Path(source)
        if not path.is_file():
            raise NotFound(f"no such input file: {path}")
        data = path.read_bytes()
        name = path.name
    else:
        stream = sys.stdin if not hasattr(source, "read") else source
        raw = stream.read()  # type: ignore[union-attr]
        data = raw.encode() if isinstance(raw, str) else raw
        name = "-"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidConfig(f"{name} is not UTF-8 text") from None
    if name.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and text_column not in rows[0]:
            raise InvalidConfig(f"{name} has no column {text_column!r} (columns: {', '.join(rows[0])})")
        return rows, digest
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    jsonl = name.endswith((".jsonl", ".json")) or (bool(lines) and lines[0][1].lstrip().startswith("{"))
    if not jsonl:
        return [{text_column: line} for _, line in lines], digest
    rows = []
    for n, line in lines:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidConfig(f"{name} line {n} is not JSON ({e.msg}); give one object a line") from None
        if isinstance(value, str):
            value = {text_column: value}
        if not isinstance(value, dict) or not isinstance(value.get(text_column), str):
            raise InvalidConfig(f"{name} line {n} has no string field {text_column!r}")
        rows.append(value)
    return rows, digest


def texts_of(rows: Sequence[dict[str, Any]], text_column: str = "text") -> list[str]:
    return [str(row[text_column]) for row in rows]


@dataclass
class EvalReport:
    """What `evaluate` measured: the main metric and its value, every metric (`metrics`),
    how many rows, how many were right (None for regression), and each row's answer."""

    metric: str
    value: float
    rows: int
    correct: int | None
    answers: list[dict[str, Any]] = field(default_factory=list, repr=False)
    metrics: dict[str, Any] = field(default_factory=dict)  # name -> float, None where undefined
    problem_type: str | None = None

    def __post_init__(self) -> None:
        self.metrics = self.metrics or {self.metric: self.value}

    def to_dict(self) -> dict[str, Any]:
        out = {"metric": self.metric, "value": self.value, "rows": self.rows, "correct": self.correct}
        return {
            **out,
            "metrics": self.metrics,
            **({"problem_type": self.problem_type} if self.problem_type else {}),
        }


def _matches(answer: dict[str, Any], gold: Any) -> bool:
    if answer["kind"] == "generation":
        return str(answer["output"]).strip() == str(gold).strip()
    if str(gold) == str(answer["label"]):
        return True
    return isinstance(gold, int) and not isinstance(gold, bool) and gold == answer["label_id"]


def evaluate(
    loaded: Any,
    rows: Sequence[dict[str, Any]],
    *,
    text_column: str = "text",
    label_column: str = "label",
    batch_size: int = 32,
    max_new_tokens: int = 20,
    threshold: float = 0.5,
    problem_type: str | None = None,
) -> EvalReport:
    """Score `loaded` (`inference.load`'s result) on labelled `rows`; `threshold` and
    `problem_type` as `predict` takes them."""
    from deltahub.training.inference import predict

    if not rows:
        raise InvalidConfig("the data has no rows to score")
    for n, row in enumerate(rows, 1):
        if label_column not in row or row[label_column] in (None, ""):
            raise InvalidConfig(f"row {n} has no {label_column!r}: eval needs labelled data")
    answers = predict(
        loaded.model,
        loaded.tokenizer,
        texts_of(rows, text_column),
        head_ref=loaded.refs[0] if loaded.refs else None,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        threshold=threshold,
        problem_type=problem_type,
    )
    kind = answers[0]["kind"]
    if kind == "embedding":
        raise InvalidConfig(
            "this base and adapter give embeddings, not labels: eval scores a classifier "
            "(an adapter trained for classification, or a ...ForSequenceClassification base) or a causal LM"
        )
    gold = [row[label_column] for row in rows]
    if kind == "regression":
        return _regression_report(answers, gold)
    if kind == "multi-label":
        return _multi_label_report(answers, gold)
    correct = sum(_matches(a, g) for a, g in zip(answers, gold, strict=True))
    metric = "exact_match" if kind == "generation" else "accuracy"
    return EvalReport(metric, correct / len(rows), len(rows), correct, answers)


def _regression_report(answers: list[dict[str, Any]], gold: list[Any]) -> EvalReport:
    from deltahub.training.metrics import regression_metrics

    width = len(answers[0]["values"])
    targets = []
    for n, value in enumerate(gold, 1):
        values = value if isinstance(value, list) else [value]
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise InvalidConfig(f"row {n}: label {value!r} is not a number (a regression head)") from None
        if len(numbers) != width:
            raise InvalidConfig(f"row {n}: {len(numbers)} label values for a head with {width} outputs")
        targets.append(numbers)
    metrics = regression_metrics([a["values"] for a in answers], targets)
    return EvalReport(
        "mse", metrics["mse"], len(gold), None, answers, metrics=metrics, problem_type="regression"
    )


def _multi_label_report(answers: list[dict[str, Any]], gold: list[Any]) -> EvalReport:
    from deltahub.training.data import label_list
    from deltahub.training.metrics import multi_label_metrics

    names = list(answers[0]["probabilities"])  # in label order
    truth = []
    for n, value in enumerate(gold, 1):
        hot = [False] * len(names)
        for label in label_list(value):
            if str(label) in names:
                hot[names.index(str(label))] = True
            elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
                hot[label] = True
            else:
                raise InvalidConfig(f"row {n}: label {label!r} is not one of the head's labels {names}")
        truth.append(hot)
    predicted = [[i in a["label_ids"] for i in range(len(names))] for a in answers]
    metrics = multi_label_metrics(predicted, truth)
    exact = sum(p == t for p, t in zip(predicted, truth, strict=True))
    return EvalReport(
        "f1_micro",
        metrics["f1_micro"],
        len(gold),
        exact,
        answers,
        metrics=metrics,
        problem_type="multi-label",
    )
