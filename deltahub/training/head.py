"""A classification head over a frozen base's hidden states, saved inside an adapter artifact.

    logits = W pool(H) + b,    H = the base's last hidden states (B, T, d)

One logit per label (single-label: softmax over them; multi-label: a sigmoid each), or
one output for regression (`problem_type`, recorded in the manifest's `extra["head"]`).
`pool` is the mean over non-padding tokens for encoders and the last non-padding token for
decoders (a causal model's last position is the only one that has read the whole text).

The head is part of the task, not of the base, so it travels with the adapter (or fusion)
that was trained with it: its tensors sit in the same `adapter_model.safetensors` under
`deltahub_head.` (`HEAD_PREFIX`), and its description (pooling, labels) in the manifest's
`extra["head"]`. Keys are independent of the base's module names, so one head scheme
works for BERT, GPT-2 and Llama bases alike; method checkers and `AdaptedModel` skip them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from deltahub.artifact import TASK_HEAD_PREFIX as HEAD_PREFIX
from deltahub.errors import IncompatibleBase, InvalidArtifact


def default_pooling(base: nn.Module) -> str:
    """ "last" for decoders (models that generate), "mean" for encoders."""
    can_generate = getattr(base, "can_generate", None)
    return "last" if callable(can_generate) and can_generate() else "mean"


class TaskHead(nn.Module):
    """Pool the hidden states, then one linear layer to `num_labels` logits."""

    def __init__(
        self, d: int, num_labels: int, pooling: str = "mean", problem_type: str = "single-label"
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.pooling = pooling
        self.problem_type = problem_type
        self.classifier = nn.Linear(d, num_labels)

    def pool(self, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return hidden.mean(1) if self.pooling == "mean" else hidden[:, -1]  # (B, d)
        mask = attention_mask.to(hidden.dtype)  # (B, T)
        if self.pooling == "mean":
            return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        # Last non-padding position; works for right padding (our collator pads right).
        last = attention_mask.long().sum(1).clamp(min=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.classifier(self.pool(hidden, attention_mask).to(self.classifier.weight.dtype))  # (B, K)

    def tensors(self) -> dict[str, Tensor]:
        return {
            f"{HEAD_PREFIX}classifier.weight": self.classifier.weight.detach(),
            f"{HEAD_PREFIX}classifier.bias": self.classifier.bias.detach(),
        }

    def describe(self, labels: list[str]) -> dict[str, Any]:
        """What goes in the manifest's `extra["head"]`."""
        info = {"type": "classifier", "pooling": self.pooling, "num_labels": len(labels), "labels": labels}
        if self.problem_type != "single-label":  # absent: single-label, as heads saved before
            info.update(problem_type=self.problem_type, num_outputs=self.classifier.out_features)
        return info

    @classmethod
    def from_artifact(cls, artifact: Any, d: int) -> TaskHead:
        """The head stored in an artifact (registry `open` result or `load_dir`)."""
        from safetensors import safe_open

        info = (artifact.manifest.extra.get("head") if artifact.manifest else None) or {}
        keys = [k for k in artifact.tensors if k.startswith(HEAD_PREFIX)]
        if not keys or not info:
            raise InvalidArtifact(
                "no-head", "this artifact has no task head (it was not trained for classification)"
            )
        with safe_open(str(artifact.weights_path), framework="pt") as f:
            w = f.get_tensor(f"{HEAD_PREFIX}classifier.weight")
            b = f.get_tensor(f"{HEAD_PREFIX}classifier.bias")
        if w.shape[1] != d:
            raise IncompatibleBase(f"the task head reads width {w.shape[1]}, the base has {d}")
        head = cls(d, w.shape[0], info.get("pooling", "mean"), info.get("problem_type", "single-label"))
        with torch.no_grad():
            head.classifier.weight.copy_(w)
            head.classifier.bias.copy_(b)
        return head


def has_head(artifact: Any) -> bool:
    return any(k.startswith(HEAD_PREFIX) for k in artifact.tensors)
