"""Fuse two trained adapters for a new task with AdapterFusion, and look at its attention.

    python examples/fuse.py

Trains a sentiment and a topic LoRA on the quickstart's word-list tasks, then learns a
fusion of both for `review` (sentiment x topic) from 160 examples. About a minute on a
2-core CPU with the small built-in base.
"""

import os
import tempfile
from pathlib import Path

import deltahub
from deltahub import Registry
from deltahub.quickstart import build_small_base, write_tasks

work = Path(tempfile.mkdtemp(prefix="deltahub-example-"))
registry = Registry(os.environ.get("DELTAHUB_HOME") or work / "home")
base = str(build_small_base(work / "base"))
tasks = write_tasks(work / "data")
common = {"base": base, "registry": registry, "epochs": 3, "lr": 5e-3, "r": 8, "alpha": 16, "progress": False}

for task in ("sentiment", "topic"):
    result = deltahub.train(
        data=tasks[task]["train"], eval_data=tasks[task]["eval"], name=f"demo/{task}", **common
    )
    print(f"{result.version.ref}: accuracy {result.metrics['accuracy']:.3f}")

fusion = deltahub.fuse(
    ["demo/sentiment", "demo/topic"],
    base=base,
    data=tasks["review"]["train"],
    eval_data=tasks["review"]["eval"],
    name="demo/review",
    registry=registry,
    epochs=4,
    lr=5e-3,
    progress=False,
)
print(f"{fusion.version.ref}: accuracy {fusion.metrics['accuracy']:.3f}")
print("pinned constituents:", [(p["ref"], p["digest"][:19]) for p in fusion.version.parents])
for name, weight in registry.manifest(fusion.version).extra["fusion"]["attention"].items():
    print(f"mean attention on {name}: {weight:.3f}")
