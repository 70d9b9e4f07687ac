"""deltahub.compose: run adapters on a frozen base.

`load_base` (base.py) loads and fingerprints the base; `AdaptedModel` (model.py) holds
resident adapters and switches them; `Stack`, `Sum`, `Average`, `Fuse` (blocks.py)
compose them; each method runs from its folder in `deltahub.methods`; `merge.py` builds new LoRA
artifacts from old ones; `lowrank.py` is the exact factored math they share; `quant.py`
and `export.py` handle 4-bit/8-bit bases and full-precision merged exports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "load_base": "deltahub.compose.base",
    "fingerprint": "deltahub.compose.base",
    "AdaptedModel": "deltahub.compose.model",
    "Stack": "deltahub.compose.blocks",
    "Sum": "deltahub.compose.blocks",
    "Average": "deltahub.compose.blocks",
    "Fuse": "deltahub.compose.blocks",
    "Block": "deltahub.compose.blocks",
    "merge_adapters": "deltahub.compose.merge",
    "export_merged": "deltahub.compose.export",
    "composition_rules": "deltahub.compose.blocks",
}

if TYPE_CHECKING:
    from deltahub.compose.base import fingerprint, load_base
    from deltahub.compose.blocks import Average, Block, Fuse, Stack, Sum
    from deltahub.compose.model import AdaptedModel


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deltahub.compose' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "AdaptedModel",
    "Average",
    "Block",
    "Fuse",
    "Stack",
    "Sum",
    "composition_rules",
    "export_merged",
    "fingerprint",
    "load_base",
    "merge_adapters",
]
