"""Exact folding of per-channel scales and shifts into a base module (IA3, BitFit, SSF).

IA3, BitFit and SSF all change a module's output y (or, for IA3's feed-forward
modules, its input x) by a per-channel affine map. For the modules they sit on that map
folds exactly into the module's own parameters:

    linear  y = W x + b          gamma * y + beta  ->  W' = diag(gamma) W,  b' = gamma * b + beta
    linear  y = W (l * x) + b                      ->  W' = W diag(l)       (b unchanged)
    norm    y = w * n(x) + b                       ->  w' = gamma * w,      b' = gamma * b + beta

A module without a bias gets one (an `nn.Parameter` set on it) when beta is non-zero,
and loses it again on `restore`; an RMSNorm has no bias in its forward, so a shift on it
cannot be folded and `fold_output` raises `Unsupported`. Every fold returns a backup
that `restore` puts back bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deltahub.compose.inject import is_bnb_linear, is_conv1d, is_linear
from deltahub.errors import Unsupported


def is_norm(module: nn.Module) -> bool:
    """A LayerNorm or an RMSNorm-like module with a per-channel weight."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or (
        "Norm" in name and isinstance(getattr(module, "weight", None), Tensor)
    )


def out_features(module: nn.Module) -> int:
    if is_conv1d(module):
        return int(module.weight.shape[1])
    if is_linear(module):
        return int(module.out_features)
    return int(module.weight.shape[-1])


def _check_foldable(module: nn.Module, path: str) -> None:
    if is_bnb_linear(module):
        raise Unsupported(
            f"cannot fold into the quantized layer {path!r}; keep the adapter unmerged or use a full-precision base"
        )
    if not (is_linear(module) or is_norm(module)):
        raise Unsupported(f"cannot fold a scale/shift into {path!r} ({type(module).__name__})")


@torch.no_grad()
def fold_output(module: nn.Module, path: str, gamma: Tensor | None, beta: Tensor | None) -> Any:
    """y -> gamma * y + beta folded into `module`'s weight and bias; return the backup."""
    _check_foldable(module, path)
    bias = getattr(module, "bias", None)
    has_bias = isinstance(bias, Tensor)
    norm_without_bias = is_norm(module) and not isinstance(module, nn.LayerNorm) and not has_bias
    if beta is not None and norm_without_bias and bool(beta.ne(0).any()):
        raise Unsupported(
            f"{path!r} ({type(module).__name__}) has no bias, so a shift after it cannot be merged; "
            "keep the adapter unmerged"
        )
    backup = (module.weight.detach().clone(), bias.detach().clone() if has_bias else None, has_bias)
    w = module.weight
    if gamma is not None:
        g = gamma.to(w.dtype)
        if is_conv1d(module):
            w.mul_(g[None, :])  # Conv1D stores W as (d_in, d_out)
        elif is_linear(module):
            w.mul_(g[:, None])
        else:
            w.mul_(g)
        if has_bias:
            bias.mul_(g.to(bias.dtype))
    if beta is not None and bool(beta.ne(0).any()):
        if has_bias:
            bias.add_(beta.to(bias.dtype))
        else:
            module.bias = nn.Parameter(beta.detach().to(w.dtype).clone(), requires_grad=False)
    return backup


@torch.no_grad()
def fold_input(module: nn.Module, path: str, scale: Tensor) -> Any:
    """y = W (l * x) + b folded into W's input columns; return the backup."""
    _check_foldable(module, path)
    backup = (module.weight.detach().clone(), None, True)
    w = module.weight
    vec = scale.to(w.dtype)
    if is_conv1d(module):
        w.mul_(vec[:, None])
    else:
        w.mul_(vec[None, :])
    return backup


@torch.no_grad()
def restore(module: nn.Module, backup: Any) -> None:
    """Undo `fold_output` / `fold_input` exactly."""
    weight, bias, had_bias = backup
    module.weight.copy_(weight)
    if not had_bias:
        module.register_parameter("bias", None)
    elif bias is not None:
        module.bias.copy_(bias)
