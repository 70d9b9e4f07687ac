"""`deltahub run`: load a base and adapters by name, activate them, and predict for one
input or a file of them (the options it shares with `eval`: `deltahub.cli.model_args`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from deltahub.cli.model_args import ModelArgs, model_options
from deltahub.cli.output import handle_errors, json_option, print_json


def _echo_answer(result: dict[str, Any], batch: bool) -> None:
    if result["kind"] == "generation":
        click.echo(result["output"])
    elif result["kind"] == "classification":
        if batch:
            click.echo(f"{result['label']}\t{result['input']}")
        else:
            click.echo(f"label: {result['label']}  logits: {result['logits']}")
    elif result["kind"] == "regression":
        values = ", ".join(f"{v:g}" for v in result["values"])
        click.echo(f"{values}\t{result['input']}" if batch else f"value: {values}")
    elif result["kind"] == "multi-label":
        labels = ",".join(result["labels"]) or "(none)"
        probs = "  ".join(f"{k}={p:.4f}" for k, p in result["probabilities"].items())
        click.echo(f"{labels}\t{result['input']}" if batch else f"labels: {labels}  probabilities: {probs}")
    else:
        summary = f"embedding: dim {result['dim']}, norm {result['norm']:.4f}, head {result['head'][:4]}"
        click.echo(f"{summary}\t{result['input']}" if batch else summary)


def register(cli: click.Group) -> None:
    @cli.command("run")
    @model_options
    @click.option("--input", "text", help="The text to run.")
    @click.option(
        "--input-file",
        type=click.Path(dir_okay=False, allow_dash=True),
        help="Run every input of this file: text lines, JSON Lines (a `text` field) or CSV; - reads stdin.",
    )
    @click.option(
        "--text-column", default="text", show_default=True, help="With --input-file: the field to run."
    )
    @click.option("--max-new-tokens", default=20, show_default=True, help="Tokens to generate (causal LMs).")
    @click.option(
        "--temperature",
        type=click.FloatRange(min=0),
        help="Sample with this temperature (causal LMs; default greedy).",
    )
    @click.option(
        "--top-p", type=click.FloatRange(0, 1, min_open=True), help="With --temperature: nucleus sampling."
    )
    @click.option("--seed", type=int, help="With --temperature: seed the sampling.")
    @click.option(
        "--chat/--no-chat",
        default=None,
        help="Wrap the input in the tokenizer's chat template (default: when it has one).",
    )
    @json_option
    @handle_errors
    def run(
        model: ModelArgs,
        text: str | None,
        input_file: str | None,
        text_column: str,
        max_new_tokens: int,
        temperature: float | None,
        top_p: float | None,
        seed: int | None,
        chat: bool | None,
        as_json: bool,
    ) -> None:
        """Run BASE with adapters REFS (name, name@3, name@tag) active on --input or --input-file.

        Prints the generated text (causal LM), the label and logits (a classifier, or an
        adapter trained with `deltahub train` for classification: the first REF's head), or
        an embedding summary (encoder). A regression head prints its value(s); a multi-label
        head the labels whose sigmoid is at least --threshold, and each label's probability.
        With --input-file, one line per input (`label<TAB>text`), or JSON Lines with --json;
        the model loads once for the whole file.

        Two versions of one adapter combine like two adapters: `a@1 a@2 --sum 0.5,0.5`.
        """
        if (text is None) == (input_file is None):
            raise click.UsageError("give one of --input TEXT or --input-file FILE (- for stdin)")
        if (top_p is not None or seed is not None) and not temperature:
            raise click.UsageError("--top-p and --seed go with --temperature (sampling)")
        from deltahub.training.evaluate import read_rows, texts_of
        from deltahub.training.inference import Sampling, check_texts, predict

        if input_file is not None:
            rows, _ = read_rows(input_file, text_column)
            texts = texts_of(rows, text_column)
            if not texts:
                raise click.UsageError(f"{input_file} has no inputs (blank lines are skipped)")
        else:
            texts = [text or ""]
        check_texts(texts)  # before the minutes a base can take to load
        sampling = Sampling(temperature, top_p, seed, "auto" if chat is None else chat)
        loaded = model.load()
        answers = predict(
            loaded.model,
            loaded.tokenizer,
            texts,
            head_ref=model.refs[0],
            max_new_tokens=max_new_tokens,
            batch_size=model.batch_size,
            sampling=sampling,
            **model.reading(),
        )
        common = {"base": model.base_path, "adapters": loaded.names, "composition": repr(loaded.target)}
        results = [{**common, **answer} for answer in answers]
        if input_file is None:
            if as_json:
                print_json(results[0])
                return
            click.echo(f"adapters: {common['composition']}")
            _echo_answer(results[0], batch=False)
            return
        for result in results:
            if as_json:
                click.echo(json.dumps(result, sort_keys=True, default=str))
            else:
                _echo_answer(result, batch=True)


def predict_serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`deltahub serve --predict-base PATH [--predict-device D]`: the opt-in prediction route."""
    fn = click.option(
        "--predict-device", help="With --predict-base: where the base runs (default: cuda when present)."
    )(fn)
    return click.option(
        "--predict-base",
        type=click.Path(exists=True, file_okay=False),
        help="Load this base model directory once and answer POST /v1/predict (read token) with "
        "the registry's adapters on it.",
    )(fn)


def predict_stores(predict_base: str | None, predict_device: str | None) -> dict[str, Any]:
    """`create_app` keywords for the options above."""
    if predict_base is None:
        if predict_device is not None:
            raise click.UsageError("--predict-device goes with --predict-base")
        return {}
    return {"predict_base": predict_base, "predict_options": {"device": predict_device}}
