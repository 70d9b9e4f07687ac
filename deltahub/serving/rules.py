"""What each serving engine refuses in an adapter, found before serving time (torch-free).

`check_servable(artifact, target, served_base=...)` reads an artifact's config, tensor
names and manifest and returns every rule the target would break, each with the reason
and the fix. Targets:

    vllm    vLLM's multi-LoRA engine. Followed: vLLM's `PEFTHelper` (vllm/lora/peft_helper.py:
            `_validate_features` refuses `modules_to_save` and DoRA; `validate_legal`
            refuses adapter bias and a rank above `max_lora_rank`), `LoRAConfig.max_lora_rank`
            (vllm/config/lora.py: `MaxLoRARanks = 1, 8, 16, 32, 64, 128, 256, 320, 512`), and
            the model classes that implement `SupportsLoRA` (GPT-2, BERT and others do not).
            Published interface followed: vLLM v0.11 - v0.26 (request.py's msgspec `LoRARequest`).
    lorax   LoRAX (predibase/lorax): PEFT LoRA adapters; the same feature refusals as vLLM,
            without the rank set.
    peft    `PeftModel.from_pretrained`: any PEFT method (`peft_type` in the config);
            deltahub-only methods (bottleneck, SSF, fusion, ...) are refused.

A refusal that `deltahub export --target vllm --convert` can remove (DoRA, IA3, a rank
too high) says so (`convertible`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltahub.artifact import Artifact
from deltahub.errors import InvalidConfig
from deltahub.fileformat import TASK_HEAD_PREFIX
from deltahub.methods.lora import extras as ex
from deltahub.patterns import pattern_value

TARGETS = ("vllm", "lorax", "peft")

# vllm/config/lora.py: the values `--max-lora-rank` accepts.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Architectures whose vLLM model class implements SupportsLoRA, and the (HF checkpoint)
# leaf module names vLLM adapts in them: every linear layer of a decoder block (vLLM packs
# q/k/v into qkv_proj and gate/up into gate_up_proj, and maps PEFT's names onto them).
_DECODER = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
VLLM_LORA_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _DECODER,
    "MistralForCausalLM": _DECODER,
    "MixtralForCausalLM": frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}),
    "Qwen2ForCausalLM": _DECODER,
    "Qwen3ForCausalLM": _DECODER,
    "GemmaForCausalLM": _DECODER,
    "Gemma2ForCausalLM": _DECODER,
    "Phi3ForCausalLM": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
}
# Architectures vLLM runs but whose model class does not implement SupportsLoRA.
VLLM_NO_LORA = frozenset(
    {"GPT2LMHeadModel", "BertModel", "BertForSequenceClassification", "RobertaModel", "GPTNeoXForCausalLM"}
)
# Embedding and output layers: outside every engine's LoRA layers in deltahub's reading.
EMBEDDING_LEAVES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out"})

_LLAMA_PATH = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+")
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_EMBEDDING_FACTORS = (".lora_embedding_A", ".lora_embedding_B")


@dataclass(frozen=True)
class Finding:
    """One rule a target would break: `rule` (a stable key), why, and how to fix it."""

    rule: str
    message: str
    fix: str = ""
    convertible: bool = False


@dataclass
class Servability:
    """What `target` would do with one adapter: `refusals` (it will not load) and
    `notes` (it loads, given the flag or fact named)."""

    target: str
    ref: str | None
    digest: str | None
    refusals: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refusals

    @property
    def convertible(self) -> bool:
        """True if `export --convert` removes every refusal."""
        return bool(self.refusals) and all(f.convertible for f in self.refusals)

    def summary(self) -> str:
        """One line: `yes`, `yes (needs --max-lora-rank 8)` or `no: dora, bias`."""
        if self.ok:
            flags = [n.fix for n in self.notes if n.rule == "max-lora-rank"]
            return "yes" + (f" ({flags[0]})" if flags else "")
        rules = ", ".join(dict.fromkeys(f.rule for f in self.refusals))
        return f"no: {rules}" + (" (export --convert fixes it)" if self.convertible else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ref": self.ref,
            "digest": self.digest,
            "servable": self.ok,
            "convertible": self.convertible,
            "refusals": [asdict(f) for f in self.refusals],
            "notes": [asdict(f) for f in self.notes],
        }


def lora_modules(tensors: dict[str, Any]) -> dict[str, str]:
    """{module path in the base: "linear" | "embedding"} of the LoRA factors."""
    out: dict[str, str] = {}
    for name in tensors:
        for suffix in _FACTOR_SUFFIXES:
            if name.endswith(suffix):
                out[name[: -len(suffix)].removeprefix(ex.PREFIX)] = "linear"
        for suffix in _EMBEDDING_FACTORS:
            if name.endswith(suffix):
                out[name[: -len(suffix)].removeprefix(ex.PREFIX)] = "embedding"
    return out


def max_rank(config: dict[str, Any], modules: list[str]) -> int:
    """The largest rank of any module (`r`, or its `rank_pattern` entry)."""
    r = int(config.get("r") or 0)
    return max([pattern_value(config.get("rank_pattern"), m, r) for m in modules] or [r])


def needed_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` value vLLM accepts that holds `rank`, or None."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)


def architecture_of(base: str | None, modules: list[str]) -> str | None:
    """The base's architecture: from `config.json` when `base` is a local model directory,
    else guessed from the adapted module paths (GPT-2's `transformer.h.N`, Llama-style
    `model.layers.N.self_attn`), else None."""
    if base:
        cfg = Path(base).expanduser() / "config.json"
        try:
            archs = json.loads(cfg.read_text()).get("architectures") or []
            if archs:
                return str(archs[0])
        except (OSError, ValueError, AttributeError):
            pass
    if any(m.startswith("transformer.h.") for m in modules):
        return "GPT2LMHeadModel"
    # Llama, Mistral, Qwen2/3 and Gemma name their blocks alike and vLLM adapts the same
    # linear layers in each: the family is enough for the module check.
    if modules and all(_LLAMA_PATH.fullmatch(m) for m in modules):
        return "LlamaForCausalLM"
    return None


def _extras(tensors: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """(modules_to_save / head keys, bias keys, saved embedding weights) among the tensors."""
    saved, bias, emb = [], [], []
    for name in tensors:
        if name.endswith((*_FACTOR_SUFFIXES, *_EMBEDDING_FACTORS, ".lora_magnitude_vector")):
            continue
        if name.startswith(TASK_HEAD_PREFIX) or ".modules_to_save." in name or ".original_module." in name:
            saved.append(name)
        elif name.endswith(".bias"):
            bias.append(name)
        elif name.endswith(".weight") and name.split(".")[-2] in (*EMBEDDING_LEAVES, "base_layer"):
            emb.append(name)
        else:
            saved.append(name)
    return saved, bias, emb


def base_matches(expected: str | None, served: str) -> bool:
    """Whether a served model name is the adapter's base id (trailing slashes and a
    local directory named like the id's last part count as the same)."""
    if not expected:
        return True
    a, b = expected.rstrip("/"), served.rstrip("/")
    return a == b or (Path(b).name == a.rsplit("/", 1)[-1] and Path(b).expanduser().is_dir())


