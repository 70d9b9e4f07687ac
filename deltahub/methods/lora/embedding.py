"""LoRA on an `nn.Embedding` (PEFT's `lora.Embedding`), keys `lora_embedding_A` / `_B`.

PEFT stores the factors as bare parameters (no `.weight`): A (r, V), B (d, r), and adds

    y = E[x] + s * A^T[x] B^T

for token ids x: a row lookup in A^T (with the embedding's own lookup options), then a
small matmul. Merging adds s (B A)^T to E, which is refused when E is shared with
another module (GPT-2's `lm_head` holds `wte`'s weight): the merge would change that
module too, which the unmerged adapter never does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.errors import Unsupported
from deltahub.methods.common import SiteDelta


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


class LoraEmbedding(SiteDelta):
    """LoRA on an `nn.Embedding` (PEFT's `lora.Embedding`): for token ids x,

        y = E[x] + s * A^T[x] B^T,      A: (r, V) `lora_embedding_A`, B: (d, r) `lora_embedding_B`

    (a row lookup in A^T, then the small matmul), times the layer's `embed_scale` where
    it has one (Gemma's scaled embeddings), as PEFT. Merging adds s (B A)^T to E.
    """

    def __init__(self, base: nn.Module, path: str, A: Tensor, B: Tensor, scaling: float) -> None:
        super().__init__()
        base_layer = base.get_submodule(path)
        object.__setattr__(self, "base_layer", base_layer)
        self.path = path
        w = base_layer.weight
        # Other modules holding this weight (GPT-2's lm_head holds wte's): a merge would reach them.
        self.tied_with = [
            n
            for n, m in base.named_modules(remove_duplicate=False)
            if n != path and any(p is w for p in m._parameters.values())
        ]
        self.r, self.scaling, self.use_dora = A.shape[0], float(scaling), False
        self.lora_embedding_A = nn.Parameter(A)  # (r, V)
        self.lora_embedding_B = nn.Parameter(B)  # (d, r)

    def delta_weight(self) -> Tensor:
        """s (B A)^T, shaped like the embedding (V, d)."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        e = self.base_layer
        h = F.embedding(
            x,
            self.lora_embedding_A.T,
            padding_idx=e.padding_idx,
            max_norm=e.max_norm,
            norm_type=e.norm_type,
            scale_grad_by_freq=e.scale_grad_by_freq,
            sparse=e.sparse,
        )  # (..., r)
        out = (h @ self.lora_embedding_B.T) * (self.scaling * scale)  # (..., d)
        embed_scale = getattr(e, "embed_scale", None)
        if embed_scale is not None:
            out = out * torch.as_tensor(embed_scale, dtype=out.dtype, device=out.device)
        return out

    @torch.no_grad()
    def merge(self) -> Any:
        if self.tied_with:
            raise Unsupported(
                f"merging a LoRA on embedding {self.path!r} would also change {self.tied_with}, which share "
                "its weight; keep this adapter unmerged (activate it) instead"
            )
        weight = self.base_layer.weight
        backup = weight.detach().clone()
        weight.add_(self.delta_weight().to(weight.dtype))
        return backup

    @torch.no_grad()
    def unmerge(self, backup: Any) -> None:
        self.base_layer.weight.copy_(backup)
