"""deltahub artifacts out as AdapterHub (`adapters` 1.3) directories, torch-free.

`export_adapterhub(registry, ref, directory)` (CLI: `deltahub export REF DIR --format
adapterhub`) writes `adapter_config.json` (the full config dict, `"name"` equal to the name
inside every tensor key, `"version": "adapters.1.3.0"` so that `adapters` applies no legacy
renames, `model_type`, `model_class`, `hidden_size`, `model_name`) and `adapter.safetensors`.
Load it with

    model.load_adapter(DIR, use_safetensors=True)      # the default looks for a .bin file

and the outputs are deltahub's (tests/test_adapterhub.py checks it with `adapters` itself).

- bottleneck: SeqBn / DoubleSeqBn / ParBn fields with deltahub's placement
  (`original_ln_before` as stored), `reduction_factor` = d / b (checked to give b back);
  version-1 parallel adapters on pre-LN decoders read the normalized FFN input, which no
  AdapterHub config does: refused. `target_layers` is refused (AdapterHub's `leave_out`
  needs the base's layer count, and a missing bottleneck would stay at its random init).
- LoRA (PEFT format): one r and alpha for all modules (modules of smaller rank are padded
  with zero rows, which change nothing); GPT-2's fused `c_attn` is written with q, k, v all
  enabled, each block B_q / B_k / B_v of deltahub's B sharing its A. Only the modules
  AdapterHub can adapt (q/k/v, the FFN's `intermediate` and `output` modules) are allowed;
  rsLoRA, DoRA, biases and saved modules are refused. Modules AdapterHub adds that the
  artifact lacks keep their init, B = 0: no change.
- IA3 (PEFT format): output-scaling vectors only (AdapterHub scales outputs; PEFT's
  feed-forward modules scale inputs: refused); a missing module keeps l = 1.
- a task head pooling the last token (decoders): a one-layer classification head.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from deltahub import artifact as af
from deltahub.errors import AlreadyExists, Unsupported
from deltahub.interop.adapterhub_methods import _BN_PARTS, _BN_SITES, MODEL_TYPES
from deltahub.interop.rawtensors import Raw, read, write

VERSION = "adapters.1.3.0"
MODEL_CLASSES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "gpt2": "GPT2Model",
    "llama": "LlamaModel",
    "qwen2": "Qwen2Model",
}
HEAD_MODEL_CLASSES = {"gpt2": "GPT2AdapterModel", "llama": "LlamaAdapterModel", "qwen2": "Qwen2AdapterModel"}
BN_DEFAULTS: dict[str, Any] = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": False, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}  # fmt: skip
LORA_DEFAULTS: dict[str, Any] = {
    "alpha": 8, "architecture": "lora", "attn_matrices": ["q", "v"], "composition_mode": "add", "dropout": 0.0,
    "dtype": None, "init_weights": "lora", "init_weights_seed": None, "intermediate_lora": False,
    "leave_out": [], "output_lora": False, "r": 8, "selfattn_lora": True, "use_dora": False,
    "use_gating": False, "vera_b": None, "vera_d": None,
}  # fmt: skip
_LAYER_RE = re.compile(r"^(?:.*\.)?(?P<layer>encoder\.layer\.\d+|h\.\d+|layers\.\d+)\.(?P<rest>.+)$")
# module (relative to a layer) -> ("q" | "k" | "v" | "qkv" | "intermediate" | "output")
LORA_LOCATIONS = {
    "encoder": {
        "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
        "intermediate.dense": "intermediate", "output.dense": "output",
    },
    "gpt2": {"attn.c_attn": "qkv", "mlp.c_fc": "intermediate", "mlp.c_proj": "output"},
    "llama": {
        "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
        "mlp.down_proj": "intermediate", "mlp.up_proj": "output",  # adapters' names, swapped
    },
    "qwen2": {
        "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
        "mlp.up_proj": "intermediate", "mlp.down_proj": "output",
    },
}  # fmt: skip


def refused(what: str, why: str) -> Unsupported:
    return Unsupported(f"cannot export {what} as an AdapterHub adapter: {why}")


def adapterhub_name(name: str) -> str:
    """AdapterHub puts the name inside tensor keys: no dots or slashes."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", name.rsplit("/", 1)[-1]) or "adapter"


