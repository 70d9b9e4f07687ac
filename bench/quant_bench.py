"""Quantized bases: parameter memory, forward latency with and without adapters, merge error.

Model: LlamaForCausalLM(hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8000),
random weights (the compose bench's model; 1376 is the width bitsandbytes' packed CPU
kernel cannot run). LoRA r=16, alpha 32 on all linear layers (56 modules). Batch
`--batch` x `--tokens`.

    python bench/quant_bench.py [--repeats N] [--threads T]

Measures, all in one run on one model:
  1. parameter bytes of the linear weights (and of the whole model) for fp32, bf16, nf4
     (double quant: packed 4-bit codes + 8-bit absmax + their fp32 scales) and int8;
  2. forward latency (median of repeats): fp32 base; nf4 base on deltahub's exact
     dequantize-then-matmul path, bare and with a LoRA active (deltahub vs PEFT's bnb
     LoRA on an identical copy of the same 4-bit base); nf4 with bitsandbytes' packed
     bfloat16 CPU kernel opted in (`quant.use_packed_cpu_kernel`), bare and with LoRA;
  3. the error merging that LoRA into the nf4 weights introduces (`AdaptedModel.merge(...,
     allow_lossy=True)`), next to the error the 4-bit base itself has against fp32.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 8000


def timeit(fn: Any, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the linear layers' weights incl. quantization state, bytes of all parameters)."""
    from deltahub.compose.inject import head_names, is_bnb_linear

    heads = head_names(model)
    lin = 0
    for name, m in model.named_modules():
        if name in heads:
            continue
        if is_bnb_linear(m):
            lin += m.weight.data.nbytes
            state = getattr(m.weight, "quant_state", None)
            if state is not None:  # 4-bit: absmax (+ nested absmax and code)
                for t in state.as_dict(packed=False).values():
                    if isinstance(t, torch.Tensor):
                        lin += t.nbytes
            scb = getattr(m.weight, "SCB", None)
            if scb is None:
                scb = getattr(getattr(m, "state", None), "SCB", None)
            if scb is not None:
                lin += scb.nbytes
        elif isinstance(m, torch.nn.Linear):
            lin += m.weight.nbytes
    total = sum(p.nbytes for p in model.parameters())
    for m in model.modules():  # quant states are not parameters
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None and is_bnb_linear(m):
            total += sum(
                t.nbytes for t in state.as_dict(packed=False).values() if isinstance(t, torch.Tensor)
            )
    return lin, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from deltahub.compose import AdaptedModel, load_base, quant

    tf.logging.set_verbosity_error()
    cfg = tf.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=512,
    )  # fmt: skip

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return tf.LlamaForCausalLM(cfg).eval()

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = {"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": targets}
    ids = torch.randint(0, VOCAB, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    rows: list[tuple[str, str]] = []

    # ---------------------------------------------------------------- memory
    fp32 = load_base(fresh(), device="cpu")
    bf16 = load_base(fresh(), dtype="bf16", device="cpu")
    t = time.perf_counter()
    nf4 = load_base(fresh(), device="cpu", quantize="nf4")
    quantize_s = time.perf_counter() - t
    int8 = load_base(fresh(), device="cpu", quantize="int8")
    mem = {k: linear_bytes(m) for k, m in {"fp32": fp32, "bf16": bf16, "nf4": nf4, "int8": int8}.items()}
    print("\n## memory (linear weights, whole model) in MiB")
    for k, (lin, tot) in mem.items():
        print(
            f"{k:5s} linear {lin / 2**20:8.2f}  total {tot / 2**20:8.2f}  linear/bf16 {lin / mem['bf16'][0]:.3f}"
        )
    ratio = mem["nf4"][0] / mem["bf16"][0]
    rows.append(
        ("nf4 linear weights / bf16", f"{ratio:.3f} (goal <= 0.3: {'PASS' if ratio <= 0.3 else 'FAIL'})")
    )
    rows.append(("nf4 linear weights / fp32", f"{mem['nf4'][0] / mem['fp32'][0]:.3f}"))
    rows.append(("int8 linear weights / bf16", f"{mem['int8'][0] / mem['bf16'][0]:.3f}"))
    rows.append(
        (
            "nf4 whole model / bf16 (embeddings, head, norms unquantized)",
            f"{mem['nf4'][1] / mem['bf16'][1]:.3f}",
        )
    )
    rows.append(("quantizing the in-memory model to nf4", f"{quantize_s:.2f} s"))
    assert fp32.deltahub_fingerprint == nf4.deltahub_fingerprint == int8.deltahub_fingerprint
    del bf16, int8

    # ---------------------------------------------------------------- latency
    def run(model: Any) -> Any:
        with torch.no_grad():
            return model(input_ids=ids).logits

    r = args.repeats
    t_fp32 = timeit(lambda: run(fp32), r)
    peft_base = copy.deepcopy(nf4)  # an identical 4-bit copy for PEFT to wrap
    model = AdaptedModel(nf4)
    model.add_adapter("a", lora)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.adapter_parameters("a"):
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    t_nf4 = timeit(lambda: run(model), r)
    model.activate("a")
    t_nf4_lora = timeit(lambda: run(model), r)
    adapted = run(model)

    peft_model = get_peft_model(peft_base, LoraConfig(r=16, lora_alpha=32, target_modules=targets)).eval()
    with torch.no_grad():  # the same adapter weights
        sd = {k.replace(".weight", ".default.weight"): v for k, v in model.adapter_state_dict("a").items()}
        missing = peft_model.load_state_dict(sd, strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys[:3]
    peft_out = run(peft_model)
    agree = float((peft_out - adapted).abs().max() / adapted.abs().max())
    t_peft_lora = timeit(lambda: run(peft_model), r)
    with peft_model.disable_adapter():
        t_peft_base = timeit(lambda: run(peft_model), r)
    del peft_base

    print("\n## forward latency, batch", tuple(ids.shape))
    rows += [
        ("fp32 base forward", f"{t_fp32 * 1e3:.1f} ms"),
        (
            "nf4 base forward (exact dequantize + matmul)",
            f"{t_nf4 * 1e3:.1f} ms ({t_nf4 / t_fp32:.2f}x fp32)",
        ),
        ("nf4 + LoRA, deltahub", f"{t_nf4_lora * 1e3:.1f} ms ({t_nf4_lora / t_nf4:.3f}x nf4 base)"),
        (
            "nf4 + LoRA, PEFT (bnb LoRA)",
            f"{t_peft_lora * 1e3:.1f} ms ({t_peft_lora / t_peft_base:.3f}x its base)",
        ),
        ("deltahub / PEFT, nf4 + LoRA", f"{t_nf4_lora / t_peft_lora:.3f}"),
        ("deltahub vs PEFT outputs, max rel diff", f"{agree:.1e}"),
    ]

    model.deactivate()
    slow = quant.use_packed_cpu_kernel(nf4)
    packed = len([m for m in nf4.modules() if quant.is_4bit(m)]) - len(slow)
    t_packed = timeit(lambda: run(model), r)
    model.activate("a")
    t_packed_lora = timeit(lambda: run(model), r)
    packed_err = float((run(model) - adapted).abs().max() / adapted.abs().max())
    rows += [
        (
            f"nf4 base, packed bf16 CPU kernel opted in ({packed} layers packed, {len(slow)} on the exact path)",
            f"{t_packed * 1e3:.1f} ms ({t_packed / t_fp32:.2f}x fp32)",
        ),
        (
            "nf4 + LoRA, packed kernel",
            f"{t_packed_lora * 1e3:.1f} ms; max rel diff vs exact path {packed_err:.1e}",
        ),
    ]
    model.deactivate()
    quant.guard_cpu_kernel(nf4)  # back to exact (the packed layers keep bf16 scales)

    # ---------------------------------------------------------------- merge error
    fresh_nf4 = load_base(fresh(), device="cpu", quantize="nf4")
    base_err = (run(fresh_nf4) - run(fp32)).abs()
    merge_model = AdaptedModel(fresh_nf4)
    with tempfile.TemporaryDirectory() as tmp:  # the same adapter weights as above
        model.save_adapter("a", tmp)
        merge_model.load_path(tmp, "a")
    probe = {"input_ids": ids[:2, :64]}
    t = time.perf_counter()
    report = merge_model.merge("a", allow_lossy=True, probe=probe)
    merge_s = time.perf_counter() - t
    t_merged = timeit(lambda: run(merge_model), r)
    rows += [
        ("nf4 merged (LoRA folded, requantized) forward", f"{t_merged * 1e3:.1f} ms"),
        ("merge into nf4 (56 layers, incl. 2 probe forwards)", f"{merge_s:.2f} s"),
        (
            "merge error on outputs (max abs / mean abs / max rel)",
            f"{report.max_abs:.4f} / {report.mean_abs:.4f} / {report.max_rel:.3f}",
        ),
        ("max weight requantization error", f"{report.weight_max_abs:.4f}"),
        (
            "for scale: nf4 base vs fp32 base outputs (max abs / mean abs)",
            f"{float(base_err.max()):.4f} / {float(base_err.mean()):.4f}",
        ),
    ]
    merge_model.unmerge("a")

    print(f"\n## quantization results ({args.threads} threads)")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
