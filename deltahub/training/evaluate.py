"""Batch inputs and scoring: read rows from a file (or stdin), score a labelled file.

`read_rows(source)` reads what `deltahub run --input-file` and `deltahub eval --data`
take: JSON Lines (one object a line, or one JSON string a line), CSV with a header
(`.csv`), or plain text (one input a line); blank lines are skipped. `"-"` reads stdin.

`evaluate(loaded, rows)` predicts every row in batches and compares with its label:
accuracy for classification (the label matches the predicted label's name, or its index
when the label is an integer), exact match for generation (stripped text). An encoder
without a head has nothing to score and is refused.
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
    """What `evaluate` measured: the metric, how many rows, and each row's answer."""

    metric: str
    value: float
    rows: int
    correct: int
    answers: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "rows": self.rows, "correct": self.correct}


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
) -> EvalReport:
    """Score `loaded` (`inference.load`'s result) on labelled `rows`."""
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
    )
    kind = answers[0]["kind"]
    if kind == "embedding":
        raise InvalidConfig(
            "this base and adapter give embeddings, not labels: eval scores a classifier "
            "(an adapter trained for classification, or a ...ForSequenceClassification base) or a causal LM"
        )
    correct = sum(_matches(a, row[label_column]) for a, row in zip(answers, rows, strict=True))
    metric = "exact_match" if kind == "generation" else "accuracy"
    return EvalReport(metric, correct / len(rows), len(rows), correct, answers)
