"""`deltahub eval`: score adapters on a labelled file (accuracy), optionally recorded on the version."""

from __future__ import annotations

import time
from typing import Any

import click

from deltahub.cli.compose_cmds import load_model, model_options
from deltahub.cli.output import handle_errors, json_option, print_json


def register(cli: click.Group) -> None:
    @cli.command("eval")
    @model_options
    @click.option(
        "--data",
        required=True,
        type=click.Path(dir_okay=False, allow_dash=True),
        help="Labelled rows: JSON Lines or CSV with text and label columns; - reads stdin.",
    )
    @click.option("--text-column", default="text", show_default=True, help="The field holding the input.")
    @click.option("--label-column", default="label", show_default=True, help="The field holding the label.")
    @click.option(
        "--record",
        is_flag=True,
        help="Record the score on the version REF resolves to (shown by `deltahub show`).",
    )
    @json_option
    @handle_errors
    def eval_(
        refs: tuple[str, ...],
        base_path: str,
        sum_w: str | None,
        avg_w: str | None,
        stack: bool,
        device: str | None,
        quantize: str | None,
        batch_size: int,
        force: bool,
        data: str,
        text_column: str,
        label_column: str,
        record: bool,
        as_json: bool,
    ) -> None:
        """Score BASE with adapters REFS active on the labelled file --data.

        Classification (a trained head, or a classifier base): accuracy, the predicted
        label's name (or index, for integer labels) against the label column. A causal LM:
        exact match of the generated text. The versions are immutable, so --record keeps
        the score beside the version (with the data's digest), not in its manifest.
        """
        from deltahub.training.evaluate import evaluate, read_rows

        if record and len(refs) != 1:
            raise click.UsageError("--record scores one version: give a single REF")
        rows, digest = read_rows(data, text_column)
        loaded = load_model(refs, base_path, sum_w, avg_w, stack, device, quantize, force)
        start = time.perf_counter()
        report = evaluate(
            loaded, rows, text_column=text_column, label_column=label_column, batch_size=batch_size
        )
        seconds = time.perf_counter() - start
        result: dict[str, Any] = {
            "adapters": loaded.names,
            "composition": repr(loaded.target),
            "data": data,
            "data_digest": digest,
            **report.to_dict(),
            "seconds": round(seconds, 3),
            "rows_per_second": round(report.rows / seconds, 1) if seconds > 0 else None,
            "recorded": False,
        }
        if record:
            registry = loaded.model.registry
            registry.record_eval(
                refs[0],
                {report.metric: report.value},
                data_digest=digest,
                rows=report.rows,
                base=loaded.model.fingerprint,
            )
            result["recorded"] = True
        if as_json:
            print_json(result)
            return
        click.echo(
            f"{report.metric}: {report.value:.4f} ({report.correct}/{report.rows}) "
            f"in {seconds:.2f} s ({result['rows_per_second']} rows/s)"
        )
        if record:
            click.echo(f"recorded on {registry.resolve(refs[0]).ref}")
