"""Loading a frozen base model, and its fingerprint.

`load_base` returns a transformers model with every parameter frozen, in eval mode, on
CUDA when one is present. Adapters are attached later by `AdaptedModel`, which never
copies the base.

The fingerprint identifies a base *architecture and weights layout*, not its numeric
precision: it hashes the model config (minus keys that change with how the model was
loaded: dtype, quantization, path, transformers version) and the parameter names with
their *logical* shapes. A bitsandbytes `Linear4bit` stores its weight packed as
(n, 1) uint8; its logical shape is (out_features, in_features), so a 4-bit and a
full-precision copy of one base share a fingerprint and adapters move freely between
them. (A quantized GPT-2 `Conv1D` is marked `deltahub_conv1d` and keeps its (in, out)
logical shape.)

`load_base(..., quantize="nf4" | "fp4" | "int8")` loads the base through bitsandbytes
(`deltahub.compose.quant`, which documents the CPU kernel guard); bitsandbytes is only
imported then.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltahub.errors import InvalidConfig, NotFound, Unsupported

# Config keys that depend on how a model was loaded or saved, not on what it is.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "torch_dtype",
        "dtype",
        "quantization_config",
        "_name_or_path",
        "transformers_version",
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_pre_quantization_dtype",
    }
)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def _dtype_keyword() -> str:
    """`from_pretrained`'s dtype argument: `dtype` from transformers 4.56, `torch_dtype` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise InvalidConfig(f"dtype {dtype!r} is not known; use one of {sorted(_DTYPES)}")


def _model_class(config: Any) -> Any:
    import transformers

    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return transformers.AutoModelForCausalLM
        if arch.endswith("ForSequenceClassification"):
            return transformers.AutoModelForSequenceClassification
    return transformers.AutoModel


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients everywhere and switch to eval mode (dropout off)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _check_safe_base(name: str | Path, config: Any, local: Path | None) -> None:
    """Refuse a base that would need custom code or pickled weights, before loading anything."""
    if getattr(config, "auto_map", None):
        raise Unsupported(
            f"base model {str(name)!r} needs its own Python code (auto_map in its config); deltahub never "
            "runs a repository's code (trust_remote_code): use a base whose architecture transformers ships"
        )
    if local is not None and local.is_dir() and not any(local.glob("*.safetensors")):
        pickled = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise Unsupported(
                f"base model {str(name)!r} has pickled weights only ({', '.join(pickled)}); deltahub never "
                "unpickles: re-save it as safetensors (model.save_pretrained(dir) with a trusted transformers)"
            )


