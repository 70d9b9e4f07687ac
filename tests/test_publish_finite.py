"""`publish --check-finite`: a NaN or infinity in any adapter tensor refuses the publish
(issue 14 item 4); without the flag the same artifact publishes as before."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from deltahub import artifact as af
from deltahub.cli.main import cli
from deltahub.errors import InvalidArtifact
from deltahub.registry import Registry
from deltahub.tensorscan import check_finite
from tests.test_artifact import LORA_CONFIG, PREFIX, good_tensors, make_good

A = f"{PREFIX}.lora_A.weight"
B = f"{PREFIX}.lora_B.weight"


def poisoned(path: Path, dtype: torch.dtype, value: float, where: str = B) -> Path:
    tensors = {k: v.to(dtype) for k, v in good_tensors().items()}
    tensors[where][3, 1] = value
    path.mkdir(parents=True)
    save_file(tensors, str(path / af.WEIGHTS_FILE))
    (path / af.CONFIG_FILE).write_text(json.dumps(LORA_CONFIG))
    return path


@pytest.mark.parametrize(
    ("dtype", "value", "where"),
    [
        (torch.float32, float("nan"), B),
        (torch.bfloat16, float("inf"), A),
        (torch.bfloat16, float("nan"), B),
        (torch.float16, float("-inf"), A),
        (torch.float64, float("nan"), B),
    ],
)
def test_non_finite_tensor_is_refused_when_asked(
    dtype: torch.dtype, value: float, where: str, tmp_path: Path, deltahub_home: Path
) -> None:
    d = poisoned(tmp_path / "a", dtype, value, where)
    registry = Registry()
    with pytest.raises(InvalidArtifact) as e:
        registry.publish(d, name="team/nan", check_finite=True)
    assert e.value.rule == "tensor-non-finite"
    assert "[tensor-non-finite]" in str(e.value) and where in str(e.value)
    assert registry.list(all_versions=True) == []
    # Off (the default), the same bytes publish as before.
    v = registry.publish(d, name="team/nan")
    assert v.ref == "team/nan@1"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finite_tensors_publish_with_the_check(
    dtype: torch.dtype, tmp_path: Path, deltahub_home: Path
) -> None:
    # Extremes that are finite: the largest value of the dtype and subnormals.
    tensors = {k: v.to(dtype) for k, v in good_tensors().items()}
    tensors[A][0, 0] = torch.finfo(dtype).max
    tensors[A][0, 1] = -torch.finfo(dtype).max
    tensors[A][0, 2] = torch.finfo(dtype).smallest_normal / 4
    d = tmp_path / "ok"
    d.mkdir()
    save_file(tensors, str(d / af.WEIGHTS_FILE))
    (d / af.CONFIG_FILE).write_text(json.dumps(LORA_CONFIG))
    assert Registry().publish(d, name="team/ok", check_finite=True).ref == "team/ok@1"


def test_bit_tests_agree_with_torch_on_every_16_bit_pattern(tmp_path: Path) -> None:
    """The bf16 and f16 scans test raw bits: compared with torch.isfinite on all 65,536
    patterns of each (an independent implementation)."""
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.bfloat16, torch.float16):
        values = bits.view(dtype)
        expected = ~torch.isfinite(values.float())
        for i in [*range(0, 1 << 16, 997), *np.flatnonzero(expected.numpy())[::31].tolist()]:
            path = tmp_path / f"{dtype}-{i}.safetensors"
            save_file({"w": values[i : i + 1].clone()}, str(path))
            tensors = af.read_safetensors_header(path)
            if expected[i]:
                with pytest.raises(InvalidArtifact):
                    check_finite(path, tensors)
            else:
                check_finite(path, tensors)
        # all patterns at once: the count of non-finite values the scan sees is torch's
        path = tmp_path / f"{dtype}-all.safetensors"
        save_file({"w": values.clone()}, str(path))
        with pytest.raises(InvalidArtifact) as e:
            check_finite(path, af.read_safetensors_header(path))
        assert "holds " in str(e.value)


def test_cli_check_finite_flag(tmp_path: Path, deltahub_home: Path) -> None:
    d = poisoned(tmp_path / "a", torch.float32, float("nan"))
    runner = CliRunner()
    result = runner.invoke(cli, ["publish", str(d), "--name", "team/nan", "--check-finite"])
    assert result.exit_code == InvalidArtifact.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "tensor-non-finite" in lines[0] and B in lines[0]
    assert "Traceback" not in result.output
    # without the flag it publishes
    result = runner.invoke(cli, ["publish", str(d), "--name", "team/nan"])
    assert result.exit_code == 0, result.output
    good = make_good(tmp_path / "good")
    result = runner.invoke(cli, ["publish", str(good), "--name", "team/good", "--check-finite"])
    assert result.exit_code == 0, result.output
