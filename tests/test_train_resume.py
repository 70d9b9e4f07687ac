"""Checkpoints: Ctrl-C keeps the best state so far, --resume continues from it exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from deltahub.cli.main import cli
from deltahub.training import engine, train
from deltahub.training.checkpoint import Checkpoint, TrainingInterrupted
from tests import fusion_helpers as fh

RUN = {"method": "lora", "r": 2, "target_modules": ["query"], "epochs": 3, "batch_size": 8, "lr": 3e-2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("resume")
    return (
        fh.bert_dir(d / "bert"),
        fh.color_task(d / "c.jsonl", n=48),
        fh.color_task(d / "e.jsonl", n=16, seed=1),
    )


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Raise KeyboardInterrupt from a Trainer callback at `step`, as Ctrl-C would."""
    from transformers import TrainerCallback

    real = engine.checkpoint_trainer

    class Stop(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == step:
                raise KeyboardInterrupt

    def interrupting() -> type:
        base = real()

        class Interrupting(base):  # type: ignore[misc,valid-type]
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.add_callback(Stop())

        return Interrupting

    monkeypatch.setattr(engine, "checkpoint_trainer", interrupting)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_interrupt_keeps_the_checkpoint_and_resume_continues_exactly(
    setup: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bert, data, _ = setup
    whole = train(
        str(bert), str(data), name="c", publish=False, output_dir=tmp_path / "whole", progress=False, **RUN
    )
    assert not (tmp_path / "whole" / "checkpoint").exists()  # removed once training ends well

    out = tmp_path / "cut"
    _interrupt_at(monkeypatch, 15)  # 6 steps an epoch: in the third epoch
    with pytest.raises(TrainingInterrupted) as caught:
        train(str(bert), str(data), name="c", publish=False, output_dir=out, progress=False, **RUN)
    assert caught.value.checkpoint == out / "checkpoint"
    info = Checkpoint(out / "checkpoint").info()
    assert info["global_step"] == 12 and info["epoch"] == 2.0  # without eval data: the last whole epoch
    monkeypatch.undo()

    lines: list[str] = []
    steps: list[int] = []
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            steps.append(state.global_step)

    real = engine.checkpoint_trainer

    def watching() -> type:
        class Watching(real()):  # type: ignore[misc]
            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, **kw)
                self.add_callback(FirstStep())

        return Watching

    monkeypatch.setattr(engine, "checkpoint_trainer", watching)
    resumed = train(
        str(bert), str(data), name="c", publish=False, output_dir=out, progress=False, resume=True,
        log=lines.append, **RUN,
    )  # fmt: skip
    assert steps[0] == 13 and steps[-1] == 18  # from the saved step on, not from the start
    assert [line.split()[1] for line in lines] == ["3/3"]
    assert not (out / "checkpoint").exists()
    a, b = _weights(whole.path), _weights(resumed.path)  # type: ignore[arg-type]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # CPU, same seed: bit for bit


def test_best_epoch_checkpoint_and_a_line_per_epoch(
    setup: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bert, data, eval_data = setup
    lines: list[str] = []
    _interrupt_at(monkeypatch, 13)
    with pytest.raises(TrainingInterrupted):
        train(
            str(bert), str(data), eval_data=str(eval_data), name="c", publish=False, progress=False, patience=0,
            log=lines.append, **RUN,
        )  # fmt: skip
    assert len(lines) == 2 and lines[0].startswith("epoch 1/3  loss ")
    assert " accuracy " in lines[0] and "best accuracy" in lines[1]
    from deltahub.settings import default_home

    ckpt = Checkpoint(default_home() / "checkpoints" / "c")  # no output dir: under the home
    info = ckpt.info()
    best = max(float(line.split()[5]) for line in lines)
    assert info["best"] == pytest.approx(best) and info["metric"] == "accuracy"
    assert info["global_step"] == 6 * info["best_epoch"]
    # Another training's options: refused, the checkpoint kept.
    from deltahub.errors import InvalidConfig

    with pytest.raises(InvalidConfig, match="another training"):
        train(
            str(bert), str(data), eval_data=str(eval_data), name="c", publish=False, progress=False, patience=0,
            resume=True, **{**RUN, "lr": 1e-2},
        )  # fmt: skip
    assert ckpt.exists()


def test_cli_ctrl_c_exits_130_and_resume(
    setup: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bert, data, _ = setup
    args = ["train", "--base", str(bert), "--data", str(data), "--name", "c", "--r", "2", "--target-modules",
            "query", "--epochs", "2", "--batch-size", "8", "--output-dir", str(tmp_path / "o"), "--no-publish"]  # fmt: skip
    _interrupt_at(monkeypatch, 8)
    r = CliRunner().invoke(cli, [*args, "--quiet"])
    assert r.exit_code == 130, r.output
    assert "kept in" in r.output and "--resume" in r.output and "Traceback" not in r.output
    monkeypatch.undo()
    r = CliRunner().invoke(cli, [*args, "--json"])  # without --resume: the directory is not empty
    assert r.exit_code == 2 and "not empty" in r.output
    r = CliRunner().invoke(cli, [*args, "--resume", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["epochs"] == 2.0
    assert "epoch 2/2  loss" in r.stderr and "epoch 1/2" not in r.stderr
    r = CliRunner().invoke(cli, ["train", *args[1:-3], "--resume", "--quiet"])
    assert r.exit_code == 4 and "no checkpoint" in r.output
