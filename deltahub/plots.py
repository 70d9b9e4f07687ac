"""Pictures of adapters: a diff per layer, a fusion's attention, a metric over versions.

Three pictures, each from numbers deltahub already has:

    diff_series(report)          per module of a LoRA diff, in model order: relative change
                                 ||dW_a - dW_b|| / ||dW_a|| and subspace similarity
    attention_matrix(manifest)   a fusion's mean attention per fused site (rows) and
                                 constituent (columns), as `fuse` recorded it
    metric_series(versions)      one metric over an adapter's versions, in publish order

Each has two renderings that draw the same numbers: a matplotlib `Figure` (the CLI's
`--plot out.png|svg`: `diff_figure`, `attention_figure`, `metric_figure`, then `save`),
and an SVG geometry (`svg_bars`, `svg_line`, `svg_heatmap`: coordinates only, drawn by
the hub's templates, which escape every label). matplotlib is optional (`pip install
'deltahub[plots]'`), imported only when a figure is made, and never through pyplot: a
bare `Figure` renders with the Agg (PNG) or SVG backend, so no display is ever needed.
Torch-free.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltahub.errors import InvalidConfig, Unsupported

PLOT_SUFFIXES = (".png", ".svg")
MISSING_MATPLOTLIB = "plots need matplotlib: pip install 'deltahub[plots]' (or pip install matplotlib)"


# ----------------------------------------------------------------------------- the numbers


def _natural(text: str) -> list[Any]:
    """Sort key putting layer.2 before layer.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


@dataclass
class DiffSeries:
    modules: list[str]
    relative_change: list[float]
    subspace_similarity: list[float | None]
    title: str


def diff_series(report: Any) -> DiffSeries:
    """Per module of a diff (a `DiffReport`), in model order: the report's own numbers.

    Modules whose relative change is undefined (added, removed, reshaped) are left out:
    they changed entirely, and the table says so.
    """
    rows = sorted(
        (m for m in report.modules if m.relative_change is not None and math.isfinite(m.relative_change)),
        key=lambda m: _natural(m.module),
    )
    return DiffSeries(
        modules=[m.module for m in rows],
        relative_change=[float(m.relative_change) for m in rows],
        subspace_similarity=[
            None if m.subspace_similarity is None else float(m.subspace_similarity) for m in rows
        ],
        title=f"{report.a.label} -> {report.b.label}",
    )


@dataclass
class AttentionMatrix:
    sites: list[str]
    constituents: list[str]
    values: list[list[float]]  # (sites, constituents); NaN where a site did not fuse one


def attention_matrix(fusion: dict[str, Any]) -> AttentionMatrix:
    """A fusion's attention from its manifest's `extra["fusion"]`.

    Per site when `fuse` recorded it (`attention_per_site`); else one row, the mean over
    sites (`attention`), which is all older fusions carry.
    """
    names = [c.get("name") for c in fusion.get("constituents", []) if isinstance(c, dict)]
    per_site = fusion.get("attention_per_site") or {}
    overall = fusion.get("attention") or {}
    for row in [overall, *per_site.values()]:
        names += [n for n in row if n not in names]
    names = [str(n) for n in names if n is not None]
    rows = dict(per_site) if per_site else ({"mean over sites": overall} if overall else {})
    sites = sorted(rows, key=_natural)
    values = [[_number(rows[s].get(n)) for n in names] for s in sites]
    return AttentionMatrix(sites, names, values)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


@dataclass
class MetricSeries:
    metric: str | None
    versions: list[str]
    values: list[float]
    available: list[str]


def metric_series(versions: list[Any], metric: str | None = None) -> MetricSeries:
    """One metric over `versions` (in the order given); versions without it are left out.

    `metric` None picks the one most versions have (ties: alphabetical).
    """
    counts = Counter(k for v in versions for k in v.metrics)
    available = sorted(counts)
    if metric is None and counts:
        metric = min(counts, key=lambda k: (-counts[k], k))
    if metric is not None and metric not in counts and versions:
        raise InvalidConfig(
            f"no version has the metric {metric!r}; these do: {', '.join(available) or 'none'}"
        )
    rows = [(v.version, float(v.metrics[metric])) for v in versions if metric in v.metrics]
    return MetricSeries(metric, [r[0] for r in rows], [r[1] for r in rows], available)


