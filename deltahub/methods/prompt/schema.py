"""Soft prompts' artifact schemas (PEFT's formats unchanged), torch-free.

adapter_config.json: `{"peft_type": "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING", "num_virtual_tokens": k,
"token_dim": d, "num_layers": L, ...}`; one tensor `prompt_embeddings`: (k, d) for prompt
tuning, (k, L * 2 * token_dim) for prefix tuning (token_dim is the key/value width; the MLP
of `prefix_projection` is never stored, nor P-tuning's encoder: (k, d) is its output).
P-tuning v2 artifacts are prefix-tuning ones.
"""

from __future__ import annotations

from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TASK_HEAD_PREFIX, TensorInfo
from deltahub.methods.checks import bad, is_int, short
from deltahub.methods.lora import extras as ex


def _check_virtual_tokens(config: dict[str, Any], tensors: dict[str, TensorInfo], prefix: bool) -> None:
    k = config.get("num_virtual_tokens")
    if not is_int(k) or k <= 0:
        raise bad(f"num_virtual_tokens must be a positive integer, got {short(k)}")
    for key in ("num_transformer_submodules", "token_dim", "num_layers"):
        value = config.get(key)
        if value is not None and not (is_int(value) and value > 0):
            raise bad(f"{key} must be a positive integer or null, got {short(value)}")
    names = [n for n in tensors if not n.startswith(TASK_HEAD_PREFIX)]
    if "prompt_embeddings" not in names:
        raise InvalidArtifact("config-shape", f"expected a tensor 'prompt_embeddings', got {names}")
    # A SEQ_CLS artifact saves its classifier too (modules_to_save, `base_model.<module>.*`).
    method = str(config.get("peft_type", "")).lower()
    ex.classify(config, [n for n in names if n != "prompt_embeddings"], set(), method, ex.PROMPT_PREFIX)
    shape = tensors["prompt_embeddings"].shape
    subs = config.get("num_transformer_submodules") or 1
    if subs != 1:
        raise InvalidArtifact(
            "unsupported-option",
            f"num_transformer_submodules={subs} (an encoder-decoder's prompts) is not supported; "
            "deltahub runs soft prompts on decoder-only and encoder-only models",
        )
    if len(shape) != 2 or shape[0] != k * subs:
        raise InvalidArtifact(
            "shape-mismatch", f"prompt_embeddings has shape {list(shape)}, expected [{k}, ...]"
        )
    width = config.get("token_dim")
    if prefix:
        # With prefix_projection PEFT still saves the computed prefixes, never the MLP.
        layers = config.get("num_layers")
        if is_int(layers) and is_int(width) and shape[1] != layers * 2 * width:
            raise InvalidArtifact(
                "shape-mismatch",
                f"prompt_embeddings has width {shape[1]}, expected num_layers * 2 * token_dim",
            )
    elif is_int(width) and shape[1] != width:
        raise InvalidArtifact(
            "shape-mismatch", f"prompt_embeddings has width {shape[1]}, token_dim is {width}"
        )


def check_prompt_tuning(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Prompt tuning: one (k, d) `prompt_embeddings`."""
    _check_virtual_tokens(config, tensors, prefix=False)


def check_p_tuning(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """P-tuning: one (k, d) `prompt_embeddings`, the prompt encoder's output (PEFT never
    saves the encoder itself)."""
    _check_virtual_tokens(config, tensors, prefix=False)


def check_prefix_tuning(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Prefix tuning: one (k, L * 2 * token_dim) `prompt_embeddings`, no MLP."""
    _check_virtual_tokens(config, tensors, prefix=True)
