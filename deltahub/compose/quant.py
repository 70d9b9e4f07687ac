"""Quantized bases: 4-bit (NF4/FP4) and 8-bit linear layers through bitsandbytes.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") keeps the
base's linear weights in 4-bit NormalFloat (NF4) with blockwise absmax scaling (blocks of
64 weights; "double quantization" quantizes those absmax constants again, in blocks of
256), dequantizes them on the fly to a 16/32-bit *compute dtype* for each matmul, and
trains LoRA adapters in higher precision beside them:

    y = dequant(W_nf4) x + b + s * B A x

Norms, embeddings and the output head are not quantized. LLM.int8 (Dettmers et al., 2022)
stores row-wise absmax int8 weights, W ~= CB * SCB[:, None] / 127.

What this module adds to bitsandbytes and transformers' `BitsAndBytesConfig`:

- `quantize_module`: quantize an in-memory model (Linear and GPT-2 `Conv1D` -> bnb
  layers, head kept), the path `load_base(module, quantize=...)` takes;
- `dequantize_weight` / `dequantize_model`: the dense weights a quantized layer computes
  with (for DoRA norms, merging, equivalence tests and full-precision export);
- `replace_weight` / `restore_weight`: requantize a changed dense weight, and put the
  original quantized parameter back bit for bit (merge / unmerge);
- `prepare_for_training`: the QLoRA recipe (higher-precision norms and head, input
  gradients, optional gradient checkpointing);
- the CPU kernel guard below.

On CPU, bitsandbytes 0.50.2 switches a `Linear4bit` to a packed AVX512-BF16 kernel on its
first eval-mode, no-grad forward (when the CPU has AVX512-BF16). That conversion
rewrites the layer's weight in place (absmax rounded to bfloat16, so about 4e-3
relative error against the dequantized weight) and only handles shapes with
`out_features % 32 == 0` and `in_features % blocksize == 0`; any other shape fails with
`RuntimeError: shape '[N, K // 64]' is invalid ...` (e.g. a Llama with intermediate size
1376: 1376 % 64 = 32) or `AssertionError: N must be divisible by block_n`. Training
mode never packs, which is why it worked. `guard_cpu_kernel` therefore turns the packed
kernel off for every layer on CPU (the exact dequantize-then-matmul kernel handles every
shape), and `use_packed_cpu_kernel` turns it back on, only for the layers whose shapes
it supports, for ~3x faster bfloat16 CPU inference.

bitsandbytes is imported lazily (`bnb()`): deltahub imports, and full-precision bases
work, where bitsandbytes is missing or broken.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.compose.inject import head_names, is_bnb_linear, is_conv1d
from deltahub.errors import InvalidConfig, Unsupported

QUANT_TYPES = ("nf4", "fp4", "int8")
PACKED_BLOCK_N = 32  # bitsandbytes' packed CPU kernel tiles output rows by 32


def bnb() -> Any:
    """The bitsandbytes module, imported on first use; `Unsupported` if it cannot load."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    # Its CPU backend logs a warning about the optional `kernels` package on import.
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except Exception as e:  # ImportError, or a broken native library
        raise Unsupported(
            f"quantized bases need bitsandbytes, which did not load ({type(e).__name__}: {e}); "
            "`pip install bitsandbytes`, or load the base with quantize=None"
        ) from None
    finally:
        logger.setLevel(level)
    return bitsandbytes


def check_quantize(quantize: str) -> str:
    if quantize not in QUANT_TYPES:
        raise InvalidConfig(f"quantize={quantize!r} is not one of {', '.join(QUANT_TYPES)} (or None)")
    return quantize


def is_4bit(module: nn.Module) -> bool:
    return is_bnb_linear(module) and type(module).__name__ != "Linear8bitLt"


def is_quantized(model: nn.Module) -> bool:
    return any(is_bnb_linear(m) for m in model.modules())


def quantization_of(model: nn.Module) -> str | None:
    """'nf4', 'fp4', 'int8' or None: the scheme of the model's first quantized layer."""
    for m in model.modules():
        if type(m).__name__ == "Linear8bitLt":
            return "int8"
        if is_4bit(m):
            state = getattr(m.weight, "quant_state", None)
            return getattr(state, "quant_type", None) or "nf4"
    return None


# --------------------------------------------------------------------------- quantizing


