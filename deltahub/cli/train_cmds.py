"""`deltahub train` (one adapter for a task) and `deltahub fuse` (AdapterFusion for a new task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from deltahub.cli.output import handle_errors, json_option, print_json

TASKS = ("classification", "causal-lm")


def _common(fn: Any) -> Any:
    """Options shared by train and fuse (data, task, schedule, publishing)."""
    options = [
        click.option("--base", required=True, help="Base model: a local directory or a hub id (its tokenizer too)."),
        click.option(
            "--data", required=True, type=click.Path(exists=True, dir_okay=False), help="Training data (.jsonl or .csv)."
        ),
        click.option(
            "--eval", "eval_data", type=click.Path(exists=True, dir_okay=False),
            help="Evaluation data, scored every epoch; enables early stopping.",
        ),
        click.option(
            "--task", type=click.Choice(TASKS), default="classification", show_default=True,
            help="classification: 'text' + 'label' columns. causal-lm: 'text', or 'prompt' + 'completion'.",
        ),
        click.option("--name", required=True, help="Name to publish the result under."),
        click.option("--epochs", type=int, default=3, show_default=True, help="Training epochs (at most)."),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="Learning rate (AdamW, linear decay)."),
        click.option("--batch-size", type=int, default=16, show_default=True, help="Examples per step per device."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of init and data order."),
        click.option("--max-length", type=int, default=128, show_default=True, help="Tokens kept per example."),
        click.option(
            "--patience", type=int, default=2, show_default=True,
            help="Stop after this many evaluations without improvement (0: never).",
        ),
        click.option("--version", "version", help="Version to publish (default: next number)."),
        click.option("--tag", "tags", multiple=True, help="Tag the new version (repeatable)."),
        click.option("--description", default="", help="Description stored in the manifest."),
        click.option("--quiet", is_flag=True, help="No progress bar or per-epoch logs."),
        click.option(
            "--quantize", type=click.Choice(["nf4", "fp4", "int8"]),
            help="Load the frozen base 4-bit or 8-bit (bitsandbytes; QLoRA recipe).",
        ),
        click.option(
            "--gradient-checkpointing", is_flag=True, help="Recompute activations in the backward pass (less memory)."
        ),
        json_option,
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def _report(result: Any, as_json: bool) -> None:
    v = result.version
    if as_json:
        out = {"ref": v.ref if v else None, "digest": v.digest if v else None, "metrics": result.metrics}
        print_json({**out, "path": str(result.path)} if result.path is not None else out)
        return
    metrics = ", ".join(f"{k}={val:.4g}" for k, val in sorted(result.metrics.items()))
    if v is not None:
        click.echo(f"published {v.ref} ({v.digest[:19]})  {metrics}")
        if result.path is not None:
            click.echo(f"wrote {result.path}")
    else:
        click.echo(f"wrote {result.path}  {metrics}")
    attention = (result.extra.get("fusion") or {}).get("attention")
    if attention:
        click.echo("mean attention: " + ", ".join(f"{k}={val:.3f}" for k, val in attention.items()))


def _split(values: tuple[str, ...]) -> list[str] | None:
    out = [t.strip() for v in values for t in v.split(",") if t.strip()]
    return out or None


def register(cli: click.Group) -> None:
    @cli.command("train")
    @click.option(
        "--method", default="lora", show_default=True,
        type=click.Choice(["lora", "houlsby", "pfeiffer", "parallel", "ia3", "bitfit", "ssf", "prompt", "prefix", "ptuning-v2"]),
        help="Adapter method: LoRA, a bottleneck variant, IA3, BitFit, SSF, or soft prompts (20 virtual tokens).",
    )  # fmt: skip
    @click.option("--rank", "--r", "r", type=int, default=16, show_default=True, help="LoRA rank.")
    @click.option(
        "--alpha", type=float, default=32, show_default=True, help="LoRA alpha (scaling = alpha / r)."
    )
    @click.option(
        "--target-modules", multiple=True,
        help="LoRA target modules, comma-separated or repeated (default: all-linear).",
    )  # fmt: skip
    @click.option(
        "--reduction-factor", type=float, default=16, show_default=True,
        help="Bottleneck width = hidden size / this (houlsby, pfeiffer, parallel).",
    )  # fmt: skip
    @click.option(
        "--output-dir", type=click.Path(file_okay=False),
        help="Also write the artifact directory here (a new or empty directory).",
    )  # fmt: skip
    @click.option("--no-publish", is_flag=True, help="Do not publish: only write the artifact directory.")
    @_common
    @handle_errors
    def train_cmd(
        method: str, r: int, alpha: float, target_modules: tuple[str, ...], reduction_factor: float,
        output_dir: str | None, no_publish: bool, base: str, data: str, eval_data: str | None, task: str,
        name: str, epochs: int, lr: float, batch_size: int, seed: int, max_length: int, patience: int,
        version: str | None, tags: tuple[str, ...], description: str, quiet: bool, as_json: bool,
        quantize: str | None, gradient_checkpointing: bool,
    ) -> None:  # fmt: skip
        """Train one adapter on a task and publish it (metrics, hyperparameters, data digest).

        With --no-publish the artifact is only written (to --output-dir, or a new temporary
        directory, printed). The name, version and tags are checked before training starts.
        """
        from deltahub.training import train

        if no_publish and (version is not None or tags):
            raise click.UsageError(
                "--version and --tag name a published version; drop them with --no-publish"
            )
        if output_dir is not None and Path(output_dir).is_dir() and any(Path(output_dir).iterdir()):
            raise click.BadParameter(
                f"{output_dir} is not empty; give a new or empty directory", param_hint="--output-dir"
            )
        result = train(
            base, data, name=name, method=method, task=task, eval_data=eval_data, r=r, alpha=alpha,
            target_modules=_split(target_modules), reduction_factor=reduction_factor, epochs=epochs, lr=lr,
            batch_size=batch_size, seed=seed, max_length=max_length, patience=patience, version=version,
            tags=tags, description=description, progress=not quiet and not as_json, quantize=quantize,
            gradient_checkpointing=gradient_checkpointing, publish=not no_publish, output_dir=output_dir,
        )  # fmt: skip
        _report(result, as_json)

    @cli.command("fuse")
    @click.argument("refs", nargs=-1, required=True)
    @click.option(
        "--unfreeze-adapters", is_flag=True,
        help="Train the adapters too; each is published as NAME.<adapter> and pinned instead.",
    )  # fmt: skip
    @click.option("--temperature", type=float, default=1.0, show_default=True, help="Softmax temperature T.")
    @click.option(
        "--fusion-reg", type=float, default=0.01, show_default=True,
        help="Weight of the penalty sum ||V - I||^2 keeping the value matrices near identity.",
    )  # fmt: skip
    @_common
    @handle_errors
    def fuse_cmd(
        refs: tuple[str, ...], unfreeze_adapters: bool, temperature: float, fusion_reg: float, base: str,
        data: str, eval_data: str | None, task: str, name: str, epochs: int, lr: float, batch_size: int,
        seed: int, max_length: int, patience: int, version: str | None, tags: tuple[str, ...], description: str,
        quiet: bool, as_json: bool, quantize: str | None, gradient_checkpointing: bool,
    ) -> None:  # fmt: skip
        """Learn an AdapterFusion over published adapters REFS for a new task and publish it.

        The fusion's manifest pins every adapter by digest and records the mean attention
        each got on the evaluation set (`deltahub show NAME` prints it).
        """
        from deltahub.fusion import fuse

        result = fuse(
            list(refs), base, data, name=name, task=task, eval_data=eval_data, temperature=temperature,
            fusion_reg=fusion_reg, unfreeze_adapters=unfreeze_adapters, epochs=epochs, lr=lr,
            batch_size=batch_size, seed=seed, max_length=max_length, patience=patience, version=version,
            tags=tags, description=description, progress=not quiet and not as_json, quantize=quantize,
            gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        _report(result, as_json)
