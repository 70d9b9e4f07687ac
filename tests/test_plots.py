"""Plots: the files are valid PNG / SVG, and the plotted numbers are the report's numbers.

Numbers are read back from the matplotlib figures (bar heights, line data, image arrays),
never from pixels. The fusion here is trained for real (tiny BERT, two LoRAs on the
attention's query and value of both layers): its per-site attention is checked against
`attention_summary`, an independent computation of the same softmax weights.
"""

from __future__ import annotations

import importlib.util
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deltahub import plots
from deltahub.cli.main import cli
from deltahub.diffing import diff
from deltahub.registry import Registry
from tests import fusion_helpers as fh
from tests.hub_helpers import lora_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(
    not HAVE_MPL,
    reason="matplotlib is not installed: pip install 'deltahub[plots]'",
)


def build_fusion(registry: Registry, tmp: Path) -> dict[str, Any]:
    """Two LoRAs (query, value of both layers of a tiny BERT) published, then fused for 1 epoch."""
    import torch

    from deltahub.compose.base import load_base
    from deltahub.compose.model import AdaptedModel
    from deltahub.fusion import fuse

    bert = fh.bert_dir(tmp / "bert")
    model = AdaptedModel(load_base(bert, device="cpu"))
    refs = []
    for i, name in enumerate(["team/colors", "team/animals"]):
        short = name.split("/")[1]
        model.add_adapter(
            short, {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}
        )
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.get_adapter(short).parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out = model.save_adapter(short, tmp / short)
        refs.append(registry.publish(out, name, description=f"{short} adapter", task="tagging").ref)
    data = fh.color_task(tmp / "train.jsonl", n=16)
    result = fuse(
        refs, str(bert), str(data), eval_data=str(data), name="team/fz", epochs=1, batch_size=8,
        registry=registry, progress=False, description="colors x animals",
    )  # fmt: skip
    return {"refs": refs, "fusion": result.version, "bert": bert}


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fused")
    registry = Registry(tmp / "home")
    out = build_fusion(registry, tmp)
    out["registry"] = registry
    out["home"] = tmp / "home"
    return out


@pytest.fixture
def two_versions(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "home")
    reg.publish(lora_dir(tmp_path / "a", seed=0, layers=3), "team/alpha", metrics={"acc": 0.5, "f1": 0.4})
    reg.publish(lora_dir(tmp_path / "b", seed=1, layers=3), "team/alpha", metrics={"acc": 0.75})
    reg.publish(lora_dir(tmp_path / "c", seed=2, layers=3), "team/alpha", metrics={"acc": 0.625, "f1": 0.5})
    return reg


def _valid_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    from matplotlib.image import imread

    assert imread(path).ndim == 3  # decodes as an image


def _valid_svg(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


# ----------------------------------------------------------------------------- the numbers


def test_diff_series_are_the_reports_numbers_in_model_order(two_versions: Registry) -> None:
    report = diff("team/alpha@1", "team/alpha@2", registry=two_versions)
    s = plots.diff_series(report)
    by_module = {m["module"]: m for m in report.to_dict()["modules"]}
    assert len(s.modules) == len(by_module) == 6  # q_proj, v_proj x 3 layers
    assert s.relative_change == [by_module[m]["relative_change"] for m in s.modules]
    assert s.subspace_similarity == [by_module[m]["subspace_similarity"] for m in s.modules]
    layers = [int(m.split(".layers.")[1].split(".")[0]) for m in s.modules]
    assert layers == sorted(layers)


def test_metric_series_picks_the_common_metric_and_refuses_an_unknown_one(two_versions: Registry) -> None:
    versions = list(two_versions.versions("team/alpha"))
    s = plots.metric_series(versions)
    assert (s.metric, s.versions, s.values) == ("acc", ["1", "2", "3"], [0.5, 0.75, 0.625])
    f1 = plots.metric_series(versions, "f1")
    assert (f1.versions, f1.values) == (["1", "3"], [0.4, 0.5])
    with pytest.raises(Exception, match="no version has the metric 'bleu'"):
        plots.metric_series(versions, "bleu")


def test_svg_geometry_is_proportional_to_the_values() -> None:
    c = plots.svg_bars(["a", "b", "c"], [1.0, 0.5, None], vmax=1.0)
    heights = [b.h for b in c["bars"]]
    assert heights[0] == pytest.approx(2 * heights[1]) and heights[2] == 0
    line = plots.svg_line(["1", "2"], [0.2, 0.8])
    ys = [p["y"] for p in line["points"]]
    assert ys[0] > ys[1]  # higher value, higher on the page


# ----------------------------------------------------------------------------- figures


@needs_matplotlib
def test_diff_figure_draws_the_reports_numbers(two_versions: Registry, tmp_path: Path) -> None:
    report = diff("team/alpha@1", "team/alpha@3", registry=two_versions)
    fig = plots.diff_figure(report)
    top, bottom = fig.axes[:2]
    by_module = {m.module: m for m in report.modules}
    labels = [t.get_text() for t in bottom.get_xticklabels()]
    assert [p.get_height() for p in top.patches] == [by_module[m].relative_change for m in labels]
    assert [p.get_height() for p in bottom.patches] == [by_module[m].subspace_similarity for m in labels]
    _valid_png(plots.save(fig, tmp_path / "d.png"))
    _valid_svg(plots.save(fig, tmp_path / "d.svg"))


@needs_matplotlib
def test_metric_figure_draws_each_versions_metric(two_versions: Registry, tmp_path: Path) -> None:
    s = plots.metric_series(list(two_versions.versions("team/alpha")), "acc")
    fig = plots.metric_figure(s)
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_ydata()) == [0.5, 0.75, 0.625]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["1", "2", "3"]