def _quantized_linear(
    weight: Tensor,  # (d_out, d_in)
    bias: Tensor | None,
    quantize: str,
    compute_dtype: torch.dtype,
    double_quant: bool,
    blocksize: int,
    device: torch.device | str,
) -> nn.Module:
    lib = bnb()
    d_out, d_in = weight.shape
    if quantize == "int8":
        # threshold 0: no fp16 outlier decomposition (it needs a GPU); pure LLM.int8 matmul.
        layer = lib.nn.Linear8bitLt(d_in, d_out, bias=bias is not None, has_fp16_weights=False, threshold=0.0)
        layer.weight = lib.nn.Int8Params(weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = lib.nn.Linear4bit(
            d_in, d_out, bias=bias is not None, compute_dtype=compute_dtype,
            compress_statistics=double_quant, quant_type=quantize,
        )  # fmt: skip
        layer.weight = lib.nn.Params4bit(
            weight.detach().clone(), requires_grad=False, quant_type=quantize, blocksize=blocksize,
            compress_statistics=double_quant, module=layer,
        )  # fmt: skip
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # moving a bnb parameter to a device is what quantizes it


def quantize_module(
    model: nn.Module,
    quantize: str,
    compute_dtype: torch.dtype = torch.float32,
    double_quant: bool = True,
    blocksize: int = 64,
    skip: set[str] | None = None,
) -> nn.Module:
    """Replace every Linear / `Conv1D` of `model` (in place) by a bitsandbytes layer.

    The output head (and any module named in `skip`) stays as it is, as do norms and
    embeddings, which are not linear layers. A layer made from a `Conv1D` is marked
    `deltahub_conv1d` so that the fingerprint, LoRA's `fan_in_fan_out` and export see
    the original layout.
    """
    check_quantize(quantize)
    keep = head_names(model) | set(skip or ())
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if n and n not in keep and (type(m) is nn.Linear or is_conv1d(m))
    ]
    for name, module in targets:
        conv = is_conv1d(module)
        weight = module.weight.T if conv else module.weight  # (d_out, d_in)
        device = module.weight.device
        layer = _quantized_linear(
            weight, module.bias, quantize, compute_dtype, double_quant, blocksize, device
        )
        if conv:
            layer.deltahub_conv1d = True
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return model


def bnb_config(quantize: str, compute_dtype: torch.dtype, double_quant: bool = True) -> Any:
    """transformers' `BitsAndBytesConfig` for `quantize` (the head is never quantized)."""
    from transformers import BitsAndBytesConfig

    check_quantize(quantize)
    bnb()
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )  # fmt: skip


def mark_conv1d(model: nn.Module, skeleton: nn.Module) -> None:
    """Mark the quantized layers of `model` that are `Conv1D`s in the full-precision `skeleton`."""
    conv = {n for n, m in skeleton.named_modules() if is_conv1d(m)}
    for name, module in model.named_modules():
        if name in conv and is_bnb_linear(module):
            module.deltahub_conv1d = True


# --------------------------------------------------------------------------- CPU kernel


def packed_kernel_supports(module: nn.Module) -> bool:
    """Whether bitsandbytes' packed AVX512-BF16 CPU kernel can run this `Linear4bit`."""
    state = module.weight.quant_state
    blocksize = int(getattr(state, "blocksize", 64))
    d_out, d_in = int(module.out_features), int(module.in_features)
    return d_out % PACKED_BLOCK_N == 0 and d_in % blocksize == 0 and d_in % 2 == 0


def guard_cpu_kernel(model: nn.Module, exact: bool = True) -> None:
    """Keep 4-bit layers off the packed CPU kernel: all of them (`exact`), or those it cannot run."""
    for m in model.modules():
        if (
            is_4bit(m)
            and hasattr(m, "support_avx512bf16_for_cpu")
            and (exact or not packed_kernel_supports(m))
        ):
            m.support_avx512bf16_for_cpu = False


def use_packed_cpu_kernel(model: nn.Module) -> list[str]:
    """Let bitsandbytes' fast bfloat16 CPU kernel run wherever the shape allows; return the
    names of the layers that stay on the exact dequantize-then-matmul path."""
    fast = bool(getattr(bnb().functional, "has_avx512bf16", lambda: False)())  # older bnb: no packed kernel
    slow = []
    for name, m in model.named_modules():
        if is_4bit(m):
            ok = fast and packed_kernel_supports(m)
            m.support_avx512bf16_for_cpu = ok
            if not ok:
                slow.append(name)
    return slow


# --------------------------------------------------------------------------- dense views


