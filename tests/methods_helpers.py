"""Shared pieces of the tests of IA3, BitFit, SSF (and the other PEFT-family methods)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.compose_helpers import ids, out_of


def run(model: Any, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return out_of(model(input_ids=x, **kw))


def perturb(adapter: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Move every parameter of an adapter away from its identity value by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def train_steps(
    model: Any, name: str, x: torch.Tensor, config: dict[str, Any], steps: int = 8, lr: float = 2e-2
) -> list[float]:
    """Toy task: fit the outputs of a perturbed teacher adapter of the same method, with
    a few Adam steps on adapter `name`; the losses."""
    model.add_adapter("teacher", config)
    perturb(model.get_adapter("teacher"), seed=11)
    model.activate("teacher")
    with torch.no_grad():
        target = out_of(model(input_ids=x))
    model.deactivate()
    model.unload("teacher")
    model.activate(name)
    params = model.adapter_parameters(name)
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = ((out_of(model(input_ids=x)) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


__all__ = ["ids", "perturb", "run", "train_steps"]
