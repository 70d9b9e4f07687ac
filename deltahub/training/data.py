"""Training data: JSON Lines or CSV files into tokenized examples and a padding collator.

Tasks and the columns they read:

- `classification`: `text` and `label`. Labels may be strings or numbers; they are mapped
  to ids in sorted order of their string form (`LabelMap`), and the map is saved with the
  trained artifact so predictions can be read back as labels.
- `causal-lm`: either `text` (loss on every token) or `prompt` + `completion` (loss on the
  completion only: the prompt's positions get label -100, which cross-entropy ignores).

Files are read whole (training sets for adapters are small); their sha256 is the data
digest recorded in the artifact's manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltahub.errors import InvalidConfig, NotFound

TASKS = ("classification", "causal-lm")
IGNORE_INDEX = -100


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a `.jsonl`/`.json` (one object a line) or `.csv`/`.tsv` file."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = [dict(r) for r in reader]
    elif suffix in (".jsonl", ".json", ".ndjson"):
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidConfig(
                    f"{path}:{i} is not valid JSON ({e.msg}); give one JSON object per line"
                ) from None
            if not isinstance(row, dict):
                raise InvalidConfig(f"{path}:{i} is a {type(row).__name__}, not a JSON object")
            rows.append(row)
    else:
        raise InvalidConfig(f"data file {path} must end in .jsonl, .json, .csv or .tsv")
    if not rows:
        raise InvalidConfig(f"data file {path} has no examples")
    return rows


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _need(rows: list[dict[str, Any]], columns: tuple[str, ...], where: str, hint: str) -> None:
    for i, row in enumerate(rows, 1):
        missing = [c for c in columns if row.get(c) is None or row.get(c) == ""]
        if missing:
            have = ", ".join(sorted(row)) or "none"
            raise InvalidConfig(f"{where} row {i} lacks column {missing[0]!r} (it has: {have}); {hint}")


@dataclass
class LabelMap:
    """Label strings <-> ids; ids follow the sorted label strings."""

    labels: list[str]

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> LabelMap:
        return cls(sorted({str(r["label"]) for r in rows}))

    def id(self, label: Any, where: str = "data") -> int:
        try:
            return self.labels.index(str(label))
        except ValueError:
            raise InvalidConfig(
                f"label {label!r} in {where} does not occur in the training data (labels: {self.labels})"
            ) from None


@dataclass
class Dataset:
    """Tokenized examples: each a dict of `input_ids`, `attention_mask` and `labels`."""

    features: list[dict[str, Any]]
    path: str
    digest: str
    label_map: LabelMap | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.features[i]

    def describe(self) -> dict[str, Any]:
        return {"path": Path(self.path).name, "digest": self.digest, "examples": len(self.features)}


def load_dataset(
    path: str | Path,
    task: str,
    tokenizer: Any,
    max_length: int = 128,
    label_map: LabelMap | None = None,
) -> Dataset:
    """Read and tokenize one file for `task`; pass the training set's `label_map` for eval data."""
    if task not in TASKS:
        raise InvalidConfig(f"task {task!r} is not one of {', '.join(TASKS)}")
    rows = read_records(path)
    where = str(path)
    features: list[dict[str, Any]] = []
    if task == "classification":
        _need(rows, ("text", "label"), where, "classification needs 'text' and 'label' columns")
        if label_map is None:
            label_map = LabelMap.from_rows(rows)
            if len(label_map.labels) < 2:
                raise InvalidConfig(
                    f"{where} has one label {label_map.labels}; classification needs two or more"
                )
        for row in rows:
            enc = tokenizer(str(row["text"]), truncation=True, max_length=max_length)
            features.append(
                {
                    "input_ids": list(enc["input_ids"]),
                    "attention_mask": list(enc["attention_mask"]),
                    "labels": label_map.id(row["label"], where),
                }
            )
        return Dataset(features, str(path), file_digest(path), label_map)
    if all(r.get("text") not in (None, "") for r in rows):
        mode = "text"
    else:
        _need(
            rows,
            ("prompt", "completion"),
            where,
            "causal-lm needs a 'text' column, or 'prompt' and 'completion'",
        )
        mode = "prompt-completion"
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for row in rows:
        if mode == "text":
            ids = list(tokenizer(str(row["text"]))["input_ids"]) + eos
            labels = list(ids)
        else:
            prompt = list(tokenizer(str(row["prompt"]))["input_ids"])
            completion = list(tokenizer(str(row["completion"]), add_special_tokens=False)["input_ids"]) + eos
            ids = prompt + completion
            labels = [IGNORE_INDEX] * len(prompt) + completion
        ids, labels = ids[:max_length], labels[:max_length]
        if all(t == IGNORE_INDEX for t in labels[1:]):
            continue  # the prompt alone fills max_length: nothing to learn from this row
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not features:
        raise InvalidConfig(f"{where}: every completion was cut off by max_length={max_length}; raise it")
    return Dataset(features, str(path), file_digest(path), None, {"format": mode})


class Collator:
    """Right-pads a list of features into tensors (labels padded with -100 for causal-lm)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, mask, labels = [], [], []
        for f in features:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            mask.append(f["attention_mask"] + [0] * pad)
            if isinstance(f["labels"], list):
                labels.append(f["labels"] + [IGNORE_INDEX] * pad)
            else:
                labels.append(f["labels"])
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
