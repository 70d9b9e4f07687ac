"""What a PEFT artifact saves besides its factors, read the way PEFT loads it (torch-free).

PEFT's `get_peft_model_state_dict` writes, next to the method's own tensors:

- `modules_to_save` (PEFT adds `["classifier", "score"]` itself for SEQ_CLS): the whole
  state of each listed module, trained as a copy, under the module's own name
  (`base_model.model.classifier.weight`). PEFT matches a module when its full name
  `endswith` an entry (plain string test, `_set_trainable`). With `bias="all"` PEFT also
  saves `<m>.modules_to_save.bias` and `<m>.original_module.bias`; loading drops the
  first and writes the second into the untouched original, so neither changes the
  adapted model: we keep them for export only.
- `bias="all"`: every `.bias` of the model; `bias="lora_only"`: the biases of the
  LoRA-targeted modules, `<m>.base_layer.bias`. Loading writes them into the base's own
  parameters (they were trained in place).
- `save_embedding_layers`: the full weight of a targeted embedding or output layer
  (`<m>.base_layer.weight`), or of an untargeted one whose vocabulary was resized
  (`<m>.weight`). Loading writes it into the base's parameter.

deltahub runs all three exactly as PEFT computes, but only while the adapter is active
(`deltahub.methods.lora.saved`): a saved module computes with its saved state, a saved
parameter replaces the base's (in every module that shares it: PEFT's in-place write
reaches tied weights too). `classify` sorts the keys, refusing at publish any key that
PEFT's config would not have produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deltahub.errors import InvalidArtifact

PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."  # the soft prompts' PeftModel wraps the base one level less deep
# PEFT's duplicates of a saved module's bias under bias="all" (see the module docstring).
IGNORED_PARTS = ("modules_to_save", "original_module")


@dataclass(frozen=True)
class Extra:
    """One saved tensor that is not a factor: `kind` "module" (part of a modules_to_save
    module's state), "param" (replaces a base parameter) or "ignored" (export only)."""

    key: str
    kind: str
    module: str  # module path in the base
    name: str  # the tensor's name inside that module ("weight", "dense.bias", ...)


def saved_module_of(path: str, modules_to_save: list[str]) -> tuple[str, str] | None:
    """(module, rest) for the shortest dotted prefix of `path` that PEFT's
    `modules_to_save` matching (`endswith`) selects; None if there is none."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        module = ".".join(parts[:i])
        if any(module.endswith(t) for t in modules_to_save):
            return module, ".".join(parts[i:])
    return None


def modules_to_save_of(config: dict[str, Any]) -> list[str]:
    mts = config.get("modules_to_save")
    if mts is None:
        return []
    if not isinstance(mts, list) or not all(isinstance(t, str) and t for t in mts):
        raise InvalidArtifact("config-schema", f"modules_to_save must be a list of module names, got {mts!r}")
    return list(mts)


def bias_mode(config: dict[str, Any]) -> str:
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise InvalidArtifact(
            "config-schema",
            f"bias must be 'none', 'all' or 'lora_only', got {bias!r} (PEFT's LoraConfig.bias)",
        )
    return str(bias)


def classify(
    config: dict[str, Any], keys: list[str], adapted: set[str], method: str, prefix: str = PREFIX
) -> list[Extra]:
    """Sort the non-factor `keys` of an artifact whose factors sit on modules `adapted`.

    `prefix` is what PEFT puts before module names: `base_model.model.` for LoRA and
    IA3, `base_model.` for the soft prompts (whose SEQ_CLS artifacts save the head too).
    Raises `InvalidArtifact` naming the first key that the config does not explain.
    """
    mts = modules_to_save_of(config)
    bias = bias_mode(config) if method == "lora" else "none"
    for module in adapted:
        hit = saved_module_of(module + ".x", mts)
        if hit is not None:
            raise InvalidArtifact(
                "config-shape",
                f"module {module} carries {method} factors inside modules_to_save module {hit[0]}; "
                "PEFT trains such a module as a whole copy, so target one or the other",
            )
    out: list[Extra] = []
    for key in keys:
        if not key.startswith(prefix):
            raise InvalidArtifact(
                "config-shape", f"tensor {key!r} is not a {method} tensor (no {prefix!r} prefix)"
            )
        bare = key[len(prefix) :]
        hit = saved_module_of(bare, mts)
        if hit is not None:
            module, rest = hit
            kind = "ignored" if rest.split(".")[0] in IGNORED_PARTS else "module"
            out.append(Extra(key, kind, module, rest))
            continue
        module, _, name = bare.rpartition(".")
        wrapped = module.endswith(".base_layer")
        module = module.removesuffix(".base_layer")
        if name == "bias":
            if bias == "none":
                raise InvalidArtifact(
                    "config-shape",
                    f"tensor {key!r} is a bias, but the config saves none (bias={config.get('bias', 'none')!r})",
                )
            if bias == "lora_only" and not (wrapped and module in adapted):
                raise InvalidArtifact(
                    "config-shape", f"tensor {key!r} is not the bias of a LoRA module (bias='lora_only')"
                )
            out.append(Extra(key, "param", module, "bias"))
        elif name == "weight" and module and (not wrapped or module in adapted):
            # PEFT's save_embedding_layers: a targeted or resized embedding / output layer.
            out.append(Extra(key, "param", module, "weight"))
        else:
            raise InvalidArtifact(
                "config-shape",
                f"tensor {key!r} is neither a {method} factor nor a module, bias or embedding weight that "
                f"this config saves (modules_to_save={mts or None}, bias={config.get('bias', 'none')!r})",
            )
    return out
