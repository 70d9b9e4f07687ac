"""A full-precision merged model for serving elsewhere: base + one LoRA, folded.

`export_merged(ref, base, out)` loads the base in full precision (whatever precision the
adapter was trained at: a QLoRA adapter on a 4-bit base shares the fp base's
fingerprint), folds the adapter in exactly (W' = W + s B A, or DoRA's m * W' / ||W'||),
and writes a plain transformers directory (`save_pretrained`: config plus safetensors
weights, and the tokenizer when the base directory has one) that vLLM, TGI or
`from_pretrained` load without deltahub. Merging into the 4-bit weights instead would add
a requantization error (`AdaptedModel.merge(..., allow_lossy=True)` reports it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltahub.errors import AlreadyExists, InvalidConfig, Unsupported


def export_merged(
    ref: str,
    base: str | Path,
    out: str | Path,
    registry: Any = None,
    dtype: str | None = None,
    force: bool = False,
) -> Path:
    """Write base `base` with adapter `ref` merged to directory `out`; return `out`."""
    from deltahub.compose.base import load_base
    from deltahub.compose.model import AdaptedModel

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AlreadyExists(f"{out} exists and is not empty; choose a new directory")
    if isinstance(base, str) and not base:
        raise InvalidConfig("--merged needs --base: the full-precision base model directory or hub id")
    if registry is None:
        from deltahub.registry import Registry

        registry = Registry()
    version = registry.resolve(ref)
    if version.method != "lora":
        raise Unsupported(
            f"{ref} is a {version.method} adapter, which cannot be folded into the base weights; only LoRA "
            "(plain, rsLoRA, DoRA) exports --merged. Export the artifact itself (without --merged) and "
            "load it with deltahub on the base instead"
        )
    model = AdaptedModel(load_base(base, dtype=dtype, device="cpu"), registry=registry)
    name = model.load(version.ref, force=force)
    model.merge(name)  # the adapter is never activated: the saved modules run their plain forward
    merged = model.base
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    _copy_tokenizer(base, out)
    return out


def _copy_tokenizer(base: str | Path, out: Path) -> None:
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    except (OSError, ValueError, TypeError):
        pass  # a base without a tokenizer: the weights alone are the export
