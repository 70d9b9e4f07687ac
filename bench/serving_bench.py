"""Serving benchmark: DoRA -> LoRA conversion error by rank, and the vLLM resolver's cost.

    python bench/serving_bench.py [--hidden 256] [--layers 2]

A DoRA (r=16, alpha=32, q/k/v/o/gate/up/down, random factors, magnitudes scaled by
U(1, 1.3)) on a Llama config (hidden `--hidden`, intermediate 2x, `--layers` layers,
vocab 512), published in a fresh registry; `export --target vllm --convert` at each rank.
Printed per rank: the worst and mean relative Frobenius error of ΔW over modules (what the
export reports), the logits' relative error and largest gap on a 4 x 32 probe batch, the
conversion's wall time (SVDs in float64, CPU, torch.set_num_threads(2)). Then the
resolver (`resolve_for_vllm`, no vLLM needed): the first resolve of a version (export into
the digest-keyed directory, every file re-hashed) and a repeat (directory already there),
median of 5. No GPU: vLLM itself is not run.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    os.environ["DELTAHUB_HOME"] = str(tmp / "home")
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from deltahub.registry import Registry
    from deltahub.serving.convert import probe_ids
    from deltahub.serving.export import export_for_target
    from deltahub.serving.vllm_resolver import resolve_for_vllm

    torch.manual_seed(0)
    h = args.hidden
    cfg = tf.LlamaConfig(
        hidden_size=h,
        intermediate_size=2 * h,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=128,
    )
    base = tf.LlamaForCausalLM(cfg).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=targets, use_dora=True)
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    model.save_pretrained(str(tmp / "dora"))
    reg = Registry()
    reg.publish(tmp / "dora", "bench/dora", base_model="bench-llama")
    ids = probe_ids(base, batch=4, length=32, seed=3)
    print(
        f"DoRA r=16 on {len(targets)} modules x {args.layers} layers, hidden {h}; min(d_out, d_in) = {h // 2}..{h}"
    )
    print("| rank | worst module err | mean module err | logits rel err | logits max abs | time (s) |")
    print("|---|---|---|---|---|---|")
    for rank in (1, 4, 16, 64, h // 2, h):
        t0 = time.perf_counter()
        out = export_for_target(
            "bench/dora",
            tmp / f"r{rank}",
            "vllm",
            convert=True,
            rank=rank,
            base=base,
            registry=reg,
            probe=ids,
        )
        dt = time.perf_counter() - t0
        c = out["conversion"]
        errs = list(c["module_rel_errors"].values())
        print(
            f"| {rank} | {max(errs):.3g} | {statistics.mean(errs):.3g} | {c['logits_rel_error']:.3g} "
            f"| {c['logits_max_abs']:.3g} | {dt:.2f} |"
        )
    reg.publish(tmp / "r16", "bench/lora", base_model="bench-llama")
    times = []
    for i in range(6):
        if i == 0:
            t0 = time.perf_counter()
            resolve_for_vllm("bench-llama", "bench/lora@1")
            first = time.perf_counter() - t0
            continue
        t0 = time.perf_counter()
        resolve_for_vllm("bench-llama", "bench/lora@1")
        times.append(time.perf_counter() - t0)
    print(
        f"resolver: first resolve {first * 1000:.1f} ms, repeat median {statistics.median(times) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
