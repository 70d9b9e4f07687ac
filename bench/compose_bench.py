"""Composition runtime vs PEFT, same model, same batch, same run.

Model: LlamaForCausalLM(hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8000),
random weights, fp32, 2 threads. LoRA r=16, alpha 32 on q,k,v,o,gate,up,down (56
modules). Batch 8 x 128 tokens.

    python bench/compose_bench.py [--repeats N]

Measures (median of repeats):
  1. load + activate by name from the registry (warm page cache) vs PEFT
     `load_adapter` + `set_adapter` from the same directory;
  2. switching the active adapter among resident ones vs PEFT `set_adapter`;
  3. unmerged LoRA forward / bare base forward, deltahub and PEFT;
  4. per-row batch with 8 distinct adapters / the same batch with one adapter,
     deltahub and PEFT (`adapter_names`).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 8000


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    home = tempfile.mkdtemp()
    os.environ["DELTAHUB_HOME"] = home

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltahub import AdaptedModel, Registry, load_base

    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    base = LlamaForCausalLM(cfg).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    n_adapters = 8
    dirs = []
    registry = Registry(home)
    scratch = Path(tempfile.mkdtemp())
    for i in range(n_adapters):
        pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        d = scratch / f"a{i}"
        pm.save_pretrained(str(d))
        registry.publish(d, f"a{i}")
        dirs.append(d)
        del pm
    x = torch.randint(0, VOCAB, (8, 128), generator=torch.Generator().manual_seed(0))
    results: dict[str, float] = {}

    # ---- 1. load + activate by name
    ours_base = load_base(copy.deepcopy(base), device="cpu")

    def ours_load():
        m = AdaptedModel(ours_base, registry=registry)
        m.activate(m.load("a0"))
        m.deactivate()

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a0").eval()
    counter = [0]

    def peft_load():
        counter[0] += 1
        name = f"x{counter[0]}"
        peft_model.load_adapter(str(dirs[1]), adapter_name=name)
        peft_model.set_adapter(name)
        peft_model.set_adapter("a0")
        peft_model.delete_adapter(name)

    results["load_ours_ms"] = timeit(ours_load, args.repeats * 3) * 1e3
    results["load_peft_ms"] = timeit(peft_load, args.repeats) * 1e3

    # ---- 2. switching among resident adapters
    ours = AdaptedModel(ours_base, registry=registry)
    for i in range(n_adapters):
        ours.load(f"a{i}")
        if i:
            peft_model.load_adapter(str(dirs[i]), adapter_name=f"a{i}")
    sw = [0]

    def ours_switch():
        sw[0] += 1
        ours.activate(f"a{sw[0] % n_adapters}")

    def peft_switch():
        sw[0] += 1
        peft_model.set_adapter(f"a{sw[0] % n_adapters}")

    results["switch_ours_us"] = timeit(ours_switch, 200) * 1e6
    results["switch_peft_us"] = timeit(peft_switch, 200) * 1e6

    # ---- 3 + 4. forwards, interleaved: each round times every variant back to back, so
    # load from other processes on this shared machine hits them alike; we report the
    # ratio of the per-variant minimum and the median of the per-round ratios.
    names = [f"a{i}" for i in range(n_adapters)]
    ours.activate("a0")
    peft_model.set_adapter("a0")

    def once(fn):
        t = time.perf_counter()
        with torch.no_grad():
            fn()
        return time.perf_counter() - t

    variants = {
        "base": lambda: ours_base(input_ids=x),
        "lora_ours": lambda: ours(input_ids=x),
        "lora_peft": lambda: peft_model(input_ids=x),
        "rows_ours": lambda: ours(input_ids=x, adapter_names=names),
        "rows_peft": lambda: peft_model(input_ids=x, adapter_names=names),
        "rows_peft_one": lambda: peft_model(input_ids=x, adapter_names=["a0"] * 8),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        once(fn)  # warm-up
    for _ in range(args.repeats):
        for k, fn in variants.items():
            if k == "base":
                ours.deactivate()
                times[k].append(once(fn))
                ours.activate("a0")
            else:
                times[k].append(once(fn))
    for k, v in times.items():
        results[f"{k}_ms"] = min(v) * 1e3

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    results["paired_lora_ours"] = paired("lora_ours", "base")
    results["paired_lora_peft"] = paired("lora_peft", "base")
    results["paired_rows_ours"] = paired("rows_ours", "lora_ours")
    results["paired_rows_peft"] = paired("rows_peft", "rows_peft_one")

    # correctness guard: our routed batch equals PEFT's routed batch
    with torch.no_grad():
        a = ours(input_ids=x, adapter_names=names).logits
        b = peft_model(input_ids=x, adapter_names=names).logits
    results["rows_max_abs_diff_vs_peft"] = float((a - b).abs().max())

    r = results
    print(
        f"model: Llama hidden 512, inter 1376, 8 layers, vocab {VOCAB}; LoRA r=16 x 56 modules; batch 8x128; fp32"
    )
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}  repeats {args.repeats}")
    print("| measure | deltahub | PEFT | ratio (min times) | ratio (median paired) | goal |")
    print("|---|---|---|---|---|---|")
    print(
        f"| load + activate by name vs load_adapter + set_adapter | {r['load_ours_ms']:.2f} ms | "
        f"{r['load_peft_ms']:.2f} ms | {r['load_ours_ms'] / r['load_peft_ms']:.3f}x | | <= 0.2x |"
    )
    print(
        f"| switch active adapter vs set_adapter | {r['switch_ours_us']:.1f} us | {r['switch_peft_us']:.1f} us | "
        f"{r['switch_ours_us'] / r['switch_peft_us']:.4f}x | | <= 0.2x |"
    )
    print(
        f"| unmerged LoRA forward / bare base ({r['base_ms']:.0f} ms) | {r['lora_ours_ms']:.0f} ms | "
        f"{r['lora_peft_ms']:.0f} ms | ours {r['lora_ours_ms'] / r['base_ms']:.3f}x, PEFT "
        f"{r['lora_peft_ms'] / r['base_ms']:.3f}x | ours {r['paired_lora_ours']:.3f}x, PEFT "
        f"{r['paired_lora_peft']:.3f}x | <= 1.07x |"
    )
    print(
        f"| per-row 8 adapters / one adapter | {r['rows_ours_ms']:.0f} ms | {r['rows_peft_ms']:.0f} ms | "
        f"ours {r['rows_ours_ms'] / r['lora_ours_ms']:.3f}x, PEFT {r['rows_peft_ms'] / r['rows_peft_one_ms']:.3f}x | "
        f"ours {r['paired_rows_ours']:.3f}x, PEFT {r['paired_rows_peft']:.3f}x | <= 1.10x |"
    )
    print(f"routed logits max |ours - PEFT| = {r['rows_max_abs_diff_vs_peft']:.2e}")


if __name__ == "__main__":
    main()
