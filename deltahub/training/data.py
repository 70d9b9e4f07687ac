"""Training data: local files or a `datasets.Dataset` into tokenized examples, and a padding collator.

Files are read with Hugging Face `datasets` (a well-kept loader: JSON Lines / JSON, CSV /
TSV, Parquet), from local paths only: `HF_DATASETS_OFFLINE` is set before it is imported
and the builders' cache is a temporary directory removed after reading. A
`datasets.Dataset` may be passed as is in the Python API.

Tasks and the columns they read (names changed with `Columns`):

- `classification`: `text` (and `text_pair` for sentence pairs, given a pair column) and
  `label`. Labels may be strings or numbers; they are mapped to ids in sorted order of
  their string form (`LabelMap`), and the map is saved with the trained artifact so
  predictions can be read back as labels. `problem_type="regression"`: the label is a
  float; `"multi-label"`: the label is a list of labels (or a comma-separated string),
  turned into a multi-hot vector over the sorted labels.
- `causal-lm`: either `text` (loss on every token) or `prompt` + `completion` (loss on the
  completion only: the prompt's positions get label -100, which cross-entropy ignores).

A file's sha256 (a `Dataset`'s fingerprint) is the data digest recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltahub.errors import InvalidConfig, NotFound

TASKS = ("classification", "causal-lm")
PROBLEM_TYPES = ("single-label", "regression", "multi-label")
IGNORE_INDEX = -100
_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


@dataclass
class Columns:
    """Which columns hold the text, the second text of a pair, and the label."""

    text: str = "text"
    label: str = "label"
    text_pair: str | None = None


def _hf_datasets() -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, never the Hub
    import datasets

    return datasets


def is_hf_dataset(obj: Any) -> bool:
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "to_list")


def _json_error(path: Path) -> InvalidConfig | None:
    """The first line of a JSON Lines file that is not one JSON object (for a clear error)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return InvalidConfig(f"{path}:{i} is not valid JSON ({e.msg}); give one JSON object per line")
            if not isinstance(row, dict):
                return InvalidConfig(f"{path}:{i} is a {type(row).__name__}, not a JSON object")
    return None


def read_records(source: Any) -> list[dict[str, Any]]:
    """Rows of a `.jsonl`/`.json`, `.csv`/`.tsv` or `.parquet` file, or of a `datasets.Dataset`."""
    if is_hf_dataset(source):
        rows = list(source.to_list())
        if not rows:
            raise InvalidConfig("the dataset has no examples")
        return rows
    path = Path(source)
    if not path.is_file():
        raise NotFound(f"data file {path} does not exist")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InvalidConfig(f"data file {path} must end in {', '.join(_BUILDERS)}")
    if path.stat().st_size == 0 or (builder != "parquet" and not path.read_bytes().strip()):
        raise InvalidConfig(f"data file {path} has no examples")
    hf = _hf_datasets()
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    with tempfile.TemporaryDirectory(prefix="deltahub-data-") as cache:
        try:
            with _quiet(hf):
                ds = hf.load_dataset(
                    builder,
                    data_files=str(path),
                    split="train",
                    cache_dir=cache,
                    keep_in_memory=True,
                    **options,
                )
        except Exception as e:  # pyarrow / pandas parse errors: one line naming the file
            raise (_json_error(path) if builder == "json" else None) or InvalidConfig(
                f"cannot read {path} as {builder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None
        rows = list(ds.to_list())
    if not rows:
        raise InvalidConfig(f"data file {path} has no examples")
    return rows


@contextlib.contextmanager
def _quiet(hf: Any) -> Any:
    """No progress bars or info logs from `datasets` while reading a small local file."""
    was = hf.utils.is_progress_bar_enabled()
    hf.utils.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            hf.utils.enable_progress_bars()


def describe_source(source: Any) -> tuple[str, str]:
    """(name, digest) of a data file or a `datasets.Dataset`."""
    if is_hf_dataset(source):
        name = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
        return str(name), "datasets:" + str(getattr(source, "_fingerprint", "unknown"))
    return str(source), file_digest(source)


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
            have = ", ".join(sorted(k for k, v in row.items() if v is not None)) or "none"
            raise InvalidConfig(f"{where} row {i} lacks column {missing[0]!r} (it has: {have}); {hint}")


@dataclass
class LabelMap:
    """Label strings <-> ids; ids follow the sorted label strings."""

    labels: list[str]

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], column: str = "label", multi: bool = False) -> LabelMap:
        if multi:
            return cls(sorted({str(v) for r in rows for v in label_list(r[column])}))
        return cls(sorted({str(r[column]) for r in rows}))

    def id(self, label: Any, where: str = "data") -> int:
        try:
            return self.labels.index(str(label))
        except ValueError:
            raise InvalidConfig(
                f"label {label!r} in {where} does not occur in the training data (labels: {self.labels})"
            ) from None


