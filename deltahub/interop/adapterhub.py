"""AdapterHub (`adapters` 1.3) adapter directories into deltahub artifacts, exactly or not at all.

`save_adapter(dir, name, use_safetensors=True)` writes `adapter_config.json` (the
`{"config": {...}, "name": ..., "version": ...}` wrapper, not PEFT's schema) beside
`adapter.safetensors`, and for a model with a prediction head `head_config.json` +
`model_head.safetensors`. `deltahub.artifact.load_dir` (so `publish`, `load_path`) sends
such a directory here; `convert_dir` writes the equivalent deltahub artifact into a
temporary directory and returns its path. The math of every config is in
tests/fixtures/adapterhub/SPEC.md; the fixtures there check every case.

What comes in, and as what:

- bottleneck (`SeqBnConfig` "pfeiffer", `DoubleSeqBnConfig` "houlsby", `ParBnConfig`
  "parallel", and any `BnConfig` equal to one of them, `original_ln_before` either way):
  deltahub's bottleneck method at `placement_version` 2, the same tensors renamed;
- LoRA (`LoRAConfig`, `composition_mode` "add"): PEFT-format LoRA, alpha / r kept; GPT-2's
  fused `c_attn` (q/k/v blocks stacked) becomes one LoRA of rank r * n whose B is block
  shaped, with alpha * n so the scaling stays alpha / r: the same delta, exactly;
- IA3 (`IA3Config`, "scale"): PEFT-format IA3 scaling every target's output, bias included
  (AdapterHub's placement, MLP layers too: no `feedforward_modules`), l = alpha * lora_B;
- a classification head with one layer on the last token (decoders): deltahub's task head.

Refused at the door, with a typed `InvalidArtifact` naming the option: pickle files
(`pytorch_adapter.bin`, never opened), prefix tuning (AdapterHub keeps the tokens at
positions 0..T-1 behind the prefix; deltahub runs prefixes as PEFT does, as a KV cache
that moves them to k..k+T-1, which changes absolute and rotary position encodings),
prompt tuning, ReFT, union / MTL-LoRA configs, gating, layer norms inside adapters,
PHM / invertible / cross adapters, learned or per-channel scaling, per-layer reduction
factors that differ, `original_ln_after=False`, `residual_before_ln` other than true,
DoRA / VeRA, heads other than the one above, unknown config fields and model types.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import read_json_file
from deltahub.interop.adapterhub_methods import (
    MODEL_TYPES,
    _bottleneck,
    _ia3,
    _lora,
    _lora_common,
    unsupported,
)
from deltahub.interop.rawtensors import Raw, read, write
from deltahub.settings import MAX_CONFIG_BYTES

CONFIG_FILE = "adapter_config.json"
WEIGHTS = "adapter.safetensors"
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "model_head.safetensors"
FUSION_CONFIG = "adapter_fusion_config.json"
FUSION_WEIGHTS = "model_adapter_fusion.safetensors"
PICKLES = ("pytorch_adapter.bin", "pytorch_model_head.bin", "pytorch_model_adapter_fusion.bin")
RESAVE = (
    "re-save it as safetensors with `adapters`: model.load_adapter(DIR, load_as=NAME) then "
    "model.save_adapter(NEW_DIR, NAME, use_safetensors=True)"
)
RESAVE_FUSION = (
    "re-save it as safetensors with `adapters`: model.save_adapter_fusion(NEW_DIR, Fuse(...), "
    "use_safetensors=True) after load_adapter_fusion(DIR)"
)


# model types whose key layout and placements were checked against `adapters` 1.3.0
def is_adapterhub_dir(path: Path) -> bool:
    """An AdapterHub save: its adapter_config.json is the {"config", "name"} wrapper, or it
    holds AdapterHub's file names (weights, fusion, pickles) and no deltahub/PEFT weights."""
    if (path / FUSION_CONFIG).is_file() or any((path / p).exists() for p in PICKLES[1:]):
        return True
    if (path / "adapter_model.safetensors").exists():
        return False
    if (path / WEIGHTS).exists() or (path / PICKLES[0]).exists():
        return True
    cfg = path / CONFIG_FILE
    if cfg.is_file() and cfg.stat().st_size <= MAX_CONFIG_BYTES:
        try:
            data = json.loads(cfg.read_bytes())
        except ValueError:
            return False
        return isinstance(data, dict) and isinstance(data.get("config"), dict) and "name" in data
    return False


def refuse_pickles(path: Path) -> None:
    """AdapterHub's pickle files are refused by name, never opened."""
    for name in PICKLES:
        if (path / name).exists():
            how = RESAVE_FUSION if "fusion" in name else RESAVE
            raise InvalidArtifact(
                "pickle-file", f"{path / name} is a pickle file, which deltahub never loads; {how}"
            )


def read_wrapper(path: Path, file: str = CONFIG_FILE) -> dict[str, Any]:
    data = read_json_file(path / file, MAX_CONFIG_BYTES, "config-json")
    if not isinstance(data.get("config"), dict) or not isinstance(data.get("name"), str):
        raise InvalidArtifact("config-schema", f"{file} needs AdapterHub's 'config' object and 'name'")
    return data


def model_family(wrapper: dict[str, Any]) -> tuple[str, str]:
    """(model_type, family) of a save; model types not checked against `adapters` are refused."""
    mt = wrapper.get("model_type")
    if mt not in MODEL_TYPES:
        raise unsupported(
            f"model_type={mt!r}",
            f"imports are checked for {', '.join(sorted(MODEL_TYPES))} only (their placements and key names)",
        )
    return mt, MODEL_TYPES[mt]


