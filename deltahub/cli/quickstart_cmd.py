"""`deltahub quickstart`: train, publish, list, activate, sum, fuse and diff on built-in tasks."""

from __future__ import annotations

import click

from deltahub.cli.output import handle_errors, json_option, print_json


@click.command()
@click.option(
    "--home",
    "qs_home",
    type=click.Path(file_okay=False),
    help="Registry home to fill (default: a new directory under the temp dir, printed at the start).",
)
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False),
    help="Base model directory with a tokenizer (default: all-MiniLM-L6-v2 if installed, else a small BERT).",
)
@click.option(
    "--epochs", default=4, show_default=True, type=click.IntRange(1, 50), help="Epochs per adapter."
)
@json_option
@handle_errors
def quickstart(qs_home: str | None, base: str | None, epochs: int, as_json: bool) -> None:
    """Run the main job on built-in defaults, offline, in a few minutes on a CPU.

    Trains two LoRA adapters on two built-in tasks, publishes them (and a second version
    of one), lists them, loads each by name and predicts, sums them, fuses them for a
    third task and shows the fusion attention, and diffs the two versions. It leaves a
    usable registry behind and prints the next commands to try.
    """
    from deltahub.quickstart import run_quickstart

    say = (lambda _: None) if as_json else click.echo
    result = run_quickstart(home=qs_home, base=base, say=say, progress=not as_json, epochs=epochs)
    if as_json:
        print_json(
            {
                "home": str(result.home),
                "base": str(result.base),
                "base_kind": result.base_kind,
                "refs": result.refs,
                "metrics": result.metrics,
                "attention": result.attention,
                "diff": {k: result.diff.get(k) for k in ("verdict", "relative_change")},
                "seconds": round(result.seconds, 1),
            }
        )


def register(cli: click.Group) -> None:
    cli.add_command(quickstart)
