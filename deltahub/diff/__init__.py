"""Diff two adapter versions: what changed, exactly and cheaply.

    report = deltahub.diff("sentiment@1", "sentiment@2")
    report.verdict          # identical | numerically_identical | changed | different_base
    report.relative_change  # sqrt(sum_m ||dW_a - dW_b||^2) / sqrt(sum_m ||dW_a||^2)
    report.to_dict()        # the JSON of `deltahub diff --json`

Parts: `core` (opening both sides, verdict), `meta` (config, manifest, metrics,
lineage), `tensors` (raw-byte hashing, per-tensor numbers), `lora` (exact per-module
change of dW = s B A from the factors, via `deltahub.compose.lowrank`), `behavior`
(probe inputs through both versions on one base).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from deltahub.diff.core import diff
from deltahub.diff.report import (
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


class _CallableModule(types.ModuleType):
    """Importing `deltahub.diff` binds the attribute `deltahub.diff` to this module, which
    would shadow the function of the same name that `deltahub.diff(a, b)` promises; so the
    module itself calls `diff`."""

    def __call__(self, *args: Any, **kwargs: Any) -> DiffReport:
        return diff(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