# --------------------------------------------------------------------------- heads


def _head(path: Path, family: str) -> tuple[dict[str, Raw], dict[str, Any]] | None:
    if not (path / HEAD_CONFIG).exists():
        return None
    if not (path / HEAD_WEIGHTS).exists():
        raise InvalidArtifact("missing-file", f"{HEAD_CONFIG} without {HEAD_WEIGHTS}")
    wrapper = read_wrapper(path, HEAD_CONFIG)
    cfg, name = wrapper["config"], wrapper["name"]
    drop = f"delete {HEAD_CONFIG} and {HEAD_WEIGHTS} to publish the adapter without its head"
    if cfg.get("head_type") != "classification":
        raise unsupported(f"head_type={cfg.get('head_type')!r}", f"only classification heads import; {drop}")
    if cfg.get("layers") != 1 or cfg.get("use_pooler") or cfg.get("bias") is False:
        raise unsupported(
            f"head layers={cfg.get('layers')!r}, use_pooler={cfg.get('use_pooler')!r}",
            "deltahub's task head is one linear layer with a bias (logits = W pool(H) + b); " + drop,
        )
    if family == "encoder":
        raise unsupported(
            "classification head on the first token ([CLS])",
            f"deltahub's encoder task head pools the mean of the tokens; {drop}",
        )
    raw = read(path / HEAD_WEIGHTS)
    want = {f"heads.{name}.1.weight", f"heads.{name}.1.bias"}
    if set(raw) != want:
        raise InvalidArtifact("config-shape", f"{HEAD_WEIGHTS} holds {sorted(raw)}, expected {sorted(want)}")
    label2id = cfg.get("label2id") or {}
    n = raw[f"heads.{name}.1.weight"].shape[0]
    labels = [str(k) for k, _ in sorted(label2id.items(), key=lambda kv: kv[1])] or [str(i) for i in range(n)]
    tensors = {
        "deltahub_head.classifier.weight": raw[f"heads.{name}.1.weight"],
        "deltahub_head.classifier.bias": raw[f"heads.{name}.1.bias"],
    }
    return tensors, {"type": "classifier", "pooling": "last", "num_labels": n, "labels": labels[:n]}


# --------------------------------------------------------------------------- the directory


def convert(path: Path) -> tuple[dict[str, Any], dict[str, Raw], dict[str, Any]]:
    """(deltahub config, tensors, manifest fields) of an AdapterHub adapter directory."""
    refuse_pickles(path)
    if (path / FUSION_CONFIG).exists():
        raise InvalidArtifact(
            "adapterhub-fusion",
            f"{path} is an AdapterFusion save: publish it with its constituents "
            "(`deltahub.interop.adapterhub_fusion.publish_fusion`, or `deltahub publish` of the fusion directory)",
        )
    if not (path / WEIGHTS).exists():
        raise InvalidArtifact("missing-file", f"{path} has no {WEIGHTS}")
    wrapper = read_wrapper(path)
    cfg, name = wrapper["config"], wrapper["name"]
    mt, family = model_family(wrapper)
    legacy = "version" not in wrapper
    arch = cfg.get("architecture")
    raw = read(path / WEIGHTS)
    if arch in (None, "bottleneck"):
        config, tensors = _bottleneck(cfg, name, family, raw, legacy)
        config["base_model_type"] = mt
    elif arch == "lora":
        _lora_common(cfg)
        scale = cfg.get("composition_mode") == "scale"
        config, tensors = (_ia3 if scale else _lora)(cfg, name, mt, raw)
    elif arch == "prefix_tuning":
        raise unsupported(
            "architecture=prefix_tuning",
            "AdapterHub prepends prefixes while the tokens keep positions 0..T-1; deltahub runs prefix "
            "tuning as PEFT does (a KV cache, tokens at k..k+T-1), which changes absolute and rotary "
            "position encodings, so the outputs would differ",
        )
    else:
        raise unsupported(f"architecture={arch!r}", "deltahub imports bottleneck, LoRA and IA3 adapters")
    extra: dict[str, Any] = {
        "imported_from": {
            "format": "adapterhub",
            "name": name,
            "version": wrapper.get("version"),
            "model_type": mt,
            "model_class": wrapper.get("model_class"),
            "config": cfg,
        }
    }
    head = _head(path, family)
    if head is not None:
        tensors.update(head[0])
        extra["head"] = head[1]
    manifest = {"name": name, "base_model": wrapper.get("model_name") or None, "extra": extra}
    return config, tensors, manifest


def convert_dir(path: Path | str, out: Path | None = None) -> Path:
    """Write the deltahub artifact of an AdapterHub directory to `out` (default: a new
    temporary directory, which the caller owns) and return it."""
    from deltahub.manifest import Manifest

    config, tensors, fields = convert(Path(path))
    target = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="deltahub-adapterhub-"))
    try:
        target.mkdir(parents=True, exist_ok=True)
        write(target / "adapter_model.safetensors", tensors)
        (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        method = "bottleneck" if config.get("method") == "bottleneck" else config["peft_type"].lower()
        manifest = Manifest(
            name=fields["name"], method=method, base_model=fields["base_model"], extra=fields["extra"]
        )
        (target / "deltahub.json").write_bytes(manifest.to_json())
    except BaseException:
        if out is None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return target
