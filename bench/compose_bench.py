"""Composition runtime vs PEFT, same model, same batch, same process.

Model: LlamaForCausalLM(hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8000),
random weights, fp32, 1 thread (`--threads`). LoRA r=16, alpha 32 on q,k,v,o,gate,up,down
(56 modules); 64 such adapters, the same weights in PEFT and deltahub (PEFT saves them,
deltahub loads PEFT's directories).

    python bench/compose_bench.py [--rounds 5] [--threads 1] [--ks 1,8,32,64]

Measures, every variant timed once per round, rounds interleaved (the order reversed
every other round) so that load from other processes hits the variants alike:

  0. one site's kernel: the gathered slot computation (`slots.gathered_delta`) and the
     runs of rows in place (`slots.segmented_add_`, what a CPU uses) vs the per-adapter
     loop over the same rows, K distinct adapters among 64 rows of `--seq` tokens;
  1. unmerged LoRA forward / bare base forward (batch 8 x 128), deltahub and PEFT;
  2. per-row routing, 64 rows x `--seq` tokens, K distinct adapters (row i gets
     adapter i mod K) / the same batch with one adapter, deltahub (`adapter_names`) and
     PEFT's mixed-batch `adapter_names` forward; and the largest K with the rows
     shuffled (row i gets adapter perm(i) mod K), where deltahub's slots do not follow
     the rows and no runs coalesce.

Each figure is the median over rounds of the per-round ratio (paired), in CPU time
(`time.process_time`, this process only) and wall time; the load average is printed
before and after. Max |deltahub - PEFT| of the routed logits guards correctness.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 8000
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def once(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call, without autograd."""
    c, w = time.process_time(), time.perf_counter()
    with torch.no_grad():
        fn()
    return time.process_time() - c, time.perf_counter() - w


def interleaved(
    variants: dict[str, Callable[[], object]], rounds: int
) -> dict[str, list[tuple[float, float]]]:
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for fn in variants.values():
        once(fn)  # warm-up
    keys = list(variants)
    for i in range(rounds):
        for k in keys if i % 2 == 0 else reversed(keys):
            times[k].append(once(variants[k]))
    return times


def paired(times: dict[str, list[tuple[float, float]]], a: str, b: str) -> tuple[float, float]:
    """Median over rounds of a/b: (CPU, wall)."""
    cpu = statistics.median(x[0] / y[0] for x, y in zip(times[a], times[b], strict=True))
    wall = statistics.median(x[1] / y[1] for x, y in zip(times[a], times[b], strict=True))
    return cpu, wall


def med_ms(times: dict[str, list[tuple[float, float]]], k: str) -> str:
    return f"{statistics.median(t[0] for t in times[k]) * 1e3:.0f} / {statistics.median(t[1] for t in times[k]) * 1e3:.0f}"


def lora_mac_share(base: torch.nn.Module, r: int, seq: int) -> tuple[float, float]:
    """LoRA's multiply-adds per token as a fraction of the base's: (of the base's linear
    layers, of linear layers + attention scores and values at `seq` tokens, causal).

    The floor of any unmerged LoRA forward is 1 + this, reached only if the LoRA's skinny
    matmuls ran as efficiently as the base's wide ones.
    """
    linear = lora = 0
    for name, m in base.named_modules():
        if isinstance(m, torch.nn.Linear):
            linear += m.in_features * m.out_features
            if name.rsplit(".", 1)[-1] in TARGETS:
                lora += r * (m.in_features + m.out_features)
    cfg = base.config
    attention = cfg.num_hidden_layers * 2 * cfg.hidden_size * (seq + 1) / 2  # QK^T and PV, causal mean
    return lora / linear, lora / (linear + attention)


