"""AdapterHub (`adapters` 1.3) configs and weights of the methods deltahub shares, converted.

Bottleneck adapters, LoRA and IA3: the key layout per architecture (tests/fixtures/
adapterhub/SPEC.md 1.3, 2), the config checks that refuse what deltahub cannot run exactly
(naming the option), and the conversions to deltahub's bottleneck and PEFT's LoRA / IA3
formats. `deltahub.interop.adapterhub` reads the directory and calls these.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from deltahub.errors import InvalidArtifact
from deltahub.interop.rawtensors import Raw

MODEL_TYPES = {
    "bert": "encoder",
    "roberta": "encoder",
    "gpt2": "gpt2",
    "llama": "decoder",
    "qwen2": "decoder",
}
# the wrappers' prefixes an AdapterModel / *For* model puts in front of the bare model's keys
_PREFIX = r"(?:(?:bert|roberta|transformer|model)\.)?"
_LAYER = r"(?P<layer>encoder\.layer\.\d+|h\.\d+|layers\.\d+)"
# bottleneck location in AdapterHub's keys -> the module whose output deltahub's adapter changes
_BN_SITES = {
    "encoder": {"attention.output": "attention.output.dense", "output": "output.dense"},
    "gpt2": {"attention_adapters": "attn.c_proj", "output_adapters": "mlp"},
    "decoder": {"attention_adapters": "self_attn.o_proj", "output_adapters": "mlp"},
}
_BN_PARTS = {
    "adapter_down.0.weight": "adapter_down.weight",
    "adapter_down.0.bias": "adapter_down.bias",
    "adapter_up.weight": "adapter_up.weight",
    "adapter_up.bias": "adapter_up.bias",
}
_BN_KEY = re.compile(
    rf"^{_PREFIX}{_LAYER}\.(?P<loc>attention\.output|output|attention_adapters|output_adapters)"
    rf"\.adapters\.(?P<name>[^.]+)\.(?P<part>{'|'.join(re.escape(p) for p in _BN_PARTS)})$"
)
_LORA_KEY = re.compile(
    rf"^{_PREFIX}(?P<path>(?:encoder\.layer\.\d+|h\.\d+|layers\.\d+)\..+?)"
    r"\.loras\.(?P<name>[^.]+)\.(?P<part>lora_A|lora_B)$"
)
_ACTS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "swish": "swish",
    "silu": "silu",
    "tanh": "tanh",
}

# every field of BnConfig; those not in _BN_CHECKED only matter for training (init,
# dropout) or are unused without the option that enables them (phm_* without phm_layer)
BN_FIELDS = {
    "adapter_residual_before_ln", "cross_adapter", "dropout", "factorized_phm_W", "factorized_phm_rule",
    "hypercomplex_nonlinearity", "init_weights", "init_weights_seed", "inv_adapter",
    "inv_adapter_reduction_factor", "is_parallel", "learn_phm", "leave_out", "ln_after", "ln_before",
    "mh_adapter", "non_linearity", "original_ln_after", "original_ln_before", "output_adapter",
    "phm_bias", "phm_c_init", "phm_dim", "phm_init_range", "phm_layer", "phm_rank", "reduction_factor",
    "residual_before_ln", "scaling", "shared_W_phm", "shared_phm_rule", "stochastic_depth", "use_gating",
    "architecture",
}  # fmt: skip
LORA_FIELDS = {
    "alpha", "architecture", "attn_matrices", "composition_mode", "dropout", "dtype", "init_weights",
    "init_weights_seed", "intermediate_lora", "leave_out", "output_lora", "r", "selfattn_lora", "use_dora",
    "use_gating", "vera_b", "vera_d",
}  # fmt: skip


def unsupported(option: str, why: str) -> InvalidArtifact:
    """An AdapterHub option deltahub cannot run exactly: refused, naming it."""
    return InvalidArtifact("adapterhub-unsupported", f"AdapterHub option {option}: {why}")


# --------------------------------------------------------------------------- bottleneck


def bottleneck_config(cfg: dict[str, Any], legacy: bool) -> dict[str, Any]:
    """deltahub's bottleneck fields for one AdapterHub BnConfig (hidden/bottleneck sizes apart)."""
    unknown = set(cfg) - BN_FIELDS
    if unknown:
        raise unsupported(", ".join(sorted(unknown)), "not a field of adapters 1.3.0's BnConfig")
    for opt, ok in (
        ("ln_before", False), ("ln_after", False), ("use_gating", False), ("phm_layer", False),
        ("cross_adapter", False), ("adapter_residual_before_ln", False), ("original_ln_after", True),
    ):  # fmt: skip
        if cfg.get(opt, ok) != ok:
            raise unsupported(f"{opt}={cfg.get(opt)!r}", f"deltahub's bottleneck adapters have {opt}={ok}")
    if cfg.get("inv_adapter") is not None:
        raise unsupported(f"inv_adapter={cfg['inv_adapter']!r}", "invertible adapters are not supported")
    mh, out, par = bool(cfg.get("mh_adapter")), bool(cfg.get("output_adapter")), bool(cfg.get("is_parallel"))
    if not out:
        raise unsupported("output_adapter=false", "every deltahub variant has the FFN (output) adapter")
    if par and mh:
        raise unsupported(
            "mh_adapter=true with is_parallel=true", "parallel adapters sit beside the FFN only"
        )
    variant = "parallel" if par else ("houlsby" if mh else "pfeiffer")
    if not par and cfg.get("residual_before_ln", True) is not True:
        raise unsupported(
            f"residual_before_ln={cfg.get('residual_before_ln')!r}",
            "deltahub's serial adapters add the sub-layer output h as their residual (true)",
        )
    act = str(cfg.get("non_linearity", "relu")).lower()
    if legacy:  # adapters' loader renames these for configs saved without "version"
        act = {"gelu": "gelu_new", "gelu_orig": "gelu"}.get(act, act)
    if act not in _ACTS:
        raise unsupported(f"non_linearity={act!r}", f"deltahub's are {', '.join(sorted(_ACTS))}")
    scaling = cfg.get("scaling", 1.0)
    if not isinstance(scaling, float):
        raise unsupported(
            f"scaling={scaling!r}", "only a fixed float scaling is supported (not learned/channel)"
        )
    out_cfg: dict[str, Any] = {
        "method": "bottleneck",
        "variant": variant,
        "non_linearity": _ACTS[act],
        "scaling": scaling,
        "placement_version": 2,
    }
    if not par:
        out_cfg["original_ln_before"] = bool(cfg.get("original_ln_before"))
    return out_cfg


