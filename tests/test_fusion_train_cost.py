"""Fusion training picks by cost, per half (scores, values), between folding Q^T K W_n,
V W_n at every step and going through q = Q h and V (sum_n s_n z_n)
(`deltahub.fusion.layer._train_plan`); every plan gives the same output and gradients,
and with nothing to train the folded matrices are cached even under autograd."""

from __future__ import annotations

import torch

from deltahub.fusion import layer as fl
from deltahub.fusion.layer import FusionLayer, Part

TOL = 1e-5


def _setup(tokens: int, d: int = 24):
    torch.manual_seed(0)
    layer = FusionLayer(d, temperature=0.7)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.2)
    parts, key_tensors = [], []
    for r in (3, 5, 4):
        W, c = torch.randn(d, r), torch.randn(d)
        parts.append(Part(lambda x, *_, r=r: x[..., :r] * 0.5, lambda W=W, c=c: (W, c), (W, c)))
        key_tensors += [W, c]
    x = torch.randn(1, tokens, d)
    return layer, parts, x


def _run(layer: FusionLayer, parts: list[Part], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    fn = layer.bind(parts, ["a", "b", "c"])
    layer.zero_grad()
    out = fn(x, x, x, 1.0, None)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad.clone() for p in layer.parameters()]


def test_few_tokens_do_not_fold_and_equal_the_folded_step(monkeypatch):
    layer, parts, x = _setup(tokens=2)
    assert fl._train_plan(x, [3, 5, 4], 24) == ("query", "direct")  # 2 tokens: folding costs more
    unfolded, g_unfolded = _run(layer, parts, x)
    monkeypatch.setattr(fl, "_train_plan", lambda *_: ("fold", "fold"))
    folded, g_folded = _run(layer, parts, x)
    scale = float(folded.abs().max())
    assert (unfolded - folded).abs().max().item() <= TOL * scale
    for gd, gf in zip(g_unfolded, g_folded, strict=True):
        assert (gd - gf).abs().max().item() <= TOL * max(1.0, float(gf.abs().max()))


def test_a_large_batch_folds():
    _, _parts, x = _setup(tokens=512)
    assert fl._train_plan(x, [3, 5, 4], 24) == ("fold", "fold")


def test_frozen_fusion_caches_its_folded_matrices_under_autograd(monkeypatch):
    layer, parts, x = _setup(tokens=8)
    layer.requires_grad_(False)
    calls = []
    make = FusionLayer._folded_weights
    monkeypatch.setattr(FusionLayer, "_folded_weights", lambda self, *a: calls.append(1) or make(self, *a))
    fn = layer.bind(parts, ["a", "b", "c"])
    first = fn(x, x, x, 1.0, None)
    again = fn(x, x, x, 1.0, None)
    assert torch.equal(first, again) and len(calls) == 1
    with torch.no_grad():
        layer.fusion_value.weight.mul_(2.0)  # a change is seen (tensor versions)
    assert not torch.equal(fn(x, x, x, 1.0, None), first) and len(calls) == 2


def test_binding_again_reuses_the_folded_matrices(monkeypatch):
    layer, parts, x = _setup(tokens=8)
    calls = []
    make = FusionLayer._folded_weights
    monkeypatch.setattr(FusionLayer, "_folded_weights", lambda self, *a: calls.append(1) or make(self, *a))
    with torch.no_grad():
        first = layer.bind(parts, ["a", "b", "c"])(x, x, x, 1.0, None)
        again = layer.bind(parts, ["a", "b", "c"])(x, x, x, 1.0, None)  # re-activation
        other = layer.bind(parts[:2], ["a", "b"])(x, x, x, 1.0, None)  # another set: its own fold
    assert torch.equal(first, again) and len(calls) == 2
    assert not torch.equal(first, other)
