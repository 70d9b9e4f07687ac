"""Diff two adapter versions: what changed, exactly and cheaply.

    report = deltahub.diff("sentiment@1", "sentiment@2")   # or deltahub.diffing.diff
    report.verdict          # identical | numerically_identical | changed | different_base
    report.relative_change  # sqrt(sum_m ||dW_a - dW_b||^2) / sqrt(sum_m ||dW_a||^2)
    report.to_dict()        # the JSON of `deltahub diff --json`

Parts: `core` (opening both sides, verdict), `meta` (config, manifest, metrics,
lineage), `tensors` (raw-byte hashing, per-tensor numbers), `lora` (exact per-module
change of dW = s B A from the factors, via `deltahub.compose.lowrank`), `behavior`
(probe inputs through both versions on one base).
"""

from __future__ import annotations

from deltahub.diffing.core import diff
from deltahub.diffing.report import (
    VERDICTS,
    BehaviorDiff,
    DiffReport,
    FieldChange,
    ModuleDiff,
    ParentChange,
    Side,
    TensorDiff,
)

__all__ = [
    "VERDICTS",
    "BehaviorDiff",
    "DiffReport",
    "FieldChange",
    "ModuleDiff",
    "ParentChange",
    "Side",
    "TensorDiff",
    "diff",
]
