"""`deltahub run`: load a base and adapters by name, activate them, run one input."""

from __future__ import annotations

from typing import Any

import click

from deltahub.cli.output import handle_errors, json_option, print_json
from deltahub.errors import InvalidConfig


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


def run_once(
    base_path: str,
    refs: list[str],
    text: str,
    mode: str = "single",
    weights: list[float] | None = None,
    max_new_tokens: int = 20,
    force: bool = False,
) -> dict[str, Any]:
    """Load the base and tokenizer from `base_path`, activate `refs` composed by `mode`
    (single, sum, average, stack), run `text`, and describe the prediction."""
    import torch
    from transformers import AutoTokenizer

    from deltahub.compose.base import load_base
    from deltahub.compose.blocks import Average, Stack, Sum
    from deltahub.compose.model import AdaptedModel

    base = load_base(base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path, local_files_only=True)
    model = AdaptedModel(base)
    names = [model.load(ref, force=force) for ref in refs]
    if mode == "sum":
        target: Any = Sum(*names, weights=weights)
    elif mode == "average":
        target = Average(*names, weights=weights)
    elif mode == "stack":
        target = Stack(*names)
    elif len(names) == 1:
        target = names[0]
    else:
        raise InvalidConfig(
            f"{len(names)} adapters given: say how to combine them (--sum, --average or --stack)"
        )
    model.activate(target)
    batch = tokenizer(text, return_tensors="pt").to(base.device)
    if "token_type_ids" in batch and "token_type_ids" not in _forward_args(base):
        batch.pop("token_type_ids")  # Llama/GPT-2 forwards do not take it
    result: dict[str, Any] = {
        "base": base_path,
        "adapters": names,
        "composition": repr(target),
        "input": text,
    }
    archs = getattr(base.config, "architectures", None) or [type(base).__name__]
    with torch.no_grad():
        if hasattr(base, "generate") and any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            new = out[0, batch["input_ids"].shape[1] :]
            result.update(kind="generation", output_ids=new.tolist(), output=tokenizer.decode(new))
        elif (trained := _trained_head(model, refs[0], base)) is not None:
            head, labels = trained
            out = model(**batch, output_hidden_states=True)
            logits = head(out.hidden_states[-1], batch.get("attention_mask"))[0]  # (K,)
            label = int(logits.argmax())
            result.update(
                kind="classification",
                label=labels[label] if label < len(labels) else str(label),
                label_id=label,
                logits=[round(float(v), 6) for v in logits],
                head=refs[0],
            )
        else:
            out = model(**batch)
            if hasattr(out, "logits"):
                logits = out.logits[0]
                label = int(logits.argmax())
                id2label = getattr(base.config, "id2label", None) or {}
                result.update(
                    kind="classification",
                    label=id2label.get(label, str(label)),
                    label_id=label,
                    logits=[round(float(v), 6) for v in logits],
                )
            else:
                h = out.last_hidden_state[0]  # (T, d)
                pooled = h.mean(0)
                result.update(
                    kind="embedding",
                    dim=int(pooled.shape[0]),
                    norm=round(float(pooled.norm()), 6),
                    head=[round(float(v), 6) for v in pooled[:8]],
                )
    return result


def _trained_head(model: Any, ref: str, base: Any) -> tuple[Any, list[str]] | None:
    """The classification head trained with adapter `ref` (deltahub train/fuse), if any."""
    from deltahub.training.head import TaskHead, has_head

    artifact = model.registry.open(ref)
    if not has_head(artifact) or artifact.manifest is None:
        return None
    width = getattr(base.config, "hidden_size", None) or getattr(base.config, "n_embd", None)
    head = TaskHead.from_artifact(artifact, int(width)).to(base.device).eval()
    return head, list(artifact.manifest.extra.get("head", {}).get("labels", []))


def _forward_args(base: Any) -> set[str]:
    import inspect

    return set(inspect.signature(base.forward).parameters)


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
        result = run_once(base_path, list(refs), text, mode, weights, max_new_tokens, force)
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
