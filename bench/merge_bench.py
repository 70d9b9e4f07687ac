"""Merge benchmark: `deltahub.compose.merge` against PEFT's `add_weighted_adapter`.

    python bench/merge_bench.py [--repeats 3] [--out bench/RESULTS.md]

16 PEFT LoRAs (r=16, alpha=32) on q, k, v, o, gate, up, down of an 8-layer, hidden-512,
intermediate-1376 Llama config (56 modules each), random factors, saved by PEFT and
published in a fresh registry. Same adapters for both sides, in the same process, fp32,
torch.set_num_threads(2):

- PEFT: all adapters already loaded in one PeftModel (its state right before a merge);
  time `add_weighted_adapter(..., combination_type="svd", svd_rank=16)` and
  `combination_type="ties", density=0.5` (the new adapter is deleted between repeats).
- deltahub end to end: `merge_adapters(refs, ...)` from registry refs: resolve, open,
  read the safetensors, merge, write the artifact and publish it (hash + fsync + commit).
- deltahub merge only: `merge_loras` on tensors already in memory (PEFT's footing).

Weights are 1/n. Each timing is the median of `--repeats` runs after one warm-up, the
PEFT and deltahub runs interleaved (the machine is shared, so load hits both alike).
The results are cross-checked: svd deltas (B @ A) against PEFT's, ties factors against
PEFT's (largest relative deviation).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_results import write_section  # noqa: E402

from deltahub.compose.merge import load_tensors, merge_adapters, merge_loras  # noqa: E402
from deltahub.registry import Registry  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, N_ADAPTERS, DENSITY = 16, 32, 16, 0.5


def build_peft_model(root: Path):
    """One PeftModel holding N_ADAPTERS random LoRAs, each saved by PEFT under root/a<i>."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=32000,
    )
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    model = get_peft_model(LlamaForCausalLM(config).eval(), lora, adapter_name="a0")
    for i in range(1, N_ADAPTERS):
        model.add_adapter(f"a{i}", lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(str(root))  # every adapter goes to root/<adapter name>
    return model


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, after: dict[str, Callable[[], object]]
) -> dict[str, float]:
    """Median seconds of each function (its untimed `after` step run after it), the runs
    interleaved so load on a shared machine hits every side alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
            after.get(key, lambda: None)()
    return {k: statistics.median(v) for k, v in times.items()}


def peft_factors(model, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from peft.tuners.lora import LoraLayer

    return {
        k: (m.lora_B[name].weight.detach().clone(), m.lora_A[name].weight.detach().clone())
        for k, m in model.named_modules()
        if isinstance(m, LoraLayer) and name in m.lora_A
    }


def max_rel(
    ours: dict[str, torch.Tensor], theirs: dict[str, tuple[torch.Tensor, torch.Tensor]], dense: bool
) -> float:
    worst = 0.0
    for module, (B, A) in theirs.items():
        a, b = ours[module + ".lora_A.weight"], ours[module + ".lora_B.weight"]
        pairs = [(b.double() @ a.double(), B.double() @ A.double())] if dense else [(a, A), (b, B)]
        for x, y in pairs:
            worst = max(worst, float((x - y).norm() / y.norm()))
    return worst


def dense_check(inputs, ours: dict[str, torch.Tensor], n: int, k: int, layer: str = ".layers.0.") -> float:
    """Largest relative distance of our B @ A from the float64 dense best rank-k approximation
    of sum_i (1/n) s_i B_i A_i, over one layer's modules (a dense SVD per module is slow)."""
    worst = 0.0
    for key in ours:
        if layer not in key or not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        dense = sum(
            (cfg["lora_alpha"] / cfg["r"] / n) * t[module + ".lora_B.weight"].double() @ t[key].double()
            for cfg, t in inputs[:n]
        )
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        got = ours[module + ".lora_B.weight"].double() @ ours[key].double()
        worst = max(worst, float((got - best).norm() / best.norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_peft_model(root / "adapters")
        reg = Registry(root / "home")
        for i in range(N_ADAPTERS):
            reg.publish(root / "adapters" / f"a{i}", name=f"a{i}")
        inputs = [(reg.open(f"a{i}").config, load_tensors(reg.open(f"a{i}"))) for i in range(N_ADAPTERS)]

        rows = []
        for method, n in (("svd", 4), ("svd", 16), ("ties", 4), ("ties", 16)):
            names = [f"a{i}" for i in range(n)]
            weights = [1.0 / n] * n
            kw = {"svd_rank": RANK} if method == "svd" else {"density": DENSITY}
            ours_kw = {"rank": RANK} if method == "svd" else {"density": DENSITY}

            def peft_run(names=names, weights=weights, kw=kw, method=method):
                model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kw)

            def e2e(names=names, weights=weights, method=method, ours_kw=ours_kw, n=n):
                merge_adapters(names, method, weights, name=f"{method}{n}", registry=reg, **ours_kw)

            def pure(n=n, weights=weights, method=method, ours_kw=ours_kw):
                return merge_loras(inputs[:n], method, weights, **ours_kw)[0]

            # warm-up, and the two results for the cross-check
            peft_run()
            theirs = peft_factors(model, "merged")
            model.delete_adapter("merged")
            e2e()
            mine = pure()
            t = interleaved(
                {"peft": peft_run, "e2e": e2e, "pure": pure},
                args.repeats,
                after={"peft": lambda: model.delete_adapter("merged")},
            )
            t_peft, t_e2e, t_pure = t["peft"], t["e2e"], t["pure"]
            dev = max_rel(mine, theirs, dense=method == "svd")
            exact = dense_check(inputs, mine, n, RANK) if method == "svd" else None
            goal = 0.1 if method == "svd" else 0.5
            rows.append((method, n, t_peft, t_e2e, t_pure, goal, dev, exact))
            print(
                f"{method} x{n}: PEFT {t_peft:.3f} s, deltahub e2e {t_e2e:.3f} s ({t_e2e / t_peft:.3f}x), "
                f"merge only {t_pure:.3f} s ({t_pure / t_peft:.3f}x), max rel dev from PEFT {dev:.1e}"
                + (f", from float64 Eckart-Young {exact:.1e}" if exact is not None else ""),
                flush=True,
            )

    cmd = "python bench/merge_bench.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
    lines = [
        "## merge",
        "",
        f"Command: `{cmd}`",
        f"Machine: {os.cpu_count()} CPU cores (shared with other engineers' work at the time), "
        f"{platform.machine()}, torch {torch.__version__}, torch.set_num_threads(2), fp32.",
        "",
        f"{N_ADAPTERS} PEFT LoRAs r={RANK} on q,k,v,o,gate,up,down of a Llama config (hidden 512, "
        "intermediate 1376, 8 layers: 56 modules each), weights 1/n; svd to rank 16, ties with "
        f"density {DENSITY}. PEFT: `add_weighted_adapter` with every adapter already loaded. "
        "deltahub end to end: `merge_adapters` from registry refs (read, merge, write, publish). "
        f"Median of {args.repeats} interleaved runs after a warm-up.",
        "",
        "| merge | PEFT | deltahub end to end | ratio | merge only | ratio | goal "
        "| max rel. dev. from PEFT | from float64 dense (layer 0) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, n, t_peft, t_e2e, t_pure, goal, dev, exact in rows:
        lines.append(
            f"| {method}, {n} adapters | {t_peft:.3f} s | {t_e2e:.3f} s | **{t_e2e / t_peft:.3f}x** | "
            f"{t_pure:.3f} s | {t_pure / t_peft:.3f}x | <= {goal}x | {dev:.1e} | "
            + (f"{exact:.1e} |" if exact is not None else "n/a |")
        )
    lines += [
        "",
        "Deviation: svd compares the merged deltas B @ A (both are the best rank-16 "
        "approximation of the same sum; PEFT computes its SVD densely in float32, deltahub from "
        "the factors in float64, so the last column, against a float64 dense SVD, says which "
        "one the deviation belongs to); ties compares the merged factors themselves.",
    ]
    write_section(args.out, "merge", "\n".join(lines))


if __name__ == "__main__":
    main()
