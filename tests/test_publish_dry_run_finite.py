"""`publish --dry-run --check-finite` runs the finite scan a real publish runs: a NaN or
infinity gives the same typed error and exit code, and still nothing is stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.errors import InvalidArtifact
from deltahub.registry import Registry
from deltahub.registry.preview import preview_publish
from tests.test_artifact import make_good
from tests.test_publish_finite import A, B, poisoned


def _stored_blobs(registry: Registry) -> list[Path]:
    return [p for p in (registry.home / "blobs").rglob("*") if p.is_file()]


@pytest.mark.parametrize(
    ("dtype", "value", "where"), [(torch.float32, float("nan"), B), (torch.bfloat16, float("inf"), A)]
)
def test_dry_run_refuses_as_publish_does(
    dtype: torch.dtype, value: float, where: str, tmp_path: Path, deltahub_home: Path
) -> None:
    d = poisoned(tmp_path / "a", dtype, value, where)
    runner = CliRunner()
    dry = runner.invoke(cli, ["publish", str(d), "--name", "team/nan", "--dry-run", "--check-finite"])
    real = runner.invoke(cli, ["publish", str(d), "--name", "team/nan", "--check-finite"])
    assert dry.exit_code == real.exit_code == InvalidArtifact.exit_code != 0
    assert dry.stderr == real.stderr  # the same one-line message, naming rule and tensor
    assert "tensor-non-finite" in dry.stderr and where in dry.stderr and "Traceback" not in dry.output
    assert dry.stdout == ""
    registry = Registry()
    assert registry.list(all_versions=True) == [] and _stored_blobs(registry) == []
    # --json keeps the same exit code
    as_json = runner.invoke(
        cli, ["publish", str(d), "--name", "team/nan", "--dry-run", "--check-finite", "--json"]
    )
    assert as_json.exit_code == InvalidArtifact.exit_code
    # the library raises the same typed error
    with pytest.raises(InvalidArtifact) as e:
        preview_publish(registry, d, "team/nan", check_finite=True)
    assert e.value.rule == "tensor-non-finite" and where in str(e.value)


def test_dry_run_without_the_flag_does_not_scan(tmp_path: Path, deltahub_home: Path) -> None:
    d = poisoned(tmp_path / "a", torch.float32, float("nan"))
    result = CliRunner().invoke(cli, ["publish", str(d), "--name", "team/nan", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checked_finite"] is False


def test_dry_run_of_a_finite_artifact_says_it_was_checked(tmp_path: Path, deltahub_home: Path) -> None:
    good = make_good(tmp_path / "good")
    runner = CliRunner()
    result = runner.invoke(
        cli, ["publish", str(good), "--name", "team/ok", "--dry-run", "--check-finite", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checked_finite"] is True
    text = runner.invoke(cli, ["publish", str(good), "--name", "team/ok", "--dry-run", "--check-finite"])
    assert text.exit_code == 0 and "every floating tensor is finite" in text.stdout
    assert Registry().list() == []
