"""`deltahub eval`: score adapters on a labelled file (accuracy; MSE, MAE and correlations
for regression; F1 and exact match for multi-label), optionally recorded on the version."""

from __future__ import annotations

import time
from typing import Any

import click

from deltahub.cli.model_args import ModelArgs, model_options
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
        model: ModelArgs,
        data: str,
        text_column: str,
        label_column: str,
        record: bool,
        as_json: bool,
    ) -> None:
        """Score BASE with adapters REFS active on the labelled file --data.

        Classification (a trained head, or a classifier base): accuracy, the predicted
        label's name (or index, for integer labels) against the label column. A regression
        head (a number a row, or a list of them): MSE, MAE, Pearson and Spearman. A
        multi-label head (a list of label names a row, or "a,b"): micro- and macro-F1 and
        exact-match accuracy at --threshold. A causal LM: exact match of the generated text.
        The versions are immutable, so --record keeps the scores beside the version (with the
        data's digest), not in its manifest.
        """
        from deltahub.training.evaluate import evaluate, read_rows

        refs = model.refs
        if record and len(refs) != 1:
            raise click.UsageError("--record scores one version: give a single REF")
        rows, digest = read_rows(data, text_column)
        loaded = model.load()
        start = time.perf_counter()
        report = evaluate(
            loaded,
            rows,
            text_column=text_column,
            label_column=label_column,
            batch_size=model.batch_size,
            **model.reading(),
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
                {
                    k: v for k, v in report.metrics.items() if v is not None
                },  # an undefined correlation is not kept
                data_digest=digest,
                rows=report.rows,
                base=loaded.model.fingerprint,
            )
            result["recorded"] = True
        if as_json:
            print_json(result)
            return
        timing = f"in {seconds:.2f} s ({result['rows_per_second']} rows/s)"
        if report.problem_type is None:  # single-label or generation: one score
            click.echo(f"{report.metric}: {report.value:.4f} ({report.correct}/{report.rows}) {timing}")
        else:
            scores = "  ".join(
                f"{k}: {'undefined' if v is None else f'{v:.4f}'}" for k, v in report.metrics.items()
            )
            click.echo(f"{report.problem_type}, {report.rows} rows: {scores} {timing}")
        if record:
            click.echo(f"recorded on {registry.resolve(refs[0]).ref}")
