"""The result of a diff: plain dataclasses and their JSON form (`DiffReport.to_dict`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

VERDICTS = ("identical", "numerically_identical", "changed", "different_base")
TENSOR_STATUSES = ("added", "removed", "changed", "unchanged", "reshaped")


def _finite(x: float | None) -> float | None:
    """JSON has no inf/nan: an undefined ratio is null."""
    return None if x is None or not math.isfinite(x) else x


@dataclass(frozen=True)
class Side:
    """Who one side of the diff is."""

    label: str  # the registry ref, or the directory
    digest: str
    method: str
    base_model: str | None
    base_fingerprint: str | None


@dataclass
class ModuleDiff:
    """The change of one LoRA module's effective update dW = s B A (exact, from the factors).

    status: `changed`, `unchanged` (relative change within tolerance), `added` (only in b),
    `removed` (only in a) or `reshaped` (dW has a different shape: a different base).
    """

    module: str
    status: str
    diff_norm: float  # ||dW_a - dW_b||_F
    relative_change: float | None  # diff_norm / ||dW_a||_F; None when undefined
    cosine: float | None
    subspace_similarity: float | None
    norm_a: float | None
    norm_b: float | None
    effective_rank_a: float | None
    effective_rank_b: float | None
    rank_a: int | None
    rank_b: int | None
    scaling_a: float | None
    scaling_b: float | None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("relative_change", "cosine", "subspace_similarity"):
            d[key] = _finite(d[key])
        return d

    def sort_key(self) -> tuple[float, float, str]:
        # Added/removed modules changed entirely: they sort first.
        rel = math.inf if self.relative_change is None else self.relative_change
        return (-rel, -self.diff_norm, self.module)


@dataclass
class TensorDiff:
    """One tensor name: its status and, when changed, how much (numbers from float64)."""

    name: str
    status: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    dtype_a: str | None = None
    dtype_b: str | None = None
    relative_change: float | None = None  # ||b - a|| / ||a||
    cosine: float | None = None
    diff_norm: float | None = None
    norm_a: float | None = None
    norm_b: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["relative_change"] = _finite(d["relative_change"])
        return d


@dataclass(frozen=True)
class FieldChange:
    """A config, manifest or metric field whose value differs; `change` = b - a for numbers."""

    field: str
    a: Any
    b: Any
    change: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"a": self.a, "b": self.b}
        if self.change is not None:
            d["change"] = self.change
        return d


@dataclass(frozen=True)
class ParentChange:
    """One lineage entry (a fusion constituent, a merge source), matched by name and role."""

    name: str
    role: str
    status: str  # same | changed | added | removed
    ref_a: str | None
    ref_b: str | None
    digest_a: str | None
    digest_b: str | None


@dataclass
class BehaviorDiff:
    """How differently the two versions behave on probe inputs over one base model."""

    kind: str  # "kl" (next-token / class distributions) or "hidden_cosine" (encoders)
    inputs: int  # probe texts
    positions: int  # predictions compared (tokens for causal LMs, rows for classifiers)
    mean_kl: float | None  # mean KL(p_a || p_b), nats
    mean_cosine: float | None  # mean cosine of last hidden states
    top1_differ: int | None  # predictions whose arg-max differs


@dataclass
class DiffReport:
    """Everything `deltahub.diff` found. `modules` is sorted by change, largest first."""

    a: Side
    b: Side
    verdict: str
    relative_change: float | None
    tolerance: float
    different_base: str | None  # why the bases differ, or None
    modules: list[ModuleDiff] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)
    manifest: list[FieldChange] = field(default_factory=list)
    config: list[FieldChange] = field(default_factory=list)
    metrics: list[FieldChange] = field(default_factory=list)
    parents: list[ParentChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    behavior: BehaviorDiff | None = None
    top: int | None = None

    def tensor_names(self, status: str) -> list[str]:
        return [t.name for t in self.tensors if t.status == status]

    @property
    def changed_modules(self) -> list[ModuleDiff]:
        return [m for m in self.modules if m.status != "unchanged"]

    def top_modules(self, n: int | None = None) -> list[ModuleDiff]:
        n = self.top if n is None else n
        return self.modules if n is None else self.modules[:n]

    def to_dict(self) -> dict[str, Any]:
        """One JSON-ready object; `modules` holds the top `self.top` (all when None)."""
        return {
            "verdict": self.verdict,
            "relative_change": _finite(self.relative_change),
            "tolerance": self.tolerance,
            "different_base": self.different_base,
            "a": asdict(self.a),
            "b": asdict(self.b),
            "modules": [m.to_dict() for m in self.top_modules()],
            "modules_total": len(self.modules),
            "modules_changed": len(self.changed_modules),
            "tensors": {s: self.tensor_names(s) for s in TENSOR_STATUSES},
            "tensor_changes": [t.to_dict() for t in self.tensors if t.status in ("changed", "reshaped")],
            "manifest": {c.field: c.to_dict() for c in self.manifest},
            "config": {c.field: c.to_dict() for c in self.config},
            "metrics": {c.field: c.to_dict() for c in self.metrics},
            "parents": [asdict(p) for p in self.parents],
            "notes": list(self.notes),
            "behavior": asdict(self.behavior) if self.behavior is not None else None,
        }
