"""deltahub: a registry, runtime and CLI for parameter-efficient adapters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Heavy parts (torch) load on first use, so `import deltahub` and the CLI stay fast.
_LAZY = {
    "Registry": "deltahub.registry",
    "Version": "deltahub.registry",
    "parse_ref": "deltahub.registry",
    "Artifact": "deltahub.artifact",
    "Manifest": "deltahub.artifact",
    "diff": "deltahub.diffing",
    "train": "deltahub.training",
    "fuse": "deltahub.fusion",
    "predict": "deltahub.training",
    "load_base": "deltahub.compose.base",
    "AdaptedModel": "deltahub.compose.model",
    "Stack": "deltahub.compose.blocks",
    "Sum": "deltahub.compose.blocks",
    "Average": "deltahub.compose.blocks",
    "Fuse": "deltahub.compose.blocks",
}

if TYPE_CHECKING:
    from deltahub.artifact import Artifact, Manifest  # noqa: F401
    from deltahub.compose.base import load_base  # noqa: F401
    from deltahub.compose.blocks import Average, Fuse, Stack, Sum  # noqa: F401
    from deltahub.compose.model import AdaptedModel  # noqa: F401
    from deltahub.registry import Registry, Version, parse_ref  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'deltahub' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", *_LAZY]