def load_base(
    path_or_id: str | Path | nn.Module,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    model_class: Any = None,
    compute_dtype: str | torch.dtype | None = None,
    double_quant: bool = True,
) -> nn.Module:
    """A frozen base model from a local directory, a hub id, or an already-built module.

    The class comes from the config's `architectures` (causal LM, sequence
    classification, else the bare `AutoModel`) unless `model_class` is given. The
    fingerprint is stored as `model.deltahub_fingerprint`.

    `quantize` ("nf4", "fp4" or "int8") stores the linear layers through bitsandbytes
    (transformers' `BitsAndBytesConfig` for a path; `deltahub.compose.quant.quantize_module`
    for a module, which is quantized in place); norms, embeddings and the output head
    keep `dtype`. 4-bit matmuls run in `compute_dtype` (default: `dtype`, else bfloat16
    on CUDA and float32 on CPU); `double_quant` also quantizes the 4-bit scales. The
    fingerprint is that of the same base in full precision.
    """
    torch_dtype = _dtype(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    quant: Any = None
    qdtype = torch.float32
    if quantize is not None:
        from deltahub.compose import quant

        quant.check_quantize(quantize)
        quant.bnb()  # a clear Unsupported now if bitsandbytes cannot load
        qdtype = (
            _dtype(compute_dtype)
            or torch_dtype
            or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
        )
    fp = None
    if isinstance(path_or_id, nn.Module):
        model = path_or_id
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        if quant is not None:
            if quant.is_quantized(model):
                raise Unsupported("the module is quantized already; pass quantize=None to use it as it is")
            fp = fingerprint(model)  # before: the full-precision layout is the logical one
            quant.quantize_module(model.to(device), quantize, qdtype, double_quant)  # type: ignore[arg-type]
    else:
        from transformers import AutoConfig

        local = Path(path_or_id).expanduser()
        is_local = local.exists()
        if not is_local and (str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") > 1):
            raise NotFound(f"base model directory {path_or_id} does not exist")
        source = str(local) if is_local else str(path_or_id)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=is_local, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise NotFound(f"cannot load a model config from {path_or_id!r}: {e}") from None
        _check_safe_base(path_or_id, config, local if is_local else None)
        cls = model_class or _model_class(config)
        # Never unpickle, never run a repository's code: safetensors weights, stock classes.
        kwargs: dict[str, Any] = {
            "local_files_only": is_local,
            "use_safetensors": True,
            "trust_remote_code": False,
        }
        if quant is not None and torch_dtype is None:
            # transformers 4.x would load the unquantized modules in float16 for bitsandbytes;
            # keep norms, embeddings and the head in float32 (the QLoRA recipe).
            torch_dtype = torch.float32
        if torch_dtype is not None:
            kwargs[_dtype_keyword()] = torch_dtype
        if quant is not None:
            kwargs["quantization_config"] = quant.bnb_config(quantize, qdtype, double_quant)  # type: ignore[arg-type]
            kwargs["device_map"] = str(device)
        model = cls.from_pretrained(source, config=config, **kwargs)
        if quant is not None:
            # Which quantized layers were GPT-2 Conv1Ds: from a weightless skeleton.
            with torch.device("meta"):
                skeleton = cls.from_config(config)
            quant.mark_conv1d(model, skeleton)
    if quant is None:
        model = model.to(device)
    model = freeze(model)
    if quant is not None or _has_bnb(model):
        from deltahub.compose import quant as q

        q.guard_cpu_kernel(model, exact=quant is not None)
    model.deltahub_fingerprint = fp or fingerprint(model)  # type: ignore[assignment]
    return model


def _has_bnb(model: nn.Module) -> bool:
    return any(type(m).__name__ in _BNB for m in model.modules())


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is None:
        return {}
    data = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))

    def clean(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: clean(v) for k, v in d.items() if k not in VOLATILE_CONFIG_KEYS}
        if isinstance(d, (list, tuple)):
            return [clean(v) for v in d]
        if isinstance(d, torch.dtype):
            return str(d)
        return d

    data = clean(data)
    if isinstance(data.get("architectures"), list):
        data["architectures"] = sorted(data["architectures"])
    return data


_BNB = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


def logical_shape(module: nn.Module, param_name: str, param: torch.Tensor) -> tuple[int, ...]:
    """The shape a parameter has in full precision (bitsandbytes packs 4-bit weights;
    a quantized GPT-2 `Conv1D` stored its weight (in, out))."""
    if param_name == "weight" and type(module).__name__ in _BNB:
        if getattr(module, "deltahub_conv1d", False):
            return (int(module.in_features), int(module.out_features))
        return (int(module.out_features), int(module.in_features))
    return tuple(param.shape)


def fingerprint(model: nn.Module) -> str:
    """`sha256:<hex>` of the model's config (minus volatile keys) and parameter names/shapes."""
    h = hashlib.sha256()
    h.update(json.dumps(_config_dict(model), sort_keys=True, default=str).encode())
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            h.update(f"\n{full}:{list(logical_shape(module, p_name, p))}".encode())
    return "sha256:" + h.hexdigest()


def fingerprint_of(model: nn.Module) -> str:
    """The stored fingerprint, computed (and stored) on first use for a hand-built model."""
    fp = getattr(model, "deltahub_fingerprint", None)
    if not isinstance(fp, str):
        fp = fingerprint(model)
        model.deltahub_fingerprint = fp  # type: ignore[assignment]
    return fp


def base_model_id(source: str | Path | nn.Module) -> str | None:
    """The portable id to record as an adapter's base model, or None when there is none.

    A hub id stays as it is; a local directory gives the `_name_or_path` its config.json
    records when that is a hub id (or the repository of a Hugging Face cache path); a
    module gives its config's `_name_or_path` the same way. A local path is never
    returned: it would mean nothing elsewhere (the fingerprint identifies the base
    exactly; `--base-model` names it).
    """
    from deltahub.manifest import portable_base_id

    if isinstance(source, nn.Module):
        name = getattr(getattr(source, "config", None), "_name_or_path", None)
        if isinstance(name, str) and name and Path(name).expanduser().is_dir():
            return base_model_id(name)  # loaded from a directory: what that directory says
        return portable_base_id(name)
    local = Path(str(source)).expanduser()
    if not local.exists():
        return portable_base_id(str(source))
    resolved = str(local.resolve())
    if "models--" in resolved and (cached := portable_base_id(resolved)):
        return cached
    try:
        name = json.loads((local / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or Path(name).expanduser().exists():
        return None
    return portable_base_id(name)
