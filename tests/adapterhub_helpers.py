"""Driving the AdapterHub fixtures (tests/fixtures/adapterhub, made by `adapters` 1.3.0):
bases, inputs, reference outputs, and running one case through deltahub.

Shared by tests/test_adapterhub.py and bench/fidelity_table.py. Works on transformers 4.57
(the `adapters` venv) and 5.x.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FIX = Path(__file__).resolve().parent / "fixtures" / "adapterhub"
CASES: dict[str, dict[str, Any]] = json.loads((FIX / "cases.json").read_text())["cases"]
TOL = 1e-5  # fp32, max abs
# case -> the `InvalidArtifact.rule` deltahub refuses it with at publish, and a word of why
REFUSED = {
    "bert-bin-refusal": ("pickle-file", "pytorch_adapter.bin"),
    "bert-head": ("adapterhub-unsupported", "head layers=2"),
    "bert-prefix": ("adapterhub-unsupported", "prefix_tuning"),
    "gpt2-prefix": ("adapterhub-unsupported", "prefix_tuning"),
    "llama-prefix": ("adapterhub-unsupported", "prefix_tuning"),
    "llama-prefix-flat": ("adapterhub-unsupported", "prefix_tuning"),
}
EXACT = sorted(n for n, c in CASES.items() if n not in REFUSED and c["kind"] in ("single", "fusion"))


def base_model(arch: str) -> torch.nn.Module:
    """The fixture's base: `AutoModel` from its config, its state dict loaded strictly, eager."""
    import safetensors.torch
    import transformers

    bdir = FIX / f"base-{arch}"
    cfg = transformers.AutoConfig.from_pretrained(str(bdir))
    model = transformers.AutoModel.from_config(cfg, attn_implementation="eager")
    model.load_state_dict(safetensors.torch.load_file(str(bdir / "base.safetensors")), strict=True)
    return model.eval()


def io(case: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    import safetensors.torch

    d = FIX / CASES[case]["dir"]
    return (
        safetensors.torch.load_file(str(d / "inputs.safetensors")),
        safetensors.torch.load_file(str(d / "outputs.safetensors")),
    )


def adapter_dir(case: str, i: int = 0) -> Path:
    return FIX / CASES[case]["dir"] / CASES[case]["adapter_dirs"][i]


def publish_case(registry: Any, case: str, name: str = "ah") -> str:
    """Publish the case's adapter (or fusion, with its constituents); return what to activate."""
    c = CASES[case]
    if c["kind"] == "fusion":
        registry.publish(FIX / c["dir"] / "fusion", name)
    else:
        registry.publish(adapter_dir(case), name)
    return name


def run(model: Any, case: str, block: Any) -> torch.Tensor:
    inputs, _ = io(case)
    model.activate(block)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    model.deactivate()
    return out


def deltahub_output(registry: Any, case: str, name: str = "ah") -> torch.Tensor:
    """The case's adapter published into `registry`, loaded on the fixture base, run."""
    from deltahub import AdaptedModel, Fuse, load_base

    publish_case(registry, case, name)
    model = AdaptedModel(load_base(base_model(CASES[case]["arch"]), device="cpu"), registry=registry)
    model.load(name)
    block: Any = name
    if CASES[case]["kind"] == "fusion":
        block = Fuse(*model.get_adapter(name).adapter_names, name=name)
    return run(model, case, block)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())
