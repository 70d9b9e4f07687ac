"""The options `deltahub run` and `deltahub eval` share: which base, which adapters, how to
compose them, where to run, and how to read a classifier's logits; and loading from them.

`@model_options` adds REFS, --base, --sum / --average / --stack, --device, --quantize,
--batch-size, --force, --problem-type and --threshold to a command, and hands the command
one `ModelArgs` (keyword `model`) in place of those nine values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from deltahub.cli.completion import complete_refs

QUANTIZE = ("nf4", "fp4", "int8")
PROBLEM_TYPES = ("single-label", "regression", "multi-label")


def _weights(value: str | None, option: str, n: int) -> list[float] | None:
    if value is None:
        return None
    try:
        weights = [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers", param_hint=option
        ) from None
    if len(weights) != n:
        raise click.BadParameter(f"{len(weights)} weights for {n} adapters; give one each", param_hint=option)
    return weights


def composition_mode(
    n: int, sum_w: str | None, avg_w: str | None, stack: bool
) -> tuple[str, list[float] | None]:
    """The mode and weights that --sum / --average / --stack ask for."""
    if sum(x is not None and x is not False for x in (sum_w, avg_w, stack or None)) > 1:
        raise click.UsageError("give at most one of --sum, --average, --stack")
    if sum_w is not None:
        return "sum", _weights(sum_w, "--sum", n)
    if avg_w is not None:
        return "average", _weights(avg_w, "--average", n)
    return ("stack", None) if stack else ("single", None)


@dataclass(frozen=True)
class ModelArgs:
    """What `@model_options` parsed."""

    refs: tuple[str, ...]
    base_path: str
    sum_w: str | None = None
    avg_w: str | None = None
    stack: bool = False
    device: str | None = None
    quantize: str | None = None
    batch_size: int = 32
    force: bool = False
    problem_type: str | None = None
    threshold: float = 0.5

    def load(self) -> Any:
        """The base with REFS active, composed as asked (`inference.Loaded`)."""
        return load_model(
            self.refs,
            self.base_path,
            self.sum_w,
            self.avg_w,
            self.stack,
            self.device,
            self.quantize,
            self.force,
        )

    def reading(self) -> dict[str, Any]:
        """`predict` / `evaluate` keywords: how a classifier's logits are read."""
        return {"problem_type": self.problem_type, "threshold": self.threshold}


FIELDS = tuple(ModelArgs.__dataclass_fields__)


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """REFS, --base, the composition flags, --device, --quantize, --batch-size, --force,
    --problem-type and --threshold, passed to `fn` as one `ModelArgs` (keyword `model`)."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        model = ModelArgs(**{name: kwargs.pop(name) for name in FIELDS})
        return fn(*args, model=model, **kwargs)

    options = [
        click.argument("refs", nargs=-1, required=True, shell_complete=complete_refs),
        click.option(
            "--base",
            "base_path",
            required=True,
            type=click.Path(exists=True, file_okay=False),
            help="Directory of the base model and its tokenizer (save_pretrained output).",
        ),
        click.option("--sum", "sum_w", metavar="W1,W2,...", help="Activate Sum(REFS) with these weights."),
        click.option(
            "--average", "avg_w", metavar="W1,W2,...", help="Activate Average(REFS) with these weights."
        ),
        click.option(
            "--stack", is_flag=True, help="Activate Stack(REFS): each adapter on the previous one's output."
        ),
        click.option("--device", help="Where to run: cpu, cuda, cuda:1, mps (default: cuda when present)."),
        click.option(
            "--quantize",
            type=click.Choice(QUANTIZE),
            help="Load the base in 4-bit (nf4, fp4) or 8-bit through bitsandbytes.",
        ),
        click.option(
            "--batch-size",
            default=32,
            show_default=True,
            type=click.IntRange(min=1),
            help="Inputs a forward pass.",
        ),
        click.option("--force", is_flag=True, help="Load adapters even if their base fingerprint differs."),
        click.option(
            "--problem-type",
            type=click.Choice(PROBLEM_TYPES),
            help="Read a base classifier's logits as this (default: its config's problem_type; "
            "a trained head reads as it was trained).",
        ),
        click.option(
            "--threshold",
            default=0.5,
            show_default=True,
            type=click.FloatRange(0, 1),
            help="Multi-label: the labels whose sigmoid is at least this.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def load_model(
    refs: tuple[str, ...],
    base_path: str,
    sum_w: str | None,
    avg_w: str | None,
    stack: bool,
    device: str | None,
    quantize: str | None,
    force: bool,
) -> Any:
    mode, weights = composition_mode(len(refs), sum_w, avg_w, stack)
    from transformers.utils import logging as hf_logging

    from deltahub.training.inference import load

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per call would bury the answers

    return load(
        base_path, list(refs), mode=mode, weights=weights, force=force, device=device, quantize=quantize
    )
