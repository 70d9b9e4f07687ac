"""`deltahub run` and `deltahub eval`: load a base and adapters by name, activate them,
predict for one input or a file of them, or score a labelled file."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from deltahub.cli.completion import complete_refs
from deltahub.cli.output import handle_errors, json_option, print_json

QUANTIZE = ("nf4", "fp4", "int8")


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


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """REFS, --base, the composition flags, --device, --quantize and --force (run and eval)."""
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
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


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


def _echo_answer(result: dict[str, Any], batch: bool) -> None:
    if result["kind"] == "generation":
        click.echo(result["output"])
    elif result["kind"] == "classification":
        if batch:
            click.echo(f"{result['label']}\t{result['input']}")
        else:
            click.echo(f"label: {result['label']}  logits: {result['logits']}")
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
        refs: tuple[str, ...],
        base_path: str,
        sum_w: str | None,
        avg_w: str | None,
        stack: bool,
        device: str | None,
        quantize: str | None,
        batch_size: int,
        force: bool,
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
        an embedding summary (encoder). With --input-file, one line per input (`label<TAB>text`),
        or JSON Lines with --json; the model loads once for the whole file.

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
        loaded = load_model(refs, base_path, sum_w, avg_w, stack, device, quantize, force)
        answers = predict(
            loaded.model,
            loaded.tokenizer,
            texts,
            head_ref=refs[0],
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            sampling=sampling,
        )
        common = {"base": base_path, "adapters": loaded.names, "composition": repr(loaded.target)}
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
