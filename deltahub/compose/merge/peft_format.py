"""PEFT LoRA state dicts in and out: split into per-module factors, write the merged config.

Each adapted module holds dW = s B A with B (d_out, r), A (r, d_in) and s = lora_alpha / r
(rsLoRA: lora_alpha / sqrt(r); both per module through rank_pattern / alpha_pattern),
plus a magnitude vector for DoRA. The merged adapter folds every factor scaling into its
B, so its config has lora_alpha = r (and alpha_pattern mirroring rank_pattern): scaling
1, no rsLoRA. Config features that change what the factors mean are refused, since a
merge would be silently wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from deltahub import artifact as af
from deltahub.errors import Unsupported

PEFT_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX, M_SUFFIX = ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector"

# Config features that change what the factors mean; merging them would be silently wrong.
_UNSUPPORTED_FEATURES = {
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "modules_to_save": "modules_to_save (fully trained modules cannot be merged as deltas)",
    "trainable_token_indices": "trainable tokens",
}
_MUST_AGREE = ("layers_to_transform", "layers_pattern", "exclude_modules", "fan_in_fan_out")


@dataclass
class LoraModule:
    """One adapted module of one adapter: dW = scaling * B @ A (DoRA: plus `magnitude`)."""

    A: Tensor  # (r, d_in)
    B: Tensor  # (d_out, r)
    scaling: float
    magnitude: Tensor | None = None  # (d_out,), DoRA only

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]


def peft_key(module: str) -> str:
    """The module's name inside the base model, which PEFT matches patterns against."""
    return module.removeprefix(PEFT_PREFIX)


def lora_modules(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, LoraModule]:
    """Split a PEFT LoRA state dict into modules, each with its scaling s = alpha / r."""
    for key, what in _UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise Unsupported(f"cannot merge an adapter that uses {what} ({key}={config[key]!r})")
    parts: dict[str, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        for suffix, slot in ((A_SUFFIX, "A"), (B_SUFFIX, "B"), (M_SUFFIX, "m"), (M_SUFFIX + ".weight", "m")):
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[slot] = t
                break
        else:
            raise Unsupported(
                f"tensor {name!r} is not a lora_A/lora_B weight or DoRA magnitude; merge handles "
                "LoRA on linear layers only (not embeddings, convolutions, biases or saved modules)"
            )
    out: dict[str, LoraModule] = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise Unsupported(f"module {module} lacks its lora_A or lora_B weight")
        A, B = p["A"], p["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise Unsupported(
                f"module {module}: lora_A {list(A.shape)} / lora_B {list(B.shape)} are not 2-D "
                "factors of one rank; only linear-layer LoRA can be merged"
            )
        r = A.shape[0]
        scaling = af.lora_scaling(dict(config), peft_key(module), r)
        out[module] = LoraModule(A=A, B=B, scaling=scaling, magnitude=p.get("m"))
    return out


def _target_modules_union(configs: Sequence[Mapping[str, Any]]) -> str | list[str]:
    targets = [c.get("target_modules") for c in configs]
    if all(isinstance(t, list) for t in targets):
        return sorted({x for t in targets for x in t})  # type: ignore[union-attr]
    # A regex somewhere: PEFT full-matches a string; a list matches a dotted suffix.
    alternatives = []
    for t in targets:
        if isinstance(t, str):
            alternatives.append(f"({t})")
        elif t:
            alternatives.append(rf"((.*\.)?({'|'.join(re.escape(x) for x in t)}))")
    return "|".join(dict.fromkeys(alternatives))


def output_config(
    configs: Sequence[Mapping[str, Any]], ranks: Mapping[str, int], use_dora: bool
) -> dict[str, Any]:
    """A PEFT LoraConfig dict whose scaling is 1 everywhere (factor scalings are folded in)."""
    for key in _MUST_AGREE:
        values = {repr(c.get(key)) for c in configs}
        if len(values) > 1:
            raise Unsupported(f"the adapters disagree on {key} ({', '.join(sorted(values))}); cannot merge")
    r = max(ranks.values())
    config = dict(configs[0])
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=r,
        use_rslora=False,
        use_dora=use_dora,
        init_lora_weights=True,
        target_modules=_target_modules_union(configs),
        # Exact escaped names, so a pattern can only ever match its own module.
        rank_pattern={re.escape(peft_key(m)): k for m, k in sorted(ranks.items()) if k != r},
        alpha_pattern={re.escape(peft_key(m)): k for m, k in sorted(ranks.items()) if k != r},
    )
    return config


def load_tensors(artifact: af.Artifact) -> dict[str, Tensor]:
    """All tensors of an artifact, read through safetensors (memory-mapped file)."""
    from safetensors import safe_open

    with safe_open(str(artifact.weights_path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