@needs_matplotlib
def test_cli_diff_plot_writes_png_and_svg(two_versions: Registry, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DELTAHUB_HOME", str(two_versions.home))
    runner = CliRunner()
    for name in ("out.png", "out.svg"):
        result = runner.invoke(cli, ["diff", "team/alpha@1", "team/alpha@2", "--plot", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert f"plot: {tmp_path / name}" in result.output
    _valid_png(tmp_path / "out.png")
    svg = _valid_svg(tmp_path / "out.svg")
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}path")) > 6
    bad = runner.invoke(cli, ["diff", "team/alpha@1", "team/alpha@2", "--plot", str(tmp_path / "x.jpg")])
    assert bad.exit_code != 0 and "must end in .png or .svg" in bad.output


@needs_matplotlib
def test_cli_show_plot_draws_a_metric_over_versions(
    two_versions: Registry, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("DELTAHUB_HOME", str(two_versions.home))
    result = CliRunner().invoke(
        cli, ["show", "team/alpha", "--plot", str(tmp_path / "m.png"), "--metric", "f1"]
    )
    assert result.exit_code == 0, result.output
    _valid_png(tmp_path / "m.png")


def test_missing_matplotlib_is_one_clear_line(two_versions: Registry, tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setenv("DELTAHUB_HOME", str(two_versions.home))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    result = CliRunner().invoke(
        cli, ["diff", "team/alpha@1", "team/alpha@2", "--plot", str(tmp_path / "p.png")]
    )
    assert result.exit_code != 0
    assert "pip install 'deltahub[plots]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.png").exists()


# ----------------------------------------------------------------------------- fusion


def test_fusion_records_attention_per_site_consistent_with_the_mean(fused: dict[str, Any]) -> None:
    manifest = fused["registry"].manifest(fused["fusion"])
    data = manifest.extra["fusion"]
    per_site = data["attention_per_site"]
    assert len(per_site) == 4  # query and value of both layers: each changed by both LoRAs
    for row in per_site.values():
        assert set(row) == {"team/colors", "team/animals"}
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-5)
    # Every site sees the same tokens, so the mean over sites is attention_summary's number.
    for name, overall in data["attention"].items():
        mean = sum(row[name] for row in per_site.values()) / len(per_site)
        assert mean == pytest.approx(overall, abs=1e-5)


@needs_matplotlib
def test_attention_heatmap_draws_the_manifests_numbers(
    fused: dict[str, Any], tmp_path: Path, monkeypatch
) -> None:
    data = fused["registry"].manifest(fused["fusion"]).extra["fusion"]
    matrix = plots.attention_matrix(data)
    fig = plots.attention_figure(matrix)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (4, 2)
    for i, site in enumerate(matrix.sites):
        for j, name in enumerate(matrix.constituents):
            assert math.isclose(float(image[i, j]), data["attention_per_site"][site][name])
    monkeypatch.setenv("DELTAHUB_HOME", str(fused["home"]))
    result = CliRunner().invoke(cli, ["show", "team/fz", "--plot", str(tmp_path / "att.png")])
    assert result.exit_code == 0, result.output
    _valid_png(tmp_path / "att.png")


def test_older_fusions_without_per_site_attention_get_one_row() -> None:
    m = plots.attention_matrix(
        {"constituents": [{"name": "a"}, {"name": "b"}], "attention": {"a": 0.25, "b": 0.75}}
    )
    assert (m.sites, m.constituents, m.values) == (["mean over sites"], ["a", "b"], [[0.25, 0.75]])


def test_quickstart_ends_with_the_fusion_page_and_its_plots(fused: dict[str, Any], tmp_path: Path) -> None:
    from deltahub.quickstart import _plots, _see_it

    registry, fz = fused["registry"], fused["fusion"]
    a, b = fused["refs"]
    made = _plots(diff(a, b, registry=registry), registry, fz.ref, tmp_path) if HAVE_MPL else {}
    text = _see_it(tmp_path, fz.ref, made)
    assert f"deltahub serve --home {tmp_path}" in text
    assert "the fusion's page: http://127.0.0.1:8600/ui/a/team/fz/v/1/fusion" in text
    if HAVE_MPL:
        assert sorted(made) == ["attention", "diff"]
        for path in made.values():
            _valid_png(path)
            assert str(path) in text
    assert "pip install 'deltahub[plots]'" in _see_it(tmp_path, fz.ref, {})
