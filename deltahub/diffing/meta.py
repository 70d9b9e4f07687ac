"""Diff of everything but the weights: adapter config, manifest, metrics, lineage."""

from __future__ import annotations

from typing import Any

from deltahub.artifact import Manifest
from deltahub.diffing.report import FieldChange, ParentChange

# Config fields that record how or where a file was written, not what the adapter computes.
NON_SEMANTIC_CONFIG = frozenset(
    {"peft_version", "inference_mode", "auto_mapping", "base_model_name_or_path", "revision", "lora_dropout"}
)
# LoRA config fields whose whole effect is on dW = s B A, which the module diff measures.
LORA_MATH_CONFIG = frozenset(
    {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules"}
)
# Manifest fields that differ between any two publishes and say nothing about the adapter.
NOISE_MANIFEST = frozenset({"created", "format"})


def _normalize(key: str, value: Any) -> Any:
    # PEFT writes target_modules from a set: its order carries no meaning.
    if key in ("target_modules", "modules_to_save") and isinstance(value, list):
        return sorted(value)
    return value


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def config_changes(ca: dict[str, Any], cb: dict[str, Any]) -> list[FieldChange]:
    """Changed top-level config fields (a missing field reads as None)."""
    out = []
    for key in sorted(set(ca) | set(cb)):
        va, vb = _normalize(key, ca.get(key)), _normalize(key, cb.get(key))
        if va != vb:
            change = vb - va if _number(va) and _number(vb) else None
            out.append(FieldChange(key, va, vb, change))
    return out


def config_semantics_equal(changes: list[FieldChange], lora: bool) -> bool:
    """Do the config changes leave the computation alone (beyond what dW measures for LoRA)?"""
    allowed = NON_SEMANTIC_CONFIG | (LORA_MATH_CONFIG if lora else frozenset())
    return all(c.field in allowed for c in changes)


def manifest_changes(ma: Manifest | None, mb: Manifest | None) -> tuple[list[FieldChange], list[FieldChange]]:
    """(changed manifest fields, metrics side by side with b - a)."""
    da = ma.to_dict() if ma is not None else {}
    db = mb.to_dict() if mb is not None else {}
    fields = []
    if (ma is None) != (mb is None):
        # A bare PEFT directory has no manifest: field-by-field it would all read as changed.
        fields.append(FieldChange("manifest", "present" if ma else None, "present" if mb else None))
        da, db = {"metrics": da.get("metrics")}, {"metrics": db.get("metrics")}
    for key in sorted((set(da) | set(db)) - NOISE_MANIFEST - {"metrics", "parents"}):
        if da.get(key) != db.get(key):
            fields.append(FieldChange(key, da.get(key), db.get(key)))
    metrics_a: dict[str, float] = da.get("metrics") or {}
    metrics_b: dict[str, float] = db.get("metrics") or {}
    metrics = []
    for key in sorted(set(metrics_a) | set(metrics_b)):
        va, vb = metrics_a.get(key), metrics_b.get(key)
        if va != vb:
            metrics.append(FieldChange(key, va, vb, vb - va if va is not None and vb is not None else None))
    return fields, metrics


def parent_changes(ma: Manifest | None, mb: Manifest | None) -> list[ParentChange]:
    """Lineage compared by digest; entries matched by (adapter name, role).

    For a fusion these are its constituents: `changed` means the same constituent
    adapter is pinned at different bytes.
    """
    pa = list(ma.parents) if ma is not None else []
    pb = list(mb.parents) if mb is not None else []

    def key(p: Any) -> tuple[str, str]:
        return (p.ref.split("@", 1)[0], p.role)

    by_key_b: dict[tuple[str, str], list[Any]] = {}
    for p in pb:
        by_key_b.setdefault(key(p), []).append(p)
    out: list[ParentChange] = []
    for p in pa:
        candidates = by_key_b.get(key(p)) or []
        if candidates:
            q = candidates.pop(0)
            status = "same" if q.digest == p.digest else "changed"
            out.append(ParentChange(key(p)[0], p.role, status, p.ref, q.ref, p.digest, q.digest))
        else:
            out.append(ParentChange(key(p)[0], p.role, "removed", p.ref, None, p.digest, None))
    for rest in by_key_b.values():
        for q in rest:
            out.append(ParentChange(key(q)[0], q.role, "added", None, q.ref, None, q.digest))
    return out
