"""AdapterFusion speed: deltahub vs AdapterHub `adapters`, same model, same batch, ONE process.

Both libraries run in the same process on the same transformers version (AdapterHub's
pin, 4.57), so neither gets a different transformers or torch build:

    .venv-adapters/bin/pip install -e . --no-deps     # deltahub next to adapters 1.3
    .venv-adapters/bin/python bench/fusion_bench.py [--ns 2,3,4,8,16] [--rounds 3]

bert-base config (768 wide, 12 layers, random seeded weights: nothing downloaded), batch
`--batch` x `--seq`, N Pfeiffer bottlenecks (AdapterHub's `seq_bn`: reduction 16, after
the FFN, reading LN(x + h); deltahub's bottleneck follows SeqBnConfig's placement) with
non-zero weights, frozen, fused (deltahub: per-layer fusion, the default):

- forward: the bare base vs the base with the fusion active, no grad, eval mode;
- one fusion training step (the adapters and the base frozen): forward, loss, backward,
  AdamW;
- "floor": the frozen bare base's forward (train mode, as the steps) plus its backward
  down to the first fusion site (layer 0's FFN output; input gradients only, no weight
  gradients). Any exact fusion step pays at least this to reach layer 0's fusion
  parameters, so a step <= 0.5x AdapterHub's is attainable only where AdapterHub's step /
  floor >= 2 (and more than that: both steps also pay AdamW over ~21 M fusion
  parameters, timed alone as "adamw": the step with fake gradients, then zero_grad).

The forward's floor is arithmetic (printed per N): an exact Fuse(N) forward needs at each
site the N down-projections (d x R), the scores' bilinear factors (d x R, Q^T K folded
into the up-projections) and the values (d x R, V folded in), 3 d R multiply-adds per
token (R = 48 N here), against the base's 12 d^2 + 2 T d per token and layer (Q, K, V,
O: 4 d^2; FFN: 8 d^2; attention scores and mix: 2 T d).

The forward is steady-state serving: the step variant changes the fusion parameters
every round, so the fused forward's `prepare` runs one untimed forward first (deltahub
refolds its cached matrices there, 3 d^2 (R + N) multiply-adds per site, once per change
of Q, K, V; AdapterHub has nothing to cache). Before this, a full run's forward figures
included that refold every round.

Each library works on its own copy of the same base. For each N every variant is timed
once per round, rounds interleaved (order reversed every other round); figures are
medians over rounds of per-round ratios (paired), in CPU time (`time.process_time`)
and wall time; the load average is printed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def bert(seed: int = 0) -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig()).eval()  # bert-base: 768 wide, 12 layers, 3072 FFN


def randomize(params: list[Any], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


Variant = tuple[Callable[[], object], Callable[[], object]]  # (prepare, timed call)


def once(variant: Variant) -> tuple[float, float]:
    """(CPU s, wall s) of the timed call; switching the fusion on or off and the train /
    eval mode happen in `prepare`, outside the timing (as a server that switches once)."""
    prepare, fn = variant
    prepare()
    c, w = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c, time.perf_counter() - w


def setup_deltahub(model: Any, names: list[str]) -> tuple[Any, Any, Any, list[Any]]:
    from deltahub.compose.blocks import Fuse
    from deltahub.compose.model import AdaptedModel
    from deltahub.fusion.layer import add_fusion

    adapted = AdaptedModel(model)
    for i, n in enumerate(names):
        adapted.add_adapter(n, {"method": "bottleneck", "variant": "pfeiffer", "reduction_factor": 16})
        adapter = adapted.get_adapter(n)
        randomize(list(adapter.parameters()), i)
        adapter.requires_grad_(False)
    fusion = add_fusion(adapted, "f", names)

    def on() -> None:
        adapted.activate(Fuse(*names, name="f"))

    return adapted, on, adapted.deactivate, list(fusion.parameters())


def setup_adapters(model: Any, names: list[str]) -> tuple[Any, Any, Any, list[Any]]:
    import adapters
    from adapters.composition import Fuse

    adapters.init(model)
    for i, n in enumerate(names):
        model.add_adapter(n, config="seq_bn")  # Pfeiffer: reduction 16, after the FFN
        randomize([p for name, p in model.named_parameters() if f"adapters.{n}." in name], i)
    fuse = Fuse(*names)
    model.add_adapter_fusion(fuse)
    model.train_adapter_fusion(fuse)  # freezes everything but the fusion layers
    params = [p for name, p in model.named_parameters() if "adapter_fusion_layer" in name]

    def on() -> None:
        model.set_active_adapters(fuse)

    def off() -> None:
        model.set_active_adapters(None)

    return model, on, off, params


def variants_of(lib: str, base: Any, n: int, ids: Any, mask: Any) -> tuple[dict[str, Variant], int]:
    names = [f"a{i}" for i in range(n)]
    model = copy.deepcopy(base)
    runner, on, off, fusion_params = (setup_deltahub if lib == "deltahub" else setup_adapters)(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in fusion_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(fusion_params, lr=1e-4)

    def prepare(active: bool, train: bool) -> Callable[[], object]:
        def run() -> None:
            model.train(train)
            (on if active else off)()
            if active and not train:
                forward()  # untimed: the step variant changed Q, K, V; refold once, as a server

        return run

    def forward() -> None:
        with torch.no_grad():
            runner(input_ids=ids, attention_mask=mask)

    def step() -> None:
        out = runner(input_ids=ids, attention_mask=mask).last_hidden_state
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def floor() -> None:
        # The frozen base, forward and backward down to layer 0's FFN output (the first
        # fusion site): that output becomes a leaf, so no gradient goes further down.
        site = model.encoder.layer[0].output.dense
        hook = site.register_forward_hook(lambda m, i, out: out.detach().requires_grad_(True))
        try:
            out = runner(input_ids=ids, attention_mask=mask).last_hidden_state
            out.float().pow(2).mean().backward()
        finally:
            hook.remove()

    variants = {
        f"{lib}:base": (prepare(False, False), forward),
        f"{lib}:fuse": (prepare(True, False), forward),
        f"{lib}:step": (prepare(True, True), step),
    }

    def with_grads() -> None:
        model.train(True)
        for p in fusion_params:
            p.grad = torch.full_like(p, 1e-3)

    def adamw() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    if lib == "deltahub":
        variants["floor"] = (prepare(False, True), floor)
        variants["adamw"] = (with_grads, adamw)  # the optimizer's share of a step (both libraries pay it)
    return variants, sum(p.numel() for p in fusion_params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="2,3,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--forward-only", action="store_true", help="time only the forwards (more rounds in the same time)"
    )
    args = ap.parse_args()
    import adapters
    import transformers

    transformers.logging.set_verbosity_error()  # adapters' "none are activated" on the bare-base forward
    logging.getLogger("adapters").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, adapters {adapters.__version__}, "
        f"{torch.get_num_threads()} thread(s), batch {args.batch} x {args.seq}, {args.rounds} rounds"
    )
    base = bert()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    d, layer_macs = 768, 12 * 768 * 768 + 2 * args.seq * 768  # per token and layer
    print(
        "\n| N | forward floor (MACs) | deltahub Fuse fwd overhead, CPU (wall) | adapters Fuse fwd overhead, CPU (wall) | "
        "step deltahub / adapters, CPU (wall) | CPU s: step deltahub / adapters / floor / AdamW alone | "
        "adapters step / floor, CPU (wall) | deltahub step / floor, CPU | fusion params, deltahub / adapters |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in [int(v) for v in args.ns.split(",")]:
        ours, p_ours = variants_of("deltahub", base, n, ids, mask)
        theirs, p_theirs = variants_of("adapters", base, n, ids, mask)
        variants = {**ours, **theirs}
        if args.forward_only:
            variants = {k: v for k, v in variants.items() if k.endswith((":base", ":fuse"))}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for v in variants.values():
            once(v)  # warm-up
        keys = list(variants)
        for r in range(args.rounds):
            for k in keys if r % 2 == 0 else reversed(keys):
                times[k].append(once(variants[k]))

        def paired(
            a: str, b: str, times: dict[str, list[tuple[float, float]]] = times
        ) -> tuple[float, float]:
            ta, tb = times[a], times[b]
            return (
                statistics.median(x[0] / y[0] for x, y in zip(ta, tb, strict=True)),
                statistics.median(x[1] / y[1] for x, y in zip(ta, tb, strict=True)),
            )

        oc, ow = paired("deltahub:fuse", "deltahub:base")
        ac, aw = paired("adapters:fuse", "adapters:base")
        floor_fwd = 3 * d * 48 * n / layer_macs
        if args.forward_only:
            print(
                f"| {n} | {100 * floor_fwd:+.1f}% | {100 * (oc - 1):+.0f}% ({100 * (ow - 1):+.0f}%) | "
                f"{100 * (ac - 1):+.0f}% ({100 * (aw - 1):+.0f}%) | - | - | - | - | {p_ours:,} / {p_theirs:,} |",
                flush=True,
            )
            continue
        sc, sw = paired("deltahub:step", "adapters:step")
        fc, fw = paired("adapters:step", "floor")
        dc, _ = paired("deltahub:step", "floor")
        so = statistics.median(t[0] for t in times["deltahub:step"])
        sa = statistics.median(t[0] for t in times["adapters:step"])
        sf = statistics.median(t[0] for t in times["floor"])
        sopt = statistics.median(t[0] for t in times["adamw"])
        print(
            f"| {n} | {100 * floor_fwd:+.1f}% | {100 * (oc - 1):+.0f}% ({100 * (ow - 1):+.0f}%) | "
            f"{100 * (ac - 1):+.0f}% ({100 * (aw - 1):+.0f}%) | {sc:.2f}x ({sw:.2f}x) | "
            f"{so:.2f} / {sa:.2f} / {sf:.2f} / {sopt:.2f} | "
            f"{fc:.2f}x ({fw:.2f}x) | {dc:.2f}x | {p_ours:,} / {p_theirs:,} |",
            flush=True,
        )
        del ours, theirs, variants
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
