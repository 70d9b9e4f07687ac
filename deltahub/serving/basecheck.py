"""The fingerprint of the model a serving engine serves, from its config alone.

vLLM hands a resolver only the served model's name. When that name is a local model
directory, or a hub id whose config is already in the Hugging Face cache (vLLM downloaded
it), the fingerprint (`deltahub.compose.base.fingerprint`: config and parameter names and
shapes) is computed from a weightless skeleton on the meta device: no weight is read, no
byte downloaded, no remote code run. Otherwise None, and the base is checked by name.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=32)
def served_fingerprint(name: str) -> str | None:
    """`sha256:...` of the model `name` names, or None if its config is not on this machine."""
    try:
        import torch
        from transformers import AutoConfig

        from deltahub.compose.base import _model_class, fingerprint

        config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            skeleton = _model_class(config).from_config(config)
        return fingerprint(skeleton)
    except Exception:  # any config transformers cannot build: fall back to the name check
        return None


__all__ = ["served_fingerprint"]
