"""`deltahub train` (one adapter for a task) and `deltahub fuse` (AdapterFusion for a new task)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from deltahub.cli.output import handle_errors, json_option, print_json

TASKS = ("classification", "causal-lm")
PROBLEM_TYPES = {"single-label": "single-label", "regression": "regression", "multi-label": "multi-label"}


def _common(fn: Any) -> Any:
    """Options shared by train and fuse (data, task, schedule, publishing)."""
    options = [
        click.option("--base", required=True, help="Base model: a local directory or a hub id (its tokenizer too)."),
        click.option(
            "--data", required=True, type=click.Path(exists=True, dir_okay=False),
            help="Training data: .jsonl, .json, .csv, .tsv or .parquet (read with HF datasets, locally).",
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
        click.option("--tokenizer", help="Tokenizer directory or hub id (default: the base's)."),
        click.option("--text-column", default="text", show_default=True, help="Column holding the text."),
        click.option("--text-pair-column", help="Column holding the second text of a sentence pair."),
        click.option("--label-column", default="label", show_default=True, help="Column holding the label."),
        click.option(
            "--problem-type", type=click.Choice(list(PROBLEM_TYPES)), default="single-label", show_default=True,
            help="regression: MSE on a float label; multi-label: BCE over a list of labels.",
        ),
        click.option("--warmup-ratio", type=float, default=0.0, show_default=True, help="Warmup, a share of all steps."),
        click.option("--warmup-steps", type=int, default=0, show_default=True, help="Warmup, in optimizer steps."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay."),
        click.option(
            "--gradient-accumulation-steps", type=int, default=1, show_default=True,
            help="Batches per optimizer step.",
        ),
        click.option("--eval-steps", type=int, help="Evaluate every N optimizer steps (default: every epoch)."),
        click.option(
            "--base-model",
            help="Base model id recorded in the manifest (portable, e.g. the hub id), default: the base's own.",
        ),
        click.option(
            "--output-dir", type=click.Path(file_okay=False),
            help="Also write the artifact directory here (a new or empty directory); the checkpoint too.",
        ),
        click.option("--no-publish", is_flag=True, help="Do not publish: only write the artifact directory."),
        click.option(
            "--resume", is_flag=True,
            help="Continue from the checkpoint of an interrupted run (same options; in --output-dir or the home).",
        ),
        json_option,
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def _report(result: Any, as_json: bool) -> None:
    v = result.version
    if as_json:
        # a version prints as everywhere else (publish, show, list); --no-publish has none
        out = {**(v.to_dict() if v else {"ref": None, "digest": None}), "metrics": result.metrics}
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


def _prepare(
    output_dir: str | None, no_publish: bool, version: str | None, tags: tuple[str, ...], resume: bool
) -> None:
    if no_publish and (version is not None or tags):
        raise click.UsageError("--version and --tag name a published version; drop them with --no-publish")
    if output_dir is not None and Path(output_dir).is_dir():
        # A resumed run finds its checkpoint there; anything else is refused.
        left = [p for p in Path(output_dir).iterdir() if not (resume and p.name == "checkpoint")]
        if left:
            raise click.BadParameter(
                f"{output_dir} is not empty; give a new or empty directory", param_hint="--output-dir"
            )


def _training(call: Any) -> Any:
    """Run `call()`; Ctrl-C exits 130 saying where the checkpoint is kept."""
    from deltahub.training.checkpoint import TrainingInterrupted

    try:
        return call()
    except TrainingInterrupted as e:
        if e.checkpoint is not None:
            click.echo(
                f"Interrupted; the best checkpoint so far is kept in {e.checkpoint} (rerun with --resume)",
                err=True,
            )
        else:
            click.echo("Interrupted before the first checkpoint; nothing kept", err=True)
        sys.exit(130)


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
    @click.option("--dora", is_flag=True, help="DoRA: LoRA with a learned magnitude per output (lora only).")
    @click.option("--rslora", is_flag=True, help="rsLoRA: scaling = alpha / sqrt(r) (lora only).")
    @click.option(
        "--lora-dropout", type=float, default=0.0, show_default=True, help="Dropout on the LoRA input."
    )
    @click.option(
        "--num-virtual-tokens", type=int, help="Virtual tokens (prompt, prefix, ptuning-v2; default 20)."
    )
    @_common
    @handle_errors
    def train_cmd(
        method: str, r: int, alpha: float, target_modules: tuple[str, ...], reduction_factor: float, dora: bool,
        rslora: bool, lora_dropout: float, num_virtual_tokens: int | None, output_dir: str | None,
        no_publish: bool, resume: bool, base: str, data: str, eval_data: str | None, task: str, name: str,
        epochs: int, lr: float, batch_size: int, seed: int, max_length: int, patience: int, version: str | None,
        tags: tuple[str, ...], description: str, quiet: bool, as_json: bool, quantize: str | None,
        gradient_checkpointing: bool, tokenizer: str | None, text_column: str, text_pair_column: str | None,
        label_column: str, problem_type: str, warmup_ratio: float, warmup_steps: int, weight_decay: float,
        gradient_accumulation_steps: int, eval_steps: int | None, base_model: str | None,
    ) -> None:  # fmt: skip
        """Train one adapter on a task and publish it (metrics, hyperparameters, data digest).

        With --no-publish the artifact is only written (to --output-dir, or a new temporary
        directory, printed). The name, version and tags are checked before training starts.
        The best epoch is kept as a checkpoint; after Ctrl-C (exit 130) --resume continues.
        """
        from deltahub.training import train

        _prepare(output_dir, no_publish, version, tags, resume)
        progress = not quiet and not as_json
        result = _training(lambda: train(
            base, data, name=name, method=method, task=task, eval_data=eval_data, r=r, alpha=alpha,
            target_modules=_split(target_modules), reduction_factor=reduction_factor, epochs=epochs, lr=lr,
            batch_size=batch_size, seed=seed, max_length=max_length, patience=patience, version=version,
            tags=tags, description=description, progress=progress, quantize=quantize,
            gradient_checkpointing=gradient_checkpointing, publish=not no_publish, output_dir=output_dir,
            use_dora=dora, use_rslora=rslora, lora_dropout=lora_dropout, num_virtual_tokens=num_virtual_tokens,
            tokenizer=tokenizer, text_column=text_column, text_pair_column=text_pair_column,
            label_column=label_column, problem_type=PROBLEM_TYPES[problem_type], warmup_ratio=warmup_ratio,
            warmup_steps=warmup_steps, weight_decay=weight_decay,
            gradient_accumulation_steps=gradient_accumulation_steps, eval_steps=eval_steps, base_model=base_model,
            resume=resume, log=_echo_err if not quiet else None,
        ))  # fmt: skip
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
    @click.option(
        "--scope", type=click.Choice(["layer", "module"]), default="layer", show_default=True,
        help="layer: one Q, K, V per transformer layer (small); module: one per fused module (its size is printed first).",
    )  # fmt: skip
    @_common
    @handle_errors
    def fuse_cmd(
        refs: tuple[str, ...], unfreeze_adapters: bool, temperature: float, fusion_reg: float, scope: str,
        base: str, data: str, eval_data: str | None, task: str, name: str, epochs: int, lr: float,
        batch_size: int, seed: int, max_length: int, patience: int, version: str | None, tags: tuple[str, ...],
        description: str, quiet: bool, as_json: bool, quantize: str | None, gradient_checkpointing: bool,
        tokenizer: str | None, text_column: str, text_pair_column: str | None, label_column: str,
        problem_type: str, warmup_ratio: float, warmup_steps: int, weight_decay: float,
        gradient_accumulation_steps: int, eval_steps: int | None, base_model: str | None, output_dir: str | None,
        no_publish: bool, resume: bool,
    ) -> None:  # fmt: skip
        """Learn an AdapterFusion over published adapters REFS for a new task and publish it.

        The fusion's manifest pins every adapter by digest and records the mean attention
        each got on the evaluation set (`deltahub show NAME` prints it).
        """
        from deltahub.fusion import fuse

        _prepare(output_dir, no_publish, version, tags, resume)
        result = _training(lambda: fuse(
            list(refs), base, data, name=name, task=task, eval_data=eval_data, temperature=temperature,
            fusion_reg=fusion_reg, unfreeze_adapters=unfreeze_adapters, epochs=epochs, lr=lr,
            batch_size=batch_size, seed=seed, max_length=max_length, patience=patience, version=version,
            tags=tags, description=description, progress=not quiet and not as_json, quantize=quantize,
            gradient_checkpointing=gradient_checkpointing, scope=scope, tokenizer=tokenizer,
            text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
            problem_type=PROBLEM_TYPES[problem_type], warmup_ratio=warmup_ratio, warmup_steps=warmup_steps,
            weight_decay=weight_decay, gradient_accumulation_steps=gradient_accumulation_steps,
            eval_steps=eval_steps, base_model=base_model, publish=not no_publish, output_dir=output_dir,
            resume=resume, log=_echo_err if not quiet else None,
        ))  # fmt: skip
        _report(result, as_json)
