"""deltahub.fusion: AdapterFusion over resident adapters, and `fuse()` to learn one.

`layer.py` is the fusion layer (over bottleneck outputs and LoRA deltas) and its
registration as the "fusion" method; `artifact.py` pins and loads a fusion's
constituents; `learn.py` holds `fuse()`, which trains through `deltahub.training`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "fuse": "deltahub.fusion.learn",
    "attention_summary": "deltahub.fusion.learn",
    "add_fusion": "deltahub.fusion.layer",
    "fusions": "deltahub.fusion.layer",
}

if TYPE_CHECKING:
    from deltahub.fusion.layer import add_fusion, fusions
    from deltahub.fusion.learn import attention_summary, fuse


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deltahub.fusion' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["add_fusion", "attention_summary", "fuse", "fusions"]