def kernel_bench(rounds: int, ks: list[int], t: int) -> None:
    """One 512 -> 512 site, r=16, 64 rows x `t` tokens: the gathered bmm pair, the
    in-place runs over views of the slots, and the per-adapter loop."""
    from deltahub.compose.slots import SlotBank, gathered_delta, run_pieces, segmented_add_, slot_runs
    from deltahub.methods.lora.layer import LoraLayer

    d, r, rows = 512, 16, 64
    g = torch.Generator().manual_seed(0)
    n = max(ks)
    bank = SlotBank(d, d, torch.float32, torch.device("cpu"))
    site = torch.nn.Linear(d, d)
    for s in range(1, n + 1):
        layer = LoraLayer(site, r, scaling=2.0, use_dora=False, dtype=torch.float32)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(r, d, generator=g) * 0.02)
            layer.lora_B.copy_(torch.randn(d, r, generator=g) * 0.02)
        bank.put(s, layer, n)
    x = torch.randn(rows, t, d, generator=g)
    print(f"\n0. one site (512 -> 512, r 16, 64 rows x {t} tokens): CPU ms per call and / loop")
    reps = 20
    print(
        "| K | gathered (bmm pair) | runs in place (`segmented_add_`) | per-adapter loop | gathered / loop | runs / loop |"
    )
    print("|---|---|---|---|---|---|")
    for k in ks:
        slots = torch.arange(rows) % k + 1
        groups = [(s, (slots == s).nonzero().flatten()) for s in range(1, k + 1)]
        pieces = run_pieces(slot_runs(slots.tolist()), rows, t)

        def gathered(slots=slots):
            y = torch.zeros(rows, t, d)
            y.add_(gathered_delta(x, slots, bank))

        def segmented(pieces=pieces):
            y = torch.zeros(rows, t, d)
            segmented_add_(y, x, pieces, bank)

        def loop(groups=groups):
            y = torch.zeros(rows, t, d)
            for s, idx in groups:
                h = x.index_select(0, idx) @ bank.At[s]
                y.index_add_(0, idx, h @ bank.Bt[s])

        def rep(f):
            return lambda: [f() for _ in range(reps)]

        tt = interleaved({"g": rep(gathered), "s": rep(segmented), "l": rep(loop)}, rounds)
        gl, _ = paired(tt, "g", "l")
        sl, _ = paired(tt, "s", "l")
        ms = {v: statistics.median(c for c, _ in tt[v]) / reps * 1e3 for v in "gsl"}
        print(f"| {k} | {ms['g']:.3f} | {ms['s']:.3f} | {ms['l']:.3f} | {gl:.2f}x | {sl:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seq", type=int, default=8, help="tokens per row in the routing batch")
    ap.add_argument("--ks", default="1,8,32,64")
    ap.add_argument("--sections", default="0,1,2", help="which measures to run (0, 1, 2 below)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.environ.setdefault("DELTAHUB_HOME", tempfile.mkdtemp())
    ks = [int(k) for k in args.ks.split(",")]
    print(f"load average before: {os.getloadavg()}")
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}  rounds {args.rounds}")
    if "0" in args.sections:
        kernel_bench(args.rounds, ks, args.seq)
    if "1" not in args.sections and "2" not in args.sections:
        return

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltahub import AdaptedModel, load_base

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
    n_adapters = max(ks)
    names = [f"a{i}" for i in range(n_adapters)]
    lcfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    pm = get_peft_model(copy.deepcopy(base), lcfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, lcfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    scratch = Path(tempfile.mkdtemp())
    pm.save_pretrained(str(scratch))  # each adapter in its own subdirectory (none is "default")
    del pm
    peft_model = PeftModel.from_pretrained(
        copy.deepcopy(base), str(scratch / names[0]), adapter_name=names[0]
    )
    peft_model.eval()
    ours = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    ours.load_path(scratch / names[0], names[0])
    for n in names[1:]:
        peft_model.load_adapter(str(scratch / n), adapter_name=n)
        ours.load_path(scratch / n, n)
    ours.eval()
    ours_base = ours.base

    # ---- 1. unmerged LoRA forward / bare base, batch 8 x 128
    if "1" in args.sections:
        x = torch.randint(0, VOCAB, (8, 128), generator=torch.Generator().manual_seed(0))
        ours.activate(names[0])
        peft_model.set_adapter(names[0])

        def bare():
            ours.deactivate()
            try:
                ours_base(input_ids=x)
            finally:
                ours.activate(names[0])

        t1 = interleaved(
            {"base": bare, "ours": lambda: ours(input_ids=x), "peft": lambda: peft_model(input_ids=x)},
            args.rounds,
        )
        ours.deactivate()
        print(
            f"\n1. unmerged LoRA forward / bare base, batch 8 x 128; median ms CPU / wall: base {med_ms(t1, 'base')}"
        )
        print("| | CPU ms / wall ms | / base, CPU (paired median) | / base, wall (paired median) |")
        print("|---|---|---|---|")
        for k, label in (("ours", "deltahub"), ("peft", "PEFT")):
            cpu, wall = paired(t1, k, "base")
            print(f"| {label} | {med_ms(t1, k)} | {cpu:.3f}x | {wall:.3f}x |")
        lin, full = lora_mac_share(ours_base, 16, 128)
        print(
            f"LoRA multiply-adds / the base's: {lin:.2%} of its linear layers, {full:.2%} with attention "
            f"(the floor of an unmerged forward: {1 + full:.3f}x)"
        )

    # ---- 2. per-row routing, 64 rows
    if "2" not in args.sections:
        return
    xr = torch.randint(0, VOCAB, (64, args.seq), generator=torch.Generator().manual_seed(1))
    variants: dict[str, Callable[[], object]] = {}
    for k in ks:
        rows = [names[i % k] for i in range(64)]
        variants[f"ours{k}"] = lambda rows=rows: ours(input_ids=xr, adapter_names=rows)
        variants[f"peft{k}"] = lambda rows=rows: peft_model(input_ids=xr, adapter_names=rows)
    # The same K rows in a shuffled order: the adapters' slots no longer follow the rows,
    # so no runs coalesce into one bmm pair (`slots.run_pieces`): every run is its own matmuls.
    kmax = ks[-1]
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(2)).tolist()
    shuffled = [names[perm[i] % kmax] for i in range(64)]
    variants["ours_shuffled"] = lambda: ours(input_ids=xr, adapter_names=shuffled)
    variants["peft_shuffled"] = lambda: peft_model(input_ids=xr, adapter_names=shuffled)
    t2 = interleaved(variants, args.rounds)
    print(f"\n2. per-row routing, 64 rows x {args.seq} tokens, K distinct adapters / one adapter (K=1)")
    print(
        "| K | deltahub CPU / wall ms | deltahub / K=1, CPU (wall) | PEFT CPU / wall ms | PEFT / K=1, CPU (wall) |"
    )
    print("|---|---|---|---|---|")
    for k in ks:
        oc, ow = paired(t2, f"ours{k}", f"ours{ks[0]}")
        pc, pw = paired(t2, f"peft{k}", f"peft{ks[0]}")
        print(
            f"| {k} | {med_ms(t2, f'ours{k}')} | {oc:.3f}x ({ow:.3f}x) | {med_ms(t2, f'peft{k}')} | {pc:.3f}x ({pw:.3f}x) |"
        )
    oc, ow = paired(t2, "ours_shuffled", f"ours{ks[0]}")
    pc, pw = paired(t2, "peft_shuffled", f"peft{ks[0]}")
    print(
        f"| {kmax}, rows shuffled | {med_ms(t2, 'ours_shuffled')} | {oc:.3f}x ({ow:.3f}x) | "
        f"{med_ms(t2, 'peft_shuffled')} | {pc:.3f}x ({pw:.3f}x) |"
    )
    dc, dw = paired(t2, f"ours{ks[-1]}", f"peft{ks[-1]}")
    print(f"deltahub / PEFT at K={ks[-1]}: CPU {dc:.3f}x, wall {dw:.3f}x")
    with torch.no_grad():
        rows = [names[i % ks[-1]] for i in range(64)]
        a = ours(input_ids=xr, adapter_names=rows).logits
        b = peft_model(input_ids=xr, adapter_names=rows).logits
    print(f"routed logits max |deltahub - PEFT| = {float((a - b).abs().max()):.2e}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
