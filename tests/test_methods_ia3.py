"""IA3 against PEFT itself: PEFT-saved vectors load with identical outputs, ours load in PEFT."""

from __future__ import annotations

import copy

import pytest
import torch

from deltahub import AdaptedModel, load_base
from deltahub.errors import InvalidConfig
from deltahub.registry import Registry
from tests.compose_helpers import ids, tiny
from tests.methods_helpers import perturb, run

TOL = 1e-5


def _peft_ia3(path, kind, **kwargs):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(tiny(kind), IA3Config(**kwargs))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(str(path))
    return model


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_peft_saved_ia3_loads_with_same_outputs(tmp_path, kind):
    peft_model = _peft_ia3(tmp_path / "a", kind)  # PEFT's default targets for the model type
    x = ids()
    ref = run(peft_model, x)
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    plain = run(model, x)
    model.load_path(tmp_path / "a", "a")
    model.activate("a")
    got = run(model, x)
    assert (got - ref).abs().max().item() <= TOL
    assert (got - plain).abs().max().item() > 1e-2
    assert any(layer.feedforward for layer in model.get_adapter("a").layers)
    registry = Registry()  # a PEFT directory publishes as is and loads by name
    assert registry.publish(tmp_path / "a", "peft-ia3").method == "ia3"
    other = AdaptedModel(load_base(tiny(kind), device="cpu"), registry=registry)
    other.activate(other.load("peft-ia3"))
    assert torch.equal(run(other, x), got)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_deltahub_ia3_loads_in_peft_and_merges_like_it(tmp_path, kind):
    from peft import PeftModel

    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    model.add_adapter("mine", {"method": "ia3"})
    perturb(model.get_adapter("mine"), seed=4)
    model.activate("mine")
    x = ids()
    ours = run(model, x)
    out = model.save_adapter("mine", tmp_path / "mine")
    peft_model = PeftModel.from_pretrained(tiny(kind), str(out)).eval()
    assert (run(peft_model, x) - ours).abs().max().item() <= TOL
    merged = copy.deepcopy(peft_model).merge_and_unload()
    model.deactivate()
    model.merge("mine")
    for (n, p), (m, q) in zip(model.base.named_parameters(), merged.named_parameters(), strict=True):
        assert n == m and (p - q).abs().max().item() <= TOL


def test_feedforward_modules_must_be_targets():
    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    with pytest.raises(InvalidConfig, match="subset of target_modules"):
        model.add_adapter(
            "a", {"method": "ia3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}
        )
