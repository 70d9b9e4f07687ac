"""`diff(a, b)`: open both sides, compare, and decide the verdict.

Verdicts, in order of precedence:
  different_base         the base fingerprints (or, lacking those, base model ids) differ,
                         or a module's dW has another shape: reported first and loudly;
  identical              same version digest, or every tensor byte-identical and the
                         configs equal (manifest-only changes do not count);
  numerically_identical  the computation is the same within `tolerance`: for LoRA, every
                         module's ||dW_a - dW_b|| / ||dW_a|| <= tolerance (factors may differ,
                         e.g. B*2 with A/2); for other tensors, each relative change;
  changed                anything else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from deltahub import artifact as af
from deltahub.diffing import lora, meta
from deltahub.diffing.report import DiffReport, Side
from deltahub.diffing.tensors import Weights, compare_tensors, serial_torch, tensor_sums
from deltahub.errors import InvalidConfig, InvalidRef, NotFound

Source = Union[str, "os.PathLike[str]", af.Artifact, Any]  # Any: a registry `Version`


@dataclass
class Opened:
    """One side, opened: its artifact, identity, the blob digest of its weights, and where
    it came from (a registry ref or a directory), so a model can load it again."""

    artifact: af.Artifact
    side: Side
    weights_blob: str | None
    ref: str | None = None
    directory: Path | None = None


def _side(artifact: af.Artifact, label: str, digest: str) -> Side:
    m = artifact.manifest
    base_model = (m.base_model if m else None) or artifact.config.get("base_model_name_or_path") or None
    return Side(label, digest, artifact.method, base_model, m.base_fingerprint if m else None)


def _open_artifact(artifact: af.Artifact, label: str | None = None) -> Opened:
    from deltahub.registry.store import sha256_file

    files = {name: sha256_file(path) for name, path in artifact.files.items()}
    if label is None:
        m = artifact.manifest
        label = f"{m.name}@{m.version}" if m and m.version else str(artifact.weights_path.parent)
    parents = {p.parent for p in artifact.files.values()}
    directory = parents.pop() if len(parents) == 1 else None
    side = _side(artifact, label, af.artifact_digest(files))
    return Opened(artifact, side, files[af.WEIGHTS_FILE], directory=directory)


def _open(source: Source, registry: Callable[[], Any]) -> Opened:
    from deltahub.registry import Version

    if isinstance(source, af.Artifact):
        return _open_artifact(source)
    if isinstance(source, Version):
        return _open_version(registry(), source)
    if isinstance(source, os.PathLike):
        return _open_artifact(af.load_dir(source), str(source))
    if not isinstance(source, str):
        raise InvalidConfig(f"cannot diff {source!r}: give a registry ref, a directory or an Artifact")
    try:
        reg = registry()
        return _open_version(reg, reg.resolve(source))
    except (InvalidRef, NotFound) as e:
        # Not a ref the registry knows: a directory of that name is the other reading.
        if Path(source).is_dir():
            return _open_artifact(af.load_dir(source), source)
        if isinstance(e, InvalidRef):
            raise InvalidRef(
                f"{source!r} is neither a registry ref ([ns/]name[@version|@tag|@sha256:digest]) "
                "nor an artifact directory"
            ) from None
        raise


def _open_version(reg: Any, version: Any) -> Opened:
    artifact = reg.open(version)
    side = _side_from_version(artifact, version)
    return Opened(artifact, side, version.files.get(af.WEIGHTS_FILE), ref=version.ref)


def _side_from_version(artifact: af.Artifact, version: Any) -> Side:
    side = _side(artifact, version.ref, version.digest)
    return Side(side.label, side.digest, version.method, version.base_model or side.base_model,
                version.base_fingerprint)  # fmt: skip


def _base_difference(a: Side, b: Side) -> str | None:
    if a.base_fingerprint and b.base_fingerprint:
        if a.base_fingerprint != b.base_fingerprint:
            return f"base fingerprints differ: {a.base_fingerprint[:19]}... vs {b.base_fingerprint[:19]}..."
        return None
    if a.base_model and b.base_model and a.base_model != b.base_model:
        return f"base models differ: {a.base_model} vs {b.base_model}"
    return None


def diff(
    a: Source,
    b: Source,
    registry: Any = None,
    top: int | None = None,
    tolerance: float = 1e-6,
    *,
    base: str | os.PathLike[str] | None = None,
    probe: str | os.PathLike[str] | None = None,
) -> DiffReport:
    """Compare two adapter versions exactly: config, manifest, tensors and, for LoRA, dW.

    `a` and `b` are registry refs (`name@2`, `ns/name@sha256:ab12...`), `Version`s,
    artifact directories or `Artifact`s; `registry` defaults to the local one. `top`
    limits the modules in `report.to_dict()` (all are kept in `report.modules`). With
    `base` and `probe` (a text file, one input per line), both versions also run on the
    probe inputs over that base (`report.behavior`).
    """
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and math.isfinite(tolerance)):
        raise InvalidConfig(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if top is not None and (not isinstance(top, int) or top < 1):
        raise InvalidConfig(f"top must be a positive integer, got {top!r}")
    if (base is None) != (probe is None):
        raise InvalidConfig("give both base and probe (a base model and a file of probe inputs), or neither")

    owned: list[Any] = []

    def get_registry() -> Any:
        if registry is not None:
            return registry
        if not owned:
            from deltahub.registry import Registry

            owned.append(Registry())
        return owned[0]

    try:
        oa, ob = _open(a, get_registry), _open(b, get_registry)
        report = compare(oa, ob, tolerance)
        report.top = top
        if base is not None and probe is not None:
            from deltahub.diffing.behavior import behavior

            report.behavior = behavior(oa, ob, base, probe, get_registry)
    finally:
        for reg in owned:
            reg.close()
    return report


def compare(oa: Opened, ob: Opened, tolerance: float) -> DiffReport:
    """The report for two opened sides (everything but behavior)."""
    with serial_torch():
        return _compare(oa, ob, tolerance)


def _compare(oa: Opened, ob: Opened, tolerance: float) -> DiffReport:
    art_a, art_b = oa.artifact, ob.artifact
    report = DiffReport(
        a=oa.side,
        b=ob.side,
        verdict="changed",
        relative_change=None,
        tolerance=tolerance,
        different_base=_base_difference(oa.side, ob.side),
    )
    report.config = meta.config_changes(art_a.config, art_b.config)
    report.manifest, report.metrics = meta.manifest_changes(art_a.manifest, art_b.manifest)
    report.parents = meta.parent_changes(art_a.manifest, art_b.manifest)
    if oa.side.digest != ob.side.digest:
        report.manifest.insert(0, meta.FieldChange("digest", oa.side.digest, ob.side.digest))

    wa = Weights(art_a.weights_path, art_a.tensors)
    wb = Weights(art_b.weights_path, art_b.tensors)
    same_file = oa.weights_blob is not None and oa.weights_blob == ob.weights_blob
    is_lora = art_a.method == art_b.method == "lora"
    if is_lora:
        ma = lora.lora_modules(art_a.config, art_a.tensors)
        mb = lora.lora_modules(art_b.config, art_b.tensors)
        factors = lora.factor_keys(ma) | lora.factor_keys(mb)
        report.tensors = compare_tensors(wa, wb, same_file)
        unchanged = set(report.tensor_names("unchanged"))
        report.modules = lora.compare_modules(wa, ma, wb, mb, unchanged, tolerance)
        num = sum(m.diff_norm**2 for m in report.modules)
        den = sum(m.norm_a**2 for m in report.modules if m.norm_a is not None)
        if art_a.config.get("use_dora") or art_b.config.get("use_dora"):
            report.notes.append(
                "DoRA: modules compare the directional update s B A; the magnitude vectors "
                "are compared as tensors"
            )
        others = [t for t in report.tensors if t.name not in factors]
    else:
        report.tensors = compare_tensors(wa, wb, same_file)
        num, den = tensor_sums(wa, wb, report.tensors)
        others = report.tensors
        if art_a.method != art_b.method:
            report.notes.append(
                f"methods differ ({art_a.method} vs {art_b.method}): tensors compared by name"
            )
    report.relative_change = math.sqrt(num) / math.sqrt(den) if den > 0 else (0.0 if num == 0 else math.inf)

    reshaped = [m.module for m in report.modules if m.status == "reshaped"]
    if reshaped and report.different_base is None:
        report.different_base = f"dW of {reshaped[0]} has another shape on each side: the bases differ"
    report.verdict = _verdict(report, is_lora, others, art_a.method == art_b.method)
    return report


def _verdict(report: DiffReport, is_lora: bool, others: list[Any], same_method: bool) -> str:
    if report.different_base:
        return "different_base"
    if report.a.digest == report.b.digest:
        return "identical"
    if not same_method:
        return "changed"
    statuses = {t.status for t in report.tensors}
    if statuses <= {"unchanged"} and not report.config:
        return "identical"
    if not meta.config_semantics_equal(report.config, is_lora):
        return "changed"
    if any(t.status in ("added", "removed", "reshaped") for t in others):
        return "changed"
    if any(t.status == "changed" and not (t.relative_change or 0.0) <= report.tolerance for t in others):
        return "changed"
    if is_lora and any(m.status != "unchanged" for m in report.modules):
        return "changed"
    return "numerically_identical"