def dequantize_weight(module: nn.Module) -> Tensor:
    """The dense (d_out, d_in) weight a bitsandbytes layer computes with (a new tensor)."""
    lib = bnb()
    w = module.weight
    if type(module).__name__ == "Linear8bitLt":
        scb = getattr(w, "SCB", None)
        if scb is None:  # moved into the layer's matmul state on the first forward
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is None:
            raise Unsupported(f"{type(module).__name__} has no int8 scales (SCB); was it quantized?")
        return w.data.float() * (scb.float().unsqueeze(1) / 127.0)
    state = getattr(w, "quant_state", None) or getattr(module, "quant_state", None)
    if state is None:
        raise Unsupported(
            f"{type(module).__name__} has no quant_state; was it quantized (moved to a device)?"
        )
    data = w.data
    if getattr(state, "packing_format_for_cpu", False):
        # Packed for the CPU kernel: unpack a copy (the inverse rewrites its arguments).
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
    return lib.functional.dequantize_4bit(data, state)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized layer (in place) by a dense `nn.Linear` (or `Conv1D`) with
    the weights it computes with: the "dequantized base"."""
    targets = [(n, m) for n, m in model.named_modules() if n and is_bnb_linear(m)]
    for name, module in targets:
        w = dequantize_weight(module)  # (d_out, d_in)
        dt = dtype or getattr(module, "compute_dtype", None) or torch.float32
        if dt not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            dt = torch.float32
        bias = module.bias
        if getattr(module, "deltahub_conv1d", False):
            from transformers.pytorch_utils import Conv1D

            dense: nn.Module = Conv1D(w.shape[0], w.shape[1])
            dense.weight = nn.Parameter(w.T.contiguous().to(dt), requires_grad=False)
        else:
            dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dt)
            dense.weight = nn.Parameter(w.to(dt), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().clone().to(dt), requires_grad=False)
        elif hasattr(dense, "bias") and dense.bias is not None:
            dense.bias = None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense.to(w.device))
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # it is a full-precision model now
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit", "hf_quantizer"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


# --------------------------------------------------------------------------- merging


@dataclass
class QuantBackup:
    """What `restore_weight` needs to put a layer's original quantized weight back."""

    weight: nn.Parameter
    quant_state: Any = None
    int8_state: tuple[Any, Any] | None = None


def replace_weight(module: nn.Module, dense: Tensor) -> tuple[QuantBackup, float]:
    """Requantize `dense` (d_out, d_in) into `module`; return (backup, max abs weight error).

    The original parameter object is kept (not copied) in the backup, so `restore_weight`
    is exact.
    """
    lib = bnb()
    old = module.weight
    device = old.device
    backup = QuantBackup(old, getattr(module, "quant_state", None))
    if type(module).__name__ == "Linear8bitLt":
        state = module.state
        backup.int8_state = (state.CB, state.SCB)
        new = lib.nn.Int8Params(dense.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
        module.weight = new.to(device)
        state.CB, state.SCB = None, None  # the next forward reads the new CB/SCB
    else:
        qs = module.weight.quant_state
        packed = getattr(qs, "packing_format_for_cpu", False)
        nested = getattr(qs, "original_nested", qs.nested) if packed else qs.nested
        dtype = getattr(qs, "original_dtype", qs.dtype) if packed else qs.dtype
        new = lib.nn.Params4bit(
            dense.detach().to(dtype).cpu(), requires_grad=False, quant_type=qs.quant_type,
            blocksize=qs.blocksize, compress_statistics=nested, module=module,
        )  # fmt: skip
        module.weight = new.to(device)
    err = float((dequantize_weight(module).float() - dense.float()).abs().max())
    return backup, err


def restore_weight(module: nn.Module, backup: QuantBackup) -> None:
    """Put back the exact quantized weight `replace_weight` saved."""
    module.weight = backup.weight
    if backup.quant_state is not None and hasattr(module, "quant_state"):
        module.quant_state = backup.quant_state
    if backup.int8_state is not None:
        module.state.CB, module.state.SCB = backup.int8_state


@dataclass
class MergeReport:
    """The error merging an adapter into a quantized base introduced.

    `max_abs` / `mean_abs`: change of the model's outputs (logits, or the last hidden
    state) on a probe batch, merged base vs. the same adapter applied unmerged;
    `weight_max_abs`: the largest requantization error over the merged weights;
    `reference_max_abs`: the largest output magnitude, for scale.
    """

    adapter: str
    quantization: str
    layers: int
    max_abs: float
    mean_abs: float
    reference_max_abs: float
    weight_max_abs: float
    probe_shape: list[int] = field(default_factory=list)

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.reference_max_abs if self.reference_max_abs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_rel": self.max_rel}


def default_probe(model: nn.Module, batch: int = 2, length: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """A seeded batch of random token ids for measuring merge error."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise InvalidConfig("the base has no config.vocab_size; pass probe= (the model's inputs) to merge")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    device = next(model.parameters()).device
    return {"input_ids": ids.to(device)}


def model_output(out: Any) -> Tensor:
    """The tensor a merge report compares: logits, else the last hidden state."""
    for key in ("logits", "last_hidden_state"):
        t = getattr(out, key, None)
        if isinstance(t, Tensor):
            return t
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise Unsupported(
        f"cannot tell which output of {type(out).__name__} to compare; pass a probe the model maps to logits"
    )


# --------------------------------------------------------------------------- training


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = False) -> nn.Module:
    """The QLoRA recipe on a frozen quantized base, in place.

    Parameters that are not quantized (norms, embeddings, the head) go to float32, as in
    PEFT's `prepare_model_for_kbit_training`; the embedding output requires grad, so
    gradients reach adapters through checkpointed blocks; with `gradient_checkpointing`
    activations are recomputed in the backward pass instead of stored.
    """
    for module in model.modules():
        if is_bnb_linear(module):
            continue
        for p in module.parameters(recurse=False):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers 5's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif callable(getattr(model, "gradient_checkpointing_enable", None)):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise Unsupported(f"{type(model).__name__} does not support gradient checkpointing")
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model