# ----------------------------------------------------------------------------- matplotlib


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise Unsupported(MISSING_MATPLOTLIB) from None
    return Figure(figsize=(width, height), layout="constrained")


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def diff_figure(report: Any) -> Any:
    """Two panels over the modules: relative change (bars), subspace similarity (bars, 0..1)."""
    s = diff_series(report)
    fig = _figure(max(6.0, 0.35 * len(s.modules) + 2), 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True)
    x = list(range(len(s.modules)))
    top.bar(x, s.relative_change, color="#c2410c", label="relative change")
    top.set_ylabel("relative change of dW")
    top.set_title(_short(s.title, 90), fontsize=10)
    sim = [math.nan if v is None else v for v in s.subspace_similarity]
    bottom.bar(x, sim, color="#1d4ed8", label="subspace similarity")
    bottom.set_ylabel("subspace similarity")
    bottom.set_ylim(0, 1.05)
    bottom.set_xticks(x, [_short(m, 40) for m in s.modules], rotation=90, fontsize=7)
    if not s.modules:
        top.text(0.5, 0.5, "no per-module numbers (not a LoRA diff)", ha="center", transform=top.transAxes)
    return fig


def attention_figure(matrix: AttentionMatrix, title: str = "") -> Any:
    """Heatmap: fused sites (rows) x constituents (columns), each cell its mean attention."""
    fig = _figure(max(4.0, 1.6 * len(matrix.constituents) + 3), max(2.5, 0.3 * len(matrix.sites) + 1.5))
    ax = fig.subplots()
    image = ax.imshow(matrix.values or [[math.nan]], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(matrix.constituents)), [_short(c, 30) for c in matrix.constituents])
    ax.set_yticks(range(len(matrix.sites)), [_short(s, 48) for s in matrix.sites], fontsize=7)
    ax.set_xlabel("constituent")
    ax.set_ylabel("fused site (layer)")
    if title:
        ax.set_title(_short(title, 80), fontsize=10)
    for i, row in enumerate(matrix.values):
        for j, value in enumerate(row):
            if math.isfinite(value) and len(matrix.sites) <= 48:
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="mean attention")
    return fig


def metric_figure(series: MetricSeries, title: str = "") -> Any:
    """A metric over versions: one point per version, joined in publish order."""
    fig = _figure(max(4.0, 0.5 * len(series.versions) + 2), 3.5)
    ax = fig.subplots()
    x = list(range(len(series.versions)))
    ax.plot(x, series.values, marker="o", color="#047857")
    ax.set_xticks(x, series.versions)
    ax.set_xlabel("version")
    ax.set_ylabel(series.metric or "metric")
    if title:
        ax.set_title(_short(title, 80), fontsize=10)
    return fig


def save(fig: Any, path: Path | str) -> Path:
    """Write `fig` as PNG or SVG (by the suffix of `path`)."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise InvalidConfig(f"--plot {path}: the file name must end in .png or .svg")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=path.suffix.lower()[1:], dpi=120)
    return path


# ----------------------------------------------------------------------------- SVG geometry


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    label: str
    value: float | None


def svg_bars(
    labels: list[str],
    values: list[float | None],
    *,
    width: int = 640,
    height: int = 180,
    vmax: float | None = None,
) -> dict[str, Any]:
    """Bars for an inline SVG chart: coordinates in a width x height box (labels stay text)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    top = vmax if vmax is not None else (max(finite) if finite else 1.0) or 1.0
    left, bottom, step = 48.0, 24.0, (width - 56.0) / max(1, len(values))
    plot_h = height - bottom - 8.0
    bars = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        v = value if value is not None and math.isfinite(value) else 0.0
        h = max(0.0, min(1.0, v / top)) * plot_h
        bars.append(Bar(left + i * step + step * 0.1, 8.0 + plot_h - h, step * 0.8, h, label, value))
    return {"width": width, "height": height, "bars": bars, "vmax": top, "left": left,
            "base": 8.0 + plot_h, "top": 8.0}  # fmt: skip


