"""Thousands of resident LoRAs: memory and load time per adapter, and routed batches
that page them through the slots (issue 19).

Base: LlamaForCausalLM(hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 8000),
random weights, fp32, CPU, 1 thread. `--n` LoRAs r=16, alpha 32 on q_proj, v_proj
(8 modules, 512 KiB of factors each), random, published into a temporary registry.

    python bench/resident_bench.py [--n 1000] [--batches 4] [--seq 16]

Each variant runs in a fresh process (RSS is per process) over the same registry:

  mapped   `AdaptedModel.load`: the factors stay views of each blob's private map
           (`deltahub.compose.mapped`);
  before   the load path before `compose.mapped` (safe_open's `get_tensor` handed to
           `from_tensors` directly: safetensors already returns views of its map);
  copied   the same load with every tensor copied into process memory (what a
           directory load does now, and what a copying loader would cost).

Per variant: VmRSS (and its anonymous / file-backed parts, /proc/self/status) before
and after loading all adapters, growth per adapter; load time per adapter (wall and
CPU; blobs are hashed once per process first, timed apart); then `--batches` routed
batches of 64 rows x `--seq` tokens, each over 64 adapters none of which is in a slot
yet (64 slots: each batch pages 64 in, evicting the previous 64), timed, and RSS after;
then unload everything and count the blob maps left. The parent checks that the routed
logits agree exactly across variants.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 8000
TARGETS = ["q_proj", "v_proj"]
R = 16


def base_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


def memory() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile in KiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    return out


def build(home: Path, n: int) -> None:
    os.environ["DELTAHUB_HOME"] = str(home)
    from deltahub import AdaptedModel, load_base
    from deltahub.registry import Registry

    model = AdaptedModel(load_base(base_model(), device="cpu"))
    reg = Registry()
    scratch = Path(tempfile.mkdtemp())
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for i in range(n):
        model.add_adapter("t", {"method": "lora", "r": R, "lora_alpha": 2 * R, "target_modules": TARGETS})
        with torch.no_grad():
            for p in model.get_adapter("t").parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        d = model.save_adapter("t", scratch / "t")
        reg.publish(d, f"r{i}")
        shutil.rmtree(d)
        model.unload("t")
    shutil.rmtree(scratch)
    print(f"built {n} adapters in {time.perf_counter() - t:.1f} s", flush=True)


def child(variant: str, home: Path, n: int, batches: int, seq: int) -> dict:
    os.environ["DELTAHUB_HOME"] = str(home)
    torch.set_num_threads(1)
    import contextlib

    from deltahub import AdaptedModel, load_base
    from deltahub.compose import mapped
    from deltahub.compose import model as model_module
    from deltahub.registry import Registry

    if variant == "copied":
        model_module.read_tensors = lambda path, map_file, infos: mapped.read_tensors(path, False, infos)  # type: ignore[assignment]
    elif variant == "before":

        class Plain:
            def __init__(self, handle):
                self.get = handle.get_tensor

            def stats(self, *a):
                return mapped.LoadStats()

        @contextlib.contextmanager
        def plain(path, map_file, infos):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as h:
                yield Plain(h)

        model_module.read_tensors = plain  # type: ignore[assignment]

    model = AdaptedModel(load_base(base_model(), device="cpu"), registry=Registry())
    model.eval()
    names = [f"r{i}" for i in range(n)]
    c, w = time.process_time(), time.perf_counter()
    for nm in names:  # hash each blob once (what a process's first open does)
        model.registry.open(nm)
    verify = (time.process_time() - c, time.perf_counter() - w)
    gc.collect()
    m0 = memory()
    c, w = time.process_time(), time.perf_counter()
    for nm in names:
        model.load(nm)
    load = (time.process_time() - c, time.perf_counter() - w)
    gc.collect()
    m1 = memory()
    stats = [model.load_stats[nm] for nm in names if nm in model.load_stats]
    xr = torch.randint(0, VOCAB, (64, seq), generator=torch.Generator().manual_seed(1))
    routed, checks = [], []
    with torch.no_grad():
        model(input_ids=xr[:2])  # warm-up of the base alone
        for b in range(batches):
            rows = [names[(64 * b + i) % n] for i in range(64)]
            c, w = time.process_time(), time.perf_counter()
            logits = model(input_ids=xr, adapter_names=rows).logits
            routed.append((time.process_time() - c, time.perf_counter() - w))
            checks.append(logits[:, -1].double().sum().item())
            again = time.perf_counter()
            model(input_ids=xr, adapter_names=rows)  # same adapters: already in slots
            routed[-1] += (time.perf_counter() - again,)
    m2 = memory()
    page_ins = model._slot_table.page_ins if model._slot_table is not None else 0
    for nm in names:
        model.unload(nm)
    gc.collect()
    m3 = memory()
    blobs = str(home / "blobs")
    with open("/proc/self/maps") as f:
        left = sum(1 for line in f if blobs in line)
    return {
        "variant": variant,
        "n": n,
        "verify_s": verify,
        "load_s": load,
        "mem": [m0, m1, m2, m3],
        "mapped": sum(s.mapped for s in stats),
        "copied": sum(s.copied for s in stats),
        "misaligned": sum(s.misaligned for s in stats),
        "routed_s": routed,
        "page_ins": page_ins,
        "checks": checks,
        "maps_left": left,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--variants", default="mapped,before,copied")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--home", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.home), args.n, args.batches, args.seq)))
        return
    print(f"load average before: {os.getloadavg()}  torch {torch.__version__}", flush=True)
    home = Path(tempfile.mkdtemp(prefix="resident-bench-"))
    try:
        build(home, args.n)
        results = []
        for v in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", v, "--home", str(home), "--n", str(args.n)]
            cmd += ["--batches", str(args.batches), "--seq", str(args.seq)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    n = args.n
    print(f"\n{n} resident LoRAs r={R} on {TARGETS} x 4 layers (512 KiB of factors each), 1 thread")
    print(
        "| variant | RSS growth / adapter KiB (anon, file) | load ms / adapter, wall (CPU) "
        "| hash once ms / adapter | held as views / copies | RSS after routing MiB (anon, file) "
        "| after unload: RSS over start MiB, maps left |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m0, m1, m2, m3 = r["mem"]
        per = {k: (m1[k] - m0[k]) / n for k in m0}
        lc, lw = r["load_s"]
        print(
            f"| {r['variant']} | {per['VmRSS']:.1f} ({per['RssAnon']:.1f}, {per['RssFile']:.1f}) "
            f"| {lw / n * 1e3:.2f} ({lc / n * 1e3:.2f}) | {r['verify_s'][1] / n * 1e3:.2f} "
            f"| {r['mapped']} / {r['copied']} | {(m2['VmRSS'] - m0['VmRSS']) / 1024:.0f} "
            f"({(m2['RssAnon'] - m0['RssAnon']) / 1024:.0f}, {(m2['RssFile'] - m0['RssFile']) / 1024:.0f}) "
            f"| {(m3['VmRSS'] - m0['VmRSS']) / 1024:.0f}, {r['maps_left']} |"
        )
    print(f"\nrouted batches, 64 rows x {args.seq} tokens, 64 distinct adapters, 64 slots")
    print("| variant | page-ins | first pass (pages 64 in) ms, wall (CPU) | again (in slots) ms, wall |")
    print("|---|---|---|---|")
    for r in results:
        firsts = sorted(x[1] for x in r["routed_s"])
        cpus = sorted(x[0] for x in r["routed_s"])
        agains = sorted(x[2] for x in r["routed_s"])
        mid = len(firsts) // 2
        print(
            f"| {r['variant']} | {r['page_ins']} | {firsts[mid] * 1e3:.0f} ({cpus[mid] * 1e3:.0f}) "
            f"| {agains[mid] * 1e3:.0f} |"
        )
    ref = results[0]["checks"]
    same = all(r["checks"] == ref for r in results)
    print(f"\nrouted logits identical across variants: {same}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
