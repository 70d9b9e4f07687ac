"""AdapterFusion speed: deltahub vs AdapterHub `adapters`, same model, same batch, same run.

bert-base-sized BertModel (random, seeded: nothing downloaded), batch 16 x 128 tokens,
3 Pfeiffer (sequential bottleneck, reduction 16) adapters with non-zero weights, fused.
Measured in each library, in separate processes run alternately round by round (adapters
pins transformers 4.57, so it lives in its own virtual environment):

- forward: the bare base vs the base with Fuse(a, b, c) active, no grad, eval mode;
- one training step of the fusion (the adapters frozen): forward, loss, backward, AdamW;
- the number of fusion parameters.

    python -m venv .venv-adapters
    .venv-adapters/bin/pip install torch==2.13.0 adapters
    python bench/fusion_bench.py --rounds 2

Each worker prints one JSON line; the parent prints medians and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["a", "b", "c"]


def bert(seed: int = 0) -> Any:
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig()).eval()  # bert-base: 768 wide, 12 layers, 3072 FFN


def randomize(params: list[Any], seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def setup_deltahub(model: Any) -> tuple[Any, Any, Any, list[Any]]:
    sys.path.insert(0, str(ROOT))
    from deltahub.compose.blocks import Fuse
    from deltahub.compose.model import AdaptedModel
    from deltahub.fusion.layer import add_fusion

    adapted = AdaptedModel(model)
    for i, n in enumerate(NAMES):
        adapted.add_adapter(n, {"method": "bottleneck", "variant": "pfeiffer", "reduction_factor": 16})
        adapter = adapted.get_adapter(n)
        randomize(list(adapter.parameters()), i)
        adapter.requires_grad_(False)
    fusion = add_fusion(adapted, "f", NAMES)

    def on() -> None:
        adapted.activate(Fuse(*NAMES, name="f"))

    return adapted, on, adapted.deactivate, list(fusion.parameters())


def setup_adapters(model: Any) -> tuple[Any, Any, Any, list[Any]]:
    import adapters
    from adapters.composition import Fuse

    adapters.init(model)
    for i, n in enumerate(NAMES):
        model.add_adapter(n, config="seq_bn")  # Pfeiffer: reduction 16, after the FFN
        randomize([p for name, p in model.named_parameters() if f"adapters.{n}." in name], i)
    fuse = Fuse(*NAMES)
    model.add_adapter_fusion(fuse)
    model.train_adapter_fusion(fuse)  # freezes everything but the fusion layers
    params = [p for name, p in model.named_parameters() if "adapter_fusion_layer" in name]

    def on() -> None:
        model.set_active_adapters(fuse)

    def off() -> None:
        model.set_active_adapters(None)

    return model, on, off, params


def worker(lib: str, repeats: int, batch: int, seq: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    model = bert()
    runner, on, off, fusion_params = (setup_deltahub if lib == "deltahub" else setup_adapters)(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    mask = torch.ones_like(ids)

    def forward() -> None:
        with torch.no_grad():
            runner(input_ids=ids, attention_mask=mask)

    model.eval()
    off()
    t_base = timed(forward, repeats)
    on()
    t_fuse = timed(forward, repeats)

    for p in model.parameters():
        p.requires_grad_(False)
    for p in fusion_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(fusion_params, lr=1e-4)
    model.train()

    def step() -> None:
        out = runner(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_step = timed(step, max(1, repeats // 2))
    print(
        json.dumps(
            {
                "lib": lib,
                "forward_base_s": t_base,
                "forward_fuse_s": t_fuse,
                "train_step_s": t_step,
                "fusion_params": sum(p.numel() for p in fusion_params),
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed forwards per setting (steps: half)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapters-python", default=str(ROOT / ".venv-adapters" / "bin" / "python"))
    ap.add_argument("--worker", choices=["deltahub", "adapters"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="write the markdown section here too")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.repeats, args.batch, args.seq, args.threads)
        return

    pythons = {"deltahub": sys.executable, "adapters": args.adapters_python}
    results: dict[str, list[dict[str, Any]]] = {"deltahub": [], "adapters": []}
    t0 = time.time()
    for r in range(args.rounds):
        order = ["adapters", "deltahub"] if r % 2 else ["deltahub", "adapters"]
        for lib in order:
            cmd = [pythons[lib], __file__, "--worker", lib, "--repeats", str(args.repeats), "--batch",
                   str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                sys.exit(f"{lib} worker failed:\n{proc.stderr[-3000:]}")
            results[lib].append(json.loads(lines[-1]))
            print(f"round {r} {lib}: {lines[-1]}  ({time.time() - t0:.0f}s)", flush=True)

    def med(lib: str, key: str) -> float:
        return statistics.median(x[key] for x in results[lib])

    rows = []
    for lib in ("deltahub", "adapters"):
        base, fused, step = med(lib, "forward_base_s"), med(lib, "forward_fuse_s"), med(lib, "train_step_s")
        rows.append(
            f"| {lib} | {base:.3f} | {fused:.3f} | {100 * (fused / base - 1):+.0f}% | {step:.2f} | "
            f"{results[lib][0]['fusion_params']:,} |"
        )
    ratio = med("deltahub", "train_step_s") / med("adapters", "train_step_s")
    text = "\n".join(
        [
            f"bert-base config (random weights), batch {args.batch} x {args.seq}, 3 Pfeiffer adapters (reduction 16) "
            f"fused, {args.threads} threads, medians over {args.rounds} alternating rounds x {args.repeats} repeats.",
            "",
            "| library | base forward (s) | Fuse forward (s) | Fuse overhead | fusion train step (s) | fusion params |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"train step, deltahub / adapters: {ratio:.2f}x",
        ]
    )
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