def svg_line(
    labels: list[str], values: list[float], *, width: int = 640, height: int = 200
) -> dict[str, Any]:
    """A polyline over versions, scaled to the values' range, for an inline SVG chart."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    left, right, top, bottom = 56.0, 16.0, 12.0, 28.0
    step = (width - left - right) / max(1, len(values) - 1)
    points = [
        {"x": left + i * step, "y": top + (hi - v) / (hi - lo) * (height - top - bottom), "label": label,
         "value": v}
        for i, (label, v) in enumerate(zip(labels, values, strict=True))
    ]  # fmt: skip
    return {"width": width, "height": height, "points": points, "lo": lo, "hi": hi,
            "polyline": " ".join(f"{p['x']:.1f},{p['y']:.1f}" for p in points),
            "left": left, "top": top, "base": height - bottom}  # fmt: skip


def _viridis(value: float) -> str:
    """A perceptual ramp (dark blue -> green -> yellow) for 0..1, as an rgb() string of numbers."""
    stops = [(0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)), (0.75, (94, 201, 98)),
             (1.0, (253, 231, 37))]  # fmt: skip
    v = min(1.0, max(0.0, value))
    for (a, ca), (b, cb) in itertools.pairwise(stops):
        if v <= b:
            t = (v - a) / (b - a)
            r, g, bl = (round(x + (y - x) * t) for x, y in zip(ca, cb, strict=True))
            return f"rgb({r},{g},{bl})"
    return "rgb(253,231,37)"


def svg_heatmap(matrix: AttentionMatrix, *, cell_w: int = 110, cell_h: int = 22) -> dict[str, Any]:
    """Cells of the attention heatmap (row labels are drawn beside them by the template)."""
    label_w = 330
    cells = [
        {"x": label_w + j * cell_w, "y": 24 + i * cell_h, "w": cell_w - 2, "h": cell_h - 2,
         "fill": _viridis(v) if math.isfinite(v) else "rgb(229,231,235)",
         "text": f"{v:.2f}" if math.isfinite(v) else "-", "dark": math.isfinite(v) and v < 0.6,
         "site": matrix.sites[i], "constituent": matrix.constituents[j]}
        for i, row in enumerate(matrix.values) for j, v in enumerate(row)
    ]  # fmt: skip
    return {
        "width": label_w + cell_w * max(1, len(matrix.constituents)) + 8,
        "height": 24 + cell_h * max(1, len(matrix.sites)) + 4,
        "cells": cells,
        "rows": [{"y": 24 + i * cell_h + cell_h * 0.65, "label": s} for i, s in enumerate(matrix.sites)],
        "cols": [
            {"x": label_w + j * cell_w + cell_w / 2, "label": c} for j, c in enumerate(matrix.constituents)
        ],
        "label_w": label_w,
    }


# ----------------------------------------------------------------------------- for the CLI


def check_plot_path(path: Path | str) -> Path:
    """Refuse a bad `--plot` path before any work is done (and say how to get matplotlib)."""
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise InvalidConfig(f"--plot {path}: the file name must end in .png or .svg")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Unsupported(MISSING_MATPLOTLIB) from None
    return path


def plot_diff(report: Any, path: Path | str) -> Path:
    """`deltahub diff A B --plot PATH`."""
    return save(diff_figure(report), check_plot_path(path))


def plot_version(registry: Any, ref: str, path: Path | str, metric: str | None = None) -> Path:
    """`deltahub show REF --plot PATH`: a fusion's attention heatmap, else a metric over versions."""
    path = check_plot_path(path)
    v = registry.resolve(ref)
    if v.method == "fusion":
        fusion = registry.manifest(v).extra.get("fusion") or {}
        return save(attention_figure(attention_matrix(fusion), title=f"{v.ref}: fusion attention"), path)
    series = metric_series(list(registry.versions(v.full_name)), metric)
    if not series.values:
        raise InvalidConfig(f"no version of {v.full_name} records a metric: nothing to plot")
    return save(metric_figure(series, title=f"{v.full_name}: {series.metric} over versions"), path)
