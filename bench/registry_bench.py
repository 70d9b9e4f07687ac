"""Registry benchmark: publish throughput, and resolve/list/search latency at 1k and 100k versions.

    python bench/registry_bench.py [--publishes 1000] [--large 100000] [--out bench/RESULTS.md]

The first 1,000 versions go through `Registry.publish` (validation, blob copies with fsync,
one BEGIN IMMEDIATE transaction each). Growing to 100,000 versions that way would take
tens of minutes of fsyncs, so the rest are inserted in batches through the same
row-writing code (`Registry._insert`) reusing the blobs already stored: the tables and
indexes the queries read are exactly those a real registry of that size has.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltahub import artifact as af  # noqa: E402
from deltahub.registry import Registry  # noqa: E402
from deltahub.registry.db import write_transaction  # noqa: E402

NAMES = 100  # adapters; versions spread over them


def make_artifact(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    path.mkdir(parents=True)
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.randn(8, 64, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(64, 8, generator=g),
        },
        str(path / af.WEIGHTS_FILE),
    )
    (path / af.CONFIG_FILE).write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    )
    return path


def latency(fn, repeat: int = 200) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"median_ms": statistics.median(times), "p95_ms": times[int(0.95 * len(times)) - 1]}


def measure(registry: Registry, total: int) -> dict[str, dict[str, float]]:
    return {
        "resolve name@latest": latency(lambda: registry.resolve(f"adapter{total % NAMES}")),
        "resolve name@version": latency(lambda: registry.resolve(f"adapter{total % NAMES}@1")),
        "list (latest of each)": latency(lambda: registry.list(), repeat=20),
        "list --task": latency(lambda: registry.list(task="task7"), repeat=50),
        "search": latency(lambda: registry.search("reviews 42"), repeat=50),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--publishes", type=int, default=1000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=None, help="append a section to this RESULTS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        arts = [make_artifact(tmp / f"art{i}", i) for i in range(10)]
        registry = Registry(tmp / "home")
        t0 = time.perf_counter()
        for i in range(args.publishes):
            registry.publish(
                arts[i % len(arts)],
                name=f"adapter{i % NAMES}",
                task=f"task{i % 10}",
                description=f"classifier for reviews batch {i}",
            )
        publish_s = time.perf_counter() - t0
        small = measure(registry, args.publishes)

        template = registry.resolve("adapter0@1")
        manifest = registry.manifest(template)
        blobs = {f: (d, registry.store.path(d).stat().st_size) for f, d in template.files.items()}
        t1 = time.perf_counter()
        done = args.publishes
        while done < args.large:
            with write_transaction(registry.db):
                for i in range(done, min(done + 5000, args.large)):
                    m = af.Manifest(
                        name=f"adapter{i % NAMES}",
                        method="lora",
                        version=f"{i}.0",
                        task=f"task{i % 10}",
                        description=f"classifier for reviews batch {i}",
                        created=manifest.created,
                    )
                    registry._insert(m, blobs, ())
            done = min(done + 5000, args.large)
        fill_s = time.perf_counter() - t1
        large = measure(registry, args.large)
        assert len(registry.list(all_versions=True)) == args.large

    lines = [
        "## registry",
        "",
        f"Command: `python bench/registry_bench.py --publishes {args.publishes} --large {args.large}`",
        "Machine: 2 CPU cores (shared with other work at the time), local disk, SQLite WAL, synchronous=FULL.",
        "",
        f"- publish throughput: {args.publishes} publishes in {publish_s:.1f} s = **{args.publishes / publish_s:.0f} publishes/s** "
        f"({publish_s / args.publishes * 1e3:.1f} ms each: validate, 3 blob copies with fsync, one transaction)",
        f"- bulk fill to {args.large:,} versions (row inserts only): {fill_s:.1f} s",
        "",
        f"| operation | median @ {args.publishes:,} | p95 @ {args.publishes:,} | median @ {args.large:,} | p95 @ {args.large:,} |",
        "|---|---|---|---|---|",
    ]
    for key in small:
        s, lg = small[key], large[key]
        lines.append(
            f"| {key} | {s['median_ms']:.2f} ms | {s['p95_ms']:.2f} ms | {lg['median_ms']:.2f} ms | {lg['p95_ms']:.2f} ms |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from bench_results import write_section

        write_section(args.out, "registry", text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