def _split(path: str) -> tuple[str, str]:
    m = _LAYER_RE.match(path)
    if m is None:
        raise refused(path, "it is not inside a transformer layer")
    return m["layer"], m["rest"]


def _model_type(
    config: dict[str, Any], manifest: af.Manifest | None, keys: list[str], given: str | None
) -> str:
    """The base's model type: given, recorded (bottleneck configs, imports), or read off the
    module names where they tell (llama and qwen2 differ only in which MLP module is which)."""
    imported = ((manifest.extra.get("imported_from") or {}) if manifest else {}).get("model_type")
    mt = given or config.get("base_model_type") or imported
    if mt is None:
        if any(".encoder.layer." in f".{k}" for k in keys):
            mt = "bert"  # RoBERTa's layout and locations are BERT's; adapters reads neither field
        elif any(re.search(r"(^|\.)h\.\d+\.", k) for k in keys):
            mt = "gpt2"
        elif any(re.search(r"(^|\.)layers\.\d+\.", k) for k in keys):
            if any(".mlp." in k for k in keys):
                raise refused(
                    "this adapter",
                    "its base could be Llama or Qwen2, whose MLP modules AdapterHub names differently; "
                    "give the model type (--model-type llama|qwen2)",
                )
            mt = "llama"
    if mt not in MODEL_TYPES:
        raise refused(
            f"an adapter for model type {mt!r}", f"checked for {', '.join(sorted(MODEL_TYPES))} only"
        )
    return str(mt)


