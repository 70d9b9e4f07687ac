"""Reading a classifier's logits by its problem type: single-label, regression, multi-label.

    single-label:  label = argmax_k z_k
    regression:    values = z                       (num_labels floats)
    multi-label:   p_k = sigmoid(z_k),  labels = {k : p_k >= threshold}

A trained task head records its problem type (`extra["head"]["problem_type"]`, absent for
single-label). A `...ForSequenceClassification` base has transformers' `config.problem_type`
("single_label_classification", "regression", "multi_label_classification"); when that is
None, transformers' loss reads one output as regression and more as single-label, and so
do we. A PEFT SEQ_CLS adapter (its head saved in `modules_to_save`) records none either:
its base's config says, or the caller does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deltahub.errors import InvalidConfig
from deltahub.training.data import PROBLEM_TYPES

HF_PROBLEM_TYPES = {  # transformers' config.problem_type names
    "single_label_classification": "single-label",
    "regression": "regression",
    "multi_label_classification": "multi-label",
}


def problem_type_name(name: str) -> str:
    """`name` as one of PROBLEM_TYPES; transformers' spellings are accepted too."""
    if name in PROBLEM_TYPES:
        return name
    if name in HF_PROBLEM_TYPES:
        return HF_PROBLEM_TYPES[name]
    raise InvalidConfig(f"problem type {name!r} is not one of {', '.join(PROBLEM_TYPES)}")


def config_problem_type(config: Any) -> str:
    """How a `...ForSequenceClassification` base reads its logits (transformers' rule)."""
    recorded = getattr(config, "problem_type", None)
    if recorded:
        return problem_type_name(recorded)
    return "regression" if getattr(config, "num_labels", 2) == 1 else "single-label"


def rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 6) for v in values]


@dataclass(frozen=True)
class Reading:
    """How logits become an answer: the problem type (None: the head's or config's own)
    and the multi-label threshold."""

    problem_type: str | None = None
    threshold: float = 0.5

    def answer(self, text: str, row: torch.Tensor, names: Sequence[str], problem_type: str) -> dict[str, Any]:
        """The answer for one text's logits `row` (K,), labels named by `names` (by index)."""
        kind = self.problem_type or problem_type

        def name(i: int) -> str:
            return str(names[i]) if i < len(names) else str(i)

        if kind == "regression":
            return {"input": text, "kind": "regression", "values": rounded(row)}
        if kind == "multi-label":
            probs = torch.sigmoid(row.float())  # (K,)
            on = [i for i, p in enumerate(probs.tolist()) if p >= self.threshold]
            return {
                "input": text,
                "kind": "multi-label",
                "labels": [name(i) for i in on],
                "label_ids": on,
                "probabilities": {name(i): round(float(p), 6) for i, p in enumerate(probs)},
                "threshold": self.threshold,
                "logits": rounded(row),
            }
        label = int(row.argmax())
        return {
            "input": text,
            "kind": "classification",
            "label": name(label),
            "label_id": label,
            "logits": rounded(row),
        }
