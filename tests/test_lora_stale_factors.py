"""Cached views of a LoRA's factors never go stale: the installed forward equals the
dense computation y = x (W + s B A)^T at every step, after a factor changes in place
while active, and after an optimizer step that does not bump the version counters
(torch's fused AdamW, transformers' Trainer default), for the plain forward, DoRA's
weight norm and the routing slots; gradients reach trainable factors. fp32, 1e-5
relative to the largest logit."""

from __future__ import annotations

import copy

import torch

from deltahub import AdaptedModel, load_base
from tests.compose_helpers import ids, out_of, tiny

TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _model() -> tuple[AdaptedModel, torch.nn.Module]:
    base = tiny("llama")
    reference_base = copy.deepcopy(base)
    model = AdaptedModel(load_base(base, device="cpu"))
    model.add_adapter("a", {"method": "lora", "r": 4, "lora_alpha": 12, "target_modules": TARGETS})
    with torch.no_grad():
        for p in model.get_adapter("a").parameters():
            p.normal_(0, 0.2)
    model.eval()
    return model, reference_base


def _dense(model: AdaptedModel, reference_base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base with W + s B A written into each adapted weight: an independent forward."""
    merged = copy.deepcopy(reference_base)
    adapter = model.get_adapter("a")
    with torch.no_grad():
        for path, layer in zip(adapter.paths, adapter.layers, strict=True):
            w = merged.get_submodule(path).weight
            w.add_(layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).to(w.dtype))
        return out_of(merged(input_ids=x))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert (got - want).abs().max().item() <= TOL * max(1.0, want.abs().max().item())


def test_forward_equals_dense_and_follows_in_place_changes():
    model, reference_base = _model()
    x = ids(batch=2, length=6)
    model.activate("a")
    with torch.no_grad():
        first = out_of(model(input_ids=x))
        _close(first, _dense(model, reference_base, x))
        again = out_of(model(input_ids=x))
        assert torch.equal(first, again)
        layer = model.get_adapter("a").layers[0]
        layer.lora_B.mul_(-3.0)  # changed in place while active
        changed = out_of(model(input_ids=x))
    _close(changed, _dense(model, reference_base, x))
    assert (changed - first).abs().max().item() > 1e-3


def test_under_autograd_the_factors_get_gradients():
    model, reference_base = _model()
    model.get_adapter("a").requires_grad_(True)
    model.activate("a")
    x = ids(batch=2, length=6)
    with torch.no_grad():
        model(input_ids=x)
    out = out_of(model(input_ids=x))
    out.pow(2).mean().backward()
    layer = model.get_adapter("a").layers[0]
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().max().item() > 0
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().max().item() > 0
    _close(out.detach(), _dense(model, reference_base, x))


def _fused_step(params: list[torch.nn.Parameter]) -> None:
    """One step of torch's fused AdamW (transformers' Trainer default), which updates the
    parameters in place without bumping their version counters."""
    before = [p._version for p in params]
    opt = torch.optim.AdamW(params, lr=0.05, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert [p._version for p in params] == before  # the premise: versions do not move


def test_trainable_factors_updated_by_a_fused_optimizer_are_never_stale():
    model, reference_base = _model()  # add_adapter: trainable factors
    x = ids(batch=2, length=6)
    model.activate("a")
    with torch.no_grad():
        first = out_of(model(input_ids=x))
    _fused_step(list(model.get_adapter("a").parameters()))
    with torch.no_grad():
        after = out_of(model(input_ids=x))
    _close(after, _dense(model, reference_base, x))
    assert (after - first).abs().max().item() > 1e-3


def test_dora_norm_follows_a_fused_optimizer_step():
    base = tiny("llama")
    model = AdaptedModel(load_base(base, device="cpu"))
    model.add_adapter(
        "d", {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}
    )
    layer = model.get_adapter("d").layers[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
    layer.weight_norm()  # cached once
    _fused_step([layer.lora_A, layer.lora_B])
    w = layer.base_layer.weight
    want = torch.linalg.norm(w + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    assert (layer.weight_norm() - want).abs().max().item() <= 1e-5


def test_routed_slots_follow_a_fused_optimizer_step():
    model, _ = _model()
    model.add_adapter("b", {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": TARGETS})
    with torch.no_grad():
        for p in model.get_adapter("b").parameters():
            p.normal_(0, 0.2)
    x = ids(batch=2, length=6)
    names = ["a", "b"]
    with torch.no_grad():
        model(input_ids=x, adapter_names=names)  # pages both into slots
    _fused_step(list(model.get_adapter("a").parameters()))
    with torch.no_grad():
        routed = out_of(model(input_ids=x, adapter_names=names))
        model.activate("a")
        alone = out_of(model(input_ids=x[:1]))
        model.deactivate()
    _close(routed[:1], alone)
