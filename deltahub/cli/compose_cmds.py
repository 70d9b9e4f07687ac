"""`deltahub run`: load a base and adapters by name, activate them, run one input."""

from __future__ import annotations

import click

from deltahub.cli.output import handle_errors, json_option, print_json


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


def register(cli: click.Group) -> None:
    @cli.command("run")
    @click.argument("refs", nargs=-1, required=True)
    @click.option(
        "--base",
        "base_path",
        required=True,
        type=click.Path(exists=True, file_okay=False),
        help="Directory of the base model and its tokenizer (save_pretrained output).",
    )
    @click.option("--input", "text", required=True, help="The text to run.")
    @click.option("--sum", "sum_w", metavar="W1,W2,...", help="Activate Sum(REFS) with these weights.")
    @click.option(
        "--average", "avg_w", metavar="W1,W2,...", help="Activate Average(REFS) with these weights."
    )
    @click.option(
        "--stack", is_flag=True, help="Activate Stack(REFS): each adapter on the previous one's output."
    )
    @click.option("--max-new-tokens", default=20, show_default=True, help="Tokens to generate (causal LMs).")
    @click.option("--force", is_flag=True, help="Load adapters even if their base fingerprint differs.")
    @json_option
    @handle_errors
    def run(
        refs: tuple[str, ...],
        base_path: str,
        text: str,
        sum_w: str | None,
        avg_w: str | None,
        stack: bool,
        max_new_tokens: int,
        force: bool,
        as_json: bool,
    ) -> None:
        """Run one input through BASE with adapters REFS (name, name@3, name@tag) active.

        Prints the generated text (causal LM), the label and logits (a classifier, or an
        adapter trained with `deltahub train` for classification: the first REF's head), or
        an embedding summary (encoder).
        """
        if sum(x is not None and x is not False for x in (sum_w, avg_w, stack or None)) > 1:
            raise click.UsageError("give at most one of --sum, --average, --stack")
        mode, weights = "single", None
        if sum_w is not None:
            mode, weights = "sum", _weights(sum_w, "--sum", len(refs))
        elif avg_w is not None:
            mode, weights = "average", _weights(avg_w, "--average", len(refs))
        elif stack:
            mode = "stack"
        from deltahub.training.inference import load, predict

        loaded = load(base_path, list(refs), mode=mode, weights=weights, force=force)
        [answer] = predict(
            loaded.model, loaded.tokenizer, [text], head_ref=refs[0], max_new_tokens=max_new_tokens
        )
        result = {"base": base_path, "adapters": loaded.names, "composition": repr(loaded.target), **answer}
        if as_json:
            print_json(result)
            return
        click.echo(f"adapters: {result['composition']}")
        if result["kind"] == "generation":
            click.echo(result["output"])
        elif result["kind"] == "classification":
            click.echo(f"label: {result['label']}  logits: {result['logits']}")
        else:
            click.echo(
                f"embedding: dim {result['dim']}, norm {result['norm']:.4f}, head {result['head'][:4]}"
            )
