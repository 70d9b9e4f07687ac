"""The LoRA layer: LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al.,
2024) on one linear layer (Linear, GPT-2 Conv1D, bitsandbytes), with lora_bias.

For a linear layer y = W x + b (W: d_out x d_in) LoRA adds a rank-r update:

    y = W x + b + s * B A x,        A: (r, d_in), B: (d_out, r)
    s = alpha / r                   (LoRA)
    s = alpha / sqrt(r)             (rsLoRA, `use_rslora`)

computed as two small matmuls through the r-dim intermediate, `((x A^T) s) B^T`, added
in place into the base output when no gradient is needed (no extra pass over y).

DoRA splits the adapted weight into a magnitude and a direction:

    W' = m * (W + s B A) / ||W + s B A||_c          (norm of each output row)
    y  = (m / n) * (W x + s B A x) + b,             n = ||W + s B A||_c, detached

exactly as PEFT computes it (n is treated as a constant, section 4.3 of the paper). We
cache n until W, A or B change (their tensor versions), so inference pays one vector
multiply per layer.

PEFT's `lora_bias` gives lora_B a bias b: y += (B A x + b) s; merging adds s b to the base
bias.

GPT-2's `Conv1D` stores W as (d_in, d_out) (`fan_in_fan_out`); A and B keep the same
shapes as for `nn.Linear`, only merging transposes. bitsandbytes `Linear4bit` /
`Linear8bitLt` bases (QLoRA) run through the module's own forward; `dequantized_weight`
is the one place that reads their weight (DoRA norms, merging). Merging into a quantized
layer dequantizes, adds and requantizes (lossy: `deltahub.compose.quant`); the original
quantized parameter is kept, so unmerging is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.compose.inject import is_bnb_linear, is_conv1d, linear_dims
from deltahub.methods.common import SiteDelta


def dequantized_weight(module: nn.Module) -> Tensor:
    """The weight of a linear layer as a dense (d_out, d_in) tensor (a view when possible)."""
    if is_conv1d(module):
        return module.weight.T
    if is_bnb_linear(module):
        from deltahub.compose.quant import dequantize_weight

        return dequantize_weight(module)  # a fresh dense tensor, (d_out, d_in)
    return module.weight


def _stored_in_out(module: nn.Module) -> bool:
    """GPT-2's Conv1D, or a quantized layer made from one (PEFT's fan_in_fan_out)."""
    return is_conv1d(module) or bool(getattr(module, "deltahub_conv1d", False))


class LoraLayer(SiteDelta):
    """LoRA (optionally DoRA) on one Linear / Conv1D of the base."""

    dropout = 0.0  # PEFT's lora_dropout, on the LoRA branch's input (set from the config)

    def __init__(
        self, base_layer: nn.Module, r: int, scaling: float, use_dora: bool, dtype: torch.dtype
    ) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base_layer)
        device = base_layer.weight.device
        # Kept out of the module tree: the base's parameters are not the adapter's.
        object.__setattr__(self, "base_layer", base_layer)
        self.r, self.scaling, self.use_dora = r, float(scaling), use_dora
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self._norm: Tensor | None = None
        self._norm_key: tuple[int, ...] = ()
        self.lora_magnitude_vector: nn.Parameter | None = None
        self.lora_B_bias: nn.Parameter | None = None  # PEFT's lora_bias: lora_B is Linear(r, d_out, bias)
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().clone())

    def delta_weight(self) -> Tensor:
        """s * B @ A, shaped (d_out, d_in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def weight_norm(self) -> Tensor:
        """||W + s B A|| per output row, detached; cached while W, A and B are frozen and
        unchanged. Trainable factors are read every call: an optimizer may update them in
        place without bumping their version counter (torch's fused AdamW, the default of
        transformers' Trainer, does not), so a version-keyed cache would go stale."""
        p = self.base_layer.weight
        trainable = p.requires_grad or self.lora_A.requires_grad or self.lora_B.requires_grad
        key = None if trainable else (
            id(p),
            p._version,
            self.lora_A._version,
            self.lora_B._version,
            id(self.lora_A),
            id(self.lora_B),
        )  # fmt: skip
        if self._norm is None or key is None or key != self._norm_key:
            # Read W only on a miss: for a quantized base that is a full dequantization.
            w = dequantized_weight(self.base_layer)
            with torch.no_grad():
                merged = w.to(self.lora_A.dtype) + self.delta_weight()
                self._norm = torch.linalg.norm(merged, dim=1).to(merged.dtype)
            self._norm_key = key
        return self._norm

    def dropped(self, x: Tensor) -> Tensor:
        """x with dropout, only while this adapter trains (never at inference, never frozen)."""
        if self.dropout and self.training and self.lora_A.requires_grad and torch.is_grad_enabled():
            return F.dropout(x, self.dropout)
        return x

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        A = self.lora_A
        if x.dtype != A.dtype:
            x = x.to(A.dtype)
        h = F.linear(self.dropped(x), A) * (self.scaling * scale)  # (..., r)
        lora = F.linear(h, self.lora_B)  # (..., d_out)
        if self.lora_B_bias is not None:  # (B A x + b) s, as PEFT's lora_B(lora_A(x)) * scaling
            lora = lora + self.lora_B_bias * (self.scaling * scale)
        if not self.use_dora:
            return lora
        g = self.lora_magnitude_vector / self.weight_norm()  # (d_out,)
        bias = self.base_layer.bias
        wx = y_base if bias is None else y_base - bias
        # (g - 1) W x + g s B A x, as PEFT; `scale` weights the whole change.
        return (g - 1) * (wx * scale) + g * lora

    def single(self, base_forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if self.use_dora or self.lora_B_bias is not None:
            return super().single(base_forward)
        layer = self

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            y = base_forward(x, *args, **kwargs)
            A = layer.lora_A
            if x.dtype != A.dtype:
                x = x.to(A.dtype)
            h = F.linear(layer.dropped(x), A)  # (..., r)
            h.mul_(layer.scaling)
            B = layer.lora_B
            if y.requires_grad or h.requires_grad or not y.is_contiguous() or y.dtype != B.dtype:
                return y + F.linear(h, B).to(y.dtype)
            # y += h B^T inside the GEMM (beta=1): no extra pass over the output.
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.t())
            return y

        return forward

    # ------------------------------------------------------------------ merging

    def _merged_weight(self, w: Tensor) -> Tensor:
        new = w.to(self.lora_A.dtype) + self.delta_weight()  # (d_out, d_in)
        if self.use_dora:
            new = (self.lora_magnitude_vector / self.weight_norm()).unsqueeze(1) * new
        return new

    @torch.no_grad()
    def merge(self) -> Any:
        """Fold into the base weight in place (and a `lora_bias` into the base bias: b += s b_B,
        as PEFT); return what `unmerge` needs."""
        backup = self._merge_weight()
        if self.lora_B_bias is None:
            return backup
        bias = self.base_layer.bias
        old = bias.detach().clone()
        bias.add_((self.lora_B_bias * self.scaling).to(bias.dtype))
        return backup, old

    @torch.no_grad()
    def unmerge(self, backup: Any) -> None:
        if self.lora_B_bias is not None:
            backup, old = backup
            self.base_layer.bias.copy_(old)
        self._unmerge_weight(backup)

    def _merge_weight(self) -> Any:
        """Fold into the base weight in place; return what `unmerge` needs (the old weight).

        A quantized layer is requantized (`quant.replace_weight`); its backup keeps the
        original quantized parameter and `self.merge_error` the requantization error.
        """
        if is_bnb_linear(self.base_layer):
            from deltahub.compose.quant import replace_weight

            new = self._merged_weight(dequantized_weight(self.base_layer))
            backup, self.merge_error = replace_weight(self.base_layer, new)
            return backup
        weight = self.base_layer.weight
        backup = weight.detach().clone()
        w = dequantized_weight(self.base_layer)  # (d_out, d_in) view of `weight`
        w.copy_(self._merged_weight(w).to(w.dtype))
        return backup

    def _unmerge_weight(self, backup: Any) -> None:
        if is_bnb_linear(self.base_layer):
            from deltahub.compose.quant import restore_weight

            restore_weight(self.base_layer, backup)
            return
        self.base_layer.weight.copy_(backup)