def check_servable(
    artifact: Artifact,
    target: str,
    *,
    served_base: str | None = None,
    served_fingerprint: str | None = None,
    ref: str | None = None,
    digest: str | None = None,
) -> Servability:
    """Every rule `target` would break with this artifact (see the module docstring).

    `served_base` is the model name the engine serves (vLLM passes it to the resolver);
    `served_fingerprint`, when known, decides the base check instead of the names.
    """
    if target not in TARGETS:
        raise InvalidConfig(f"target {target!r} is not known; use one of {', '.join(TARGETS)}")
    config, tensors, manifest = artifact.config, artifact.tensors, artifact.manifest
    method = artifact.method
    report = Servability(target, ref, digest)
    refuse, note = report.refusals.append, report.notes.append

    base_id = (manifest.base_model if manifest else None) or config.get("base_model_name_or_path")
    base_fp = manifest.base_fingerprint if manifest else None
    if served_base is not None:
        if served_fingerprint and base_fp:
            if served_fingerprint != base_fp:
                refuse(
                    Finding(
                        "base-mismatch",
                        f"the served model {served_base!r} has fingerprint {served_fingerprint[:19]}, "
                        f"the adapter was trained on {base_id or 'another base'} ({base_fp[:19]})",
                        "serve the adapter's base model, or pick an adapter trained on this one",
                    )
                )
        elif not base_matches(base_id, served_base):
            refuse(
                Finding(
                    "base-mismatch",
                    f"the adapter's base model is {base_id!r}, the served model is {served_base!r}",
                    "serve the adapter's base model, or pick an adapter trained on this one",
                )
            )
        elif not base_id:
            note(Finding("base-unknown", "the adapter names no base model: the base could not be checked"))

    if target == "peft":
        if "peft_type" not in config:
            refuse(
                Finding(
                    "method",
                    f"{method} is a deltahub method; PEFT has no loader for it",
                    "load it with deltahub (AdaptedModel.load)",
                )
            )
        return report

    if method != "lora":
        convertible = method == "ia3"
        refuse(
            Finding(
                "method",
                f"{target} serves LoRA adapters only; this one is {method}",
                "export --target vllm --convert --base BASE (IA3 -> LoRA)" if convertible else "",
                convertible,
            )
        )
        return report

    modules = lora_modules(tensors)
    if config.get("use_dora"):
        refuse(
            Finding(
                "dora",
                f"{target} does not run DoRA (use_dora=true)",
                "export --target vllm --convert --base BASE --rank R (plain LoRA by SVD of the exact update)",
                True,
            )
        )
    saved, bias, emb = _extras(tensors)
    if config.get("modules_to_save") or saved:
        what = config.get("modules_to_save") or sorted({k.removeprefix(ex.PREFIX) for k in saved})[:3]
        refuse(
            Finding(
                "modules-to-save",
                f"{target} loads LoRA factors only, not saved whole modules ({what})",
                "retrain without modules_to_save (or serve the merged model: export --merged)",
            )
        )
    lora_bias = config.get("lora_bias") or any(k.endswith(".lora_B.bias") for k in tensors)
    if config.get("bias", "none") not in (None, "none") or lora_bias or bias:
        refuse(
            Finding(
                "bias",
                f"{target} does not load adapter biases (bias={config.get('bias', 'none')!r}, "
                f"lora_bias={bool(config.get('lora_bias'))})",
                "retrain with bias='none' and lora_bias=false (or serve the merged model: export --merged)",
            )
        )
    embedded = sorted(m for m, kind in modules.items() if kind == "embedding")
    if emb or embedded:
        refuse(
            Finding(
                "target-modules",
                f"{target} does not adapt embedding layers ({(embedded or emb)[0]})",
                "retrain without the embedding in target_modules",
            )
        )
    if target == "vllm":
        rank = max_rank(config, list(modules))
        needed = needed_max_lora_rank(rank)
        if needed is None:
            refuse(
                Finding(
                    "rank",
                    f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})",
                    f"export --target vllm --convert --rank {VLLM_MAX_LORA_RANKS[-1]} (truncated SVD)",
                    True,
                )
            )
        else:
            note(
                Finding(
                    "max-lora-rank",
                    f"rank {rank}: vLLM needs --max-lora-rank {needed} or more (the default is 16)",
                    f"--max-lora-rank {needed}",
                )
            )
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            note(
                Finding(
                    "per-module-rank",
                    "rank_pattern / alpha_pattern give modules their own rank or alpha; vLLM versions "
                    "before their support apply r and lora_alpha everywhere",
                    "export --target vllm --convert --base BASE (one rank, scaling 1, same outputs at full rank)",
                )
            )
        arch = architecture_of(served_base or base_id, list(modules))
        if arch in VLLM_NO_LORA:
            refuse(
                Finding(
                    "architecture",
                    f"vLLM's {arch} does not implement SupportsLoRA",
                    "serve the merged model instead: deltahub export REF DIR --merged --base BASE",
                )
            )
        elif arch in VLLM_LORA_MODULES:
            allowed = VLLM_LORA_MODULES[arch]
            outside = sorted(
                {m.rsplit(".", 1)[-1] for m, k in modules.items() if k == "linear"}
                - allowed
                - EMBEDDING_LEAVES
            )
            if outside:
                refuse(
                    Finding(
                        "target-modules",
                        f"vLLM adapts {', '.join(sorted(allowed))} in {arch}, not {', '.join(outside)}",
                        "retrain with target_modules among those",
                    )
                )
        else:
            note(
                Finding(
                    "architecture-unknown",
                    f"deltahub does not know which modules vLLM adapts in {arch or 'this base'}; vLLM checks at load",
                )
            )
    return report


__all__ = [
    "TARGETS",
    "VLLM_MAX_LORA_RANKS",
    "Finding",
    "Servability",
    "architecture_of",
    "check_servable",
    "lora_modules",
    "needed_max_lora_rank",
]