def label_list(value: Any) -> list[Any]:
    """A multi-label cell: a list, or a comma-separated string."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [v.strip() for v in str(value).split(",") if v.strip()]


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
        """What the manifest records: the file's name (never its directory), digest, size."""
        return {"path": Path(self.path).name, "digest": self.digest, "examples": len(self.features)}


def load_dataset(
    source: Any,
    task: str,
    tokenizer: Any,
    max_length: int = 128,
    label_map: LabelMap | None = None,
    columns: Columns | None = None,
    problem_type: str = "single-label",
) -> Dataset:
    """Read and tokenize one file (or `datasets.Dataset`) for `task`; pass the training set's
    `label_map` for eval data."""
    if task not in TASKS:
        raise InvalidConfig(f"task {task!r} is not one of {', '.join(TASKS)}")
    if problem_type not in PROBLEM_TYPES:
        raise InvalidConfig(f"problem type {problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
    cols = columns or Columns()
    rows = read_records(source)
    where, digest = describe_source(source)
    features: list[dict[str, Any]] = []
    if task == "classification":
        wanted = (cols.text, *((cols.text_pair,) if cols.text_pair else ()), cols.label)
        _need(rows, wanted, where, f"classification reads columns {', '.join(map(repr, wanted))}")
        multi = problem_type == "multi-label"
        if problem_type == "regression":
            label_map = LabelMap([])
        elif label_map is None:
            label_map = LabelMap.from_rows(rows, cols.label, multi)
            if len(label_map.labels) < 2:
                raise InvalidConfig(
                    f"{where} has one label {label_map.labels}; classification needs two or more"
                )
        for i, row in enumerate(rows, 1):
            pair = (str(row[cols.text_pair]),) if cols.text_pair else ()
            enc = tokenizer(str(row[cols.text]), *pair, truncation=True, max_length=max_length)
            features.append(
                {
                    "input_ids": list(enc["input_ids"]),
                    "attention_mask": list(enc["attention_mask"]),
                    "labels": _target(row[cols.label], problem_type, label_map, f"{where} row {i}"),
                }
            )
        return Dataset(features, where, digest, label_map, {"problem_type": problem_type})
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
    return Dataset(features, where, digest, None, {"format": mode})


def _target(value: Any, problem_type: str, label_map: LabelMap, where: str) -> Any:
    """A label as the loss reads it: a class id, a float, or a multi-hot tuple."""
    if problem_type == "regression":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InvalidConfig(f"{where}: label {value!r} is not a number (regression)") from None
    if problem_type == "multi-label":
        hot = [0.0] * len(label_map.labels)
        for v in label_list(value):
            hot[label_map.id(v, where)] = 1.0
        return tuple(hot)  # a tuple: the collator pads lists (token labels), not these
    return label_map.id(value, where)


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
        floats = isinstance(labels[0], (float, tuple))  # regression, multi-label
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.float32 if floats else torch.long),
        }