def _reduction_factor(d: int, b: int) -> float:
    rf = d / b
    for cand in (rf, np.nextafter(rf, 0), np.nextafter(rf, np.inf)):
        if max(1, int(d // float(cand))) == b:
            return float(cand)
    raise refused(f"bottleneck width {b} of {d}", "no reduction_factor gives it")


def _bottleneck(config: dict[str, Any], tensors: dict[str, Raw], mt: str, name: str):
    from deltahub.methods.bottleneck.schema import BottleneckConfig

    cfg = BottleneckConfig.from_dict(config)
    family = MODEL_TYPES[mt]
    if cfg.reads == "input" and family != "encoder":
        raise refused(
            "a placement_version 1 parallel adapter on a pre-LN decoder",
            "it reads the normalized FFN input, which no AdapterHub config reads",
        )
    if cfg.target_layers is not None:
        raise refused("target_layers", "AdapterHub's leave_out needs the base's layer count")
    d, b = cfg.hidden_size, int(cfg.bottleneck_size or 1)
    full = {
        **BN_DEFAULTS,
        "mh_adapter": cfg.variant == "houlsby",
        "is_parallel": cfg.variant == "parallel",
        "init_weights": "mam_adapter" if cfg.variant == "parallel" else "bert",
        "original_ln_before": bool(cfg.original_ln_before),
        "non_linearity": cfg.non_linearity,
        "scaling": float(cfg.scaling),
        "reduction_factor": _reduction_factor(d, b),
    }
    back = {v: k for k, v in _BN_SITES[family].items()}
    parts = {v: k for k, v in _BN_PARTS.items()}
    out: dict[str, Raw] = {}
    for key, t in tensors.items():
        part = next(p for p in parts if key.endswith("." + p))
        layer, site = _split(key[: -len(part) - 1])
        if site not in back:
            raise refused(key, f"AdapterHub has no bottleneck site at {site}")
        out[f"{layer}.{back[site]}.adapters.{name}.{parts[part]}"] = t
    return full, out, d


def _lora_modules(tensors: dict[str, Raw], mt: str, suffixes: tuple[str, ...]) -> dict[str, dict[str, Raw]]:
    locations = LORA_LOCATIONS["encoder" if MODEL_TYPES[mt] == "encoder" else mt]
    modules: dict[str, dict[str, Raw]] = {}
    for key, t in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            raise refused(key, "not a LoRA / IA3 weight (saved modules and biases are not exported)")
        path = key[: -len(suffix) - 1].removeprefix("base_model.model.")
        layer, rest = _split(path)
        if rest not in locations:
            raise refused(
                f"the adapter on {rest}", f"AdapterHub adapts only {', '.join(sorted(locations))} on {mt}"
            )
        modules.setdefault(f"{layer}.{rest}", {})[suffix] = t
    return modules


def _flags(modules: list[str], mt: str) -> dict[str, Any]:
    locations = LORA_LOCATIONS["encoder" if MODEL_TYPES[mt] == "encoder" else mt]
    where = {locations[_split(m)[1]] for m in modules}
    mats = sorted({c for w in where if w in ("q", "k", "v", "qkv") for c in w}, key="qkv".index)
    return {
        "selfattn_lora": bool(mats),
        "attn_matrices": mats or ["q", "v"],
        "intermediate_lora": "intermediate" in where,
        "output_lora": "output" in where,
    }


def _lora(config: dict[str, Any], tensors: dict[str, Raw], mt: str, name: str):
    from deltahub.patterns import lora_scaling

    for opt in ("use_rslora", "use_dora"):
        if config.get(opt):
            raise refused(f"{opt}=true", "AdapterHub's LoRA scales by alpha / r, without DoRA")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise refused("bias / modules_to_save", "AdapterHub's LoRA saves only lora_A and lora_B")
    modules = _lora_modules(tensors, mt, ("lora_A.weight", "lora_B.weight"))
    gpt2 = mt == "gpt2"
    if gpt2 and any(_split(m)[1] == "attn.c_attn" for m in modules):
        _flags_all = {"attn_matrices": ["q", "k", "v"]}
    else:
        _flags_all = {}
    ranks = {m: p["lora_A.weight"].shape[0] for m, p in modules.items()}
    R = max(ranks.values())
    scalings = {m: lora_scaling(config, m, r) for m, r in ranks.items()}
    s0 = next(iter(scalings.values()))
    out: dict[str, Raw] = {}
    for m, p in modules.items():
        A, B = p["lora_A.weight"].array(), p["lora_B.weight"].array()
        dtype = p["lora_A.weight"].dtype
        r = A.shape[0]
        if scalings[m] != s0:  # one alpha / r for all: fold the ratio into B (rounding only)
            B = (B.astype(np.float64) * (scalings[m] / s0)).astype(B.dtype)
        A = np.concatenate([A, np.zeros((R - r, A.shape[1]), A.dtype)])  # zero rank padding
        B = np.concatenate([B, np.zeros((B.shape[0], R - r), B.dtype)], axis=1)
        if gpt2 and _split(m)[1] == "attn.c_attn":
            A = np.concatenate([A, A, A])  # each of q, k, v uses its own copy of A
        out[f"{m}.loras.{name}.lora_A"] = Raw.of(A, dtype)
        out[f"{m}.loras.{name}.lora_B"] = Raw.of(B, dtype)
    full = {**LORA_DEFAULTS, **_flags(list(modules), mt), **_flags_all, "r": R, "alpha": s0 * R}
    return full, out, None


def _ia3(config: dict[str, Any], tensors: dict[str, Raw], mt: str, name: str):
    if config.get("feedforward_modules"):
        raise refused(
            f"feedforward_modules={config['feedforward_modules']!r}",
            "AdapterHub's IA3 scales layer outputs; PEFT's feed-forward modules scale their inputs",
        )
    modules = _lora_modules(tensors, mt, ("ia3_l",))
    out: dict[str, Raw] = {}
    for m, p in modules.items():
        t = p["ia3_l"]
        if len(t.shape) != 2 or t.shape[1] != 1:
            raise refused(f"ia3_l of {m} shaped {list(t.shape)}", "only output scaling (d_out, 1) exports")
        out[f"{m}.loras.{name}.lora_B"] = t
    flags = _flags(list(modules), mt)
    if mt == "gpt2" and flags["selfattn_lora"]:
        flags["attn_matrices"] = ["q", "k", "v"]  # deltahub's c_attn vector covers all three blocks
    full = {
        **LORA_DEFAULTS,
        **flags,
        "r": 1,
        "alpha": 1,
        "composition_mode": "scale",
        "init_weights": "ia3",
    }
    return full, out, None


def _head(
    tensors: dict[str, Raw], manifest: af.Manifest | None, mt: str, name: str, d: int | None
) -> tuple[dict[str, Any], dict[str, Raw]] | None:
    head = {k: t for k, t in tensors.items() if k.startswith(af.TASK_HEAD_PREFIX)}
    if not head:
        return None
    info = (manifest.extra.get("head") if manifest else None) or {}
    if info.get("pooling") != "last" or mt not in HEAD_MODEL_CLASSES:
        raise refused(
            f"the task head (pooling {info.get('pooling')!r})",
            "AdapterHub's heads read the first token on encoders; only last-token heads on decoders export",
        )
    w = head[f"{af.TASK_HEAD_PREFIX}classifier.weight"]
    labels = info.get("labels") or [str(i) for i in range(w.shape[0])]
    config = {
        "config": {
            "activation_function": "tanh", "bias": True, "dropout_prob": None, "head_type": "classification",
            "label2id": {str(lab): i for i, lab in enumerate(labels)}, "layers": 1, "num_labels": w.shape[0],
            "use_pooler": False,
        },
        "hidden_size": d or w.shape[1], "model_class": HEAD_MODEL_CLASSES[mt], "model_name": "",
        "model_type": mt, "name": name, "version": VERSION,
    }  # fmt: skip
    return config, {
        f"heads.{name}.1.weight": w,
        f"heads.{name}.1.bias": head[f"{af.TASK_HEAD_PREFIX}classifier.bias"],
    }


def export_artifact(
    artifact: af.Artifact, directory: Path | str, name: str, model_type: str | None = None
) -> Path:
    """Write `artifact` as an AdapterHub adapter directory named `name` inside its keys."""
    name = adapterhub_name(name)
    out = Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlreadyExists(f"{out} exists and is not an empty directory; choose a new path")
    raw = read(artifact.weights_path)
    tensors = {k: t for k, t in raw.items() if not k.startswith(af.TASK_HEAD_PREFIX)}
    method, config, manifest = artifact.method, artifact.config, artifact.manifest
    mt = _model_type(config, manifest, list(tensors), model_type)
    convert = {"bottleneck": _bottleneck, "lora": _lora, "ia3": _ia3}.get(method)
    if convert is None:
        raise refused(f"a {method} adapter", "only bottleneck, LoRA and IA3 adapters have AdapterHub twins")
    full, weights, d = convert(config, tensors, mt, name)
    if d is None:
        d = next((t.shape[1] for k, t in weights.items() if k.endswith("lora_A")), None)
    head = _head(raw, manifest, mt, name, d)
    wrapper = {
        "config": full,
        "hidden_size": d,
        "model_class": MODEL_CLASSES[mt],
        "model_name": (manifest.base_model if manifest else None) or "",
        "model_type": mt,
        "name": name,
        "version": VERSION,
    }
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp / "adapter.safetensors", weights)
        (tmp / "adapter_config.json").write_text(json.dumps(wrapper, indent=2, sort_keys=True) + "\n")
        if head is not None:
            write(tmp / "model_head.safetensors", head[1])
            (tmp / "head_config.json").write_text(json.dumps(head[0], indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_adapterhub(
    registry: Any, ref: str, directory: Path | str, name: str | None = None, model_type: str | None = None
) -> Path:
    """`deltahub export REF DIR --format adapterhub`: the registry version `ref` as an
    AdapterHub directory; `adapters` loads it with `load_adapter(DIR, use_safetensors=True)`."""
    version = registry.resolve(ref)
    if version.method == "fusion":
        raise refused("a fusion", "export its constituents one by one")
    return export_artifact(registry.open(version), directory, name or version.full_name, model_type)