def _reduction_ok(cfg: dict[str, Any], d: int, b: int) -> None:
    rf = cfg.get("reduction_factor")
    if isinstance(rf, dict):
        values = set(json.dumps(v) for v in rf.values())
        if len(values) > 1:
            raise unsupported(f"reduction_factor={rf!r}", "a bottleneck width per layer is not supported")
        rf = next(iter(rf.values()), None)
    if isinstance(rf, (int, float)) and not isinstance(rf, bool) and rf > 0 and max(1, int(d // rf)) != b:
        raise InvalidArtifact(
            "shape-mismatch", f"reduction_factor {rf} gives width {int(d // rf)}, tensors have {b}"
        )


def _bottleneck(cfg: dict[str, Any], name: str, family: str, raw: dict[str, Raw], legacy: bool):
    out_cfg = bottleneck_config(cfg, legacy)
    sites = _BN_SITES[family]
    tensors: dict[str, Raw] = {}
    layers: set[int] = set()
    for key, t in raw.items():
        m = _BN_KEY.match(key)
        if m is None:
            raise InvalidArtifact("config-shape", f"tensor {key!r} is not an AdapterHub bottleneck weight")
        if m["name"] != name:
            raise InvalidArtifact(
                "config-shape", f"tensor {key!r} is named {m['name']!r}, the config {name!r}"
            )
        if m["loc"] not in sites:
            raise InvalidArtifact("config-shape", f"tensor {key!r}: no {m['loc']} site in this architecture")
        tensors[f"{m['layer']}.{sites[m['loc']]}.{_BN_PARTS[m['part']]}"] = t
        layers.add(int(m["layer"].rsplit(".", 1)[1]))
    downs = [t for k, t in tensors.items() if k.endswith("adapter_down.weight")]
    if not downs:
        raise InvalidArtifact("config-shape", "an AdapterHub bottleneck adapter without weights")
    b, d = downs[0].shape
    _reduction_ok(cfg, d, b)
    out_cfg.update(hidden_size=d, bottleneck_size=b)
    if cfg.get("leave_out"):
        out_cfg["target_layers"] = sorted(layers)
    return out_cfg, tensors


# --------------------------------------------------------------------------- LoRA and IA3


def _lora_common(cfg: dict[str, Any]) -> None:
    unknown = set(cfg) - LORA_FIELDS
    if unknown:
        raise unsupported(", ".join(sorted(unknown)), "not a field of adapters 1.3.0's LoRAConfig")
    for opt in ("use_gating", "use_dora"):
        if cfg.get(opt):
            raise unsupported(f"{opt}=true", "not supported on import")
    for opt in ("vera_d", "vera_b"):
        if cfg.get(opt) is not None:
            raise unsupported(f"{opt}={cfg[opt]!r}", "VeRA is not supported")
    if cfg.get("composition_mode") not in ("add", "scale"):
        raise unsupported(f"composition_mode={cfg.get('composition_mode')!r}", "only add (LoRA), scale (IA3)")


def _qkv_slices(cfg: dict[str, Any]) -> list[int]:
    """Which of GPT-2's fused c_attn output slices (q=0, k=1, v=2) the adapter has, in order."""
    mats = cfg.get("attn_matrices") or []
    return [i for i, m in enumerate("qkv") if m in mats]


def _lora_modules(raw: dict[str, Raw], name: str) -> dict[str, dict[str, Raw]]:
    modules: dict[str, dict[str, Raw]] = {}
    for key, t in raw.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise InvalidArtifact("config-shape", f"tensor {key!r} is not an AdapterHub LoRA weight")
        if m["name"] != name:
            raise InvalidArtifact(
                "config-shape", f"tensor {key!r} is named {m['name']!r}, the config {name!r}"
            )
        modules.setdefault(m["path"], {})[m["part"]] = t
    if not modules:
        raise InvalidArtifact("config-shape", "an AdapterHub LoRA adapter without weights")
    return modules


def _lora(cfg: dict[str, Any], name: str, mt: str, raw: dict[str, Raw]):
    r, alpha = cfg.get("r"), cfg.get("alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)):
        raise InvalidArtifact("config-schema", f"LoRA r={r!r}, alpha={alpha!r} are not numbers")
    prefix = "base_model.model."
    tensors: dict[str, Raw] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for path, parts in _lora_modules(raw, name).items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise InvalidArtifact("shape-mismatch", f"module {path} lacks lora_A or lora_B")
        A, B = parts["lora_A"], parts["lora_B"]
        if mt == "gpt2" and path.endswith("attn.c_attn"):
            slices = _qkv_slices(cfg)
            n = len(slices)
            d = B.shape[0] // max(n, 1)
            if n == 0 or A.shape[0] != r * n or B.shape != (d * n, r):
                raise InvalidArtifact(
                    "shape-mismatch", f"{path}: fused q/k/v LoRA shapes {A.shape}, {B.shape}"
                )
            b = B.array()
            full = np.zeros((3 * d, r * n), dtype=b.dtype)
            for g, s in enumerate(slices):  # slice s of the output gets B_g A_g
                full[s * d : (s + 1) * d, g * r : (g + 1) * r] = b[g * d : (g + 1) * d]
            B = Raw.of(full, B.dtype)
            if n > 1:
                rank_pattern["c_attn"], alpha_pattern["c_attn"] = r * n, alpha * n
        tensors[f"{prefix}{path}.lora_A.weight"] = A
        tensors[f"{prefix}{path}.lora_B.weight"] = B
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(p[len(prefix) : -len(".lora_A.weight")] for p in tensors if "lora_A" in p),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": mt == "gpt2",
        "lora_dropout": 0.0,
        "task_type": None,
    }
    return config, tensors


def _ia3(cfg: dict[str, Any], name: str, mt: str, raw: dict[str, Raw]):
    alpha = cfg.get("alpha", 1)
    if cfg.get("r", 1) != 1 or not isinstance(alpha, (int, float)):
        raise InvalidArtifact(
            "config-schema", f"IA3 needs r=1 and a number alpha, got {cfg.get('r')!r}, {alpha!r}"
        )
    prefix = "base_model.model."
    tensors: dict[str, Raw] = {}
    for path, parts in _lora_modules(raw, name).items():
        if set(parts) != {"lora_B"} or len(parts["lora_B"].shape) != 2 or parts["lora_B"].shape[1] != 1:
            raise InvalidArtifact("shape-mismatch", f"IA3 module {path} needs one lora_B (out, 1)")
        B = parts["lora_B"]
        vec = B.array().astype(np.float32) * np.float32(alpha)  # as adapters computes alpha * l
        if mt == "gpt2" and path.endswith("attn.c_attn"):
            slices = _qkv_slices(cfg)
            d = B.shape[0] // max(len(slices), 1)
            full = np.ones((3 * d, 1), dtype=np.float32)  # disabled slices are not scaled
            for g, s in enumerate(slices):
                full[s * d : (s + 1) * d] = vec[g * d : (g + 1) * d]
            vec = full
        tensors[f"{prefix}{path}.ia3_l"] = Raw.of(vec, B.dtype)
    config = {
        "peft_type": "IA3",
        "target_modules": sorted(k[len(prefix) : -len(".ia3_l")] for k in tensors),
        "feedforward_modules": [],  # AdapterHub scales every target's output, MLP layers too
        "fan_in_fan_out": mt == "gpt2",
        "task_type": None,
    }
    return config, tensors
