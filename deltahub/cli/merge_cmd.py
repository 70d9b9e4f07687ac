"""`deltahub merge`: combine LoRA adapters into a new published adapter."""

from __future__ import annotations

import click

from deltahub.cli.output import handle_errors, json_option, print_json, progress

METHOD_CHOICES = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def _parse_weights(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers (e.g. 0.5,0.5 or 1,-1)",
            param_hint="--weights",
        ) from None


def register(cli: click.Group) -> None:
    @cli.command("merge")
    @click.argument("refs", nargs=-1, required=True)
    @click.option(
        "--method",
        type=click.Choice(METHOD_CHOICES),
        required=True,
        help="cat: exact, rank = sum of ranks. svd: exact sum re-factored to --rank (best "
        "low-rank approximation below full rank). linear: PEFT's cheap same-rank mix (not an "
        "exact sum). ties, dare_linear, dare_ties: PEFT's pruning merges (need --density).",
    )
    @click.option(
        "--weights",
        metavar="W1,W2,...",
        help="One weight per adapter, comma-separated; negative subtracts (default 1 each).",
    )
    @click.option("--density", type=float, help="Fraction of factor entries kept, in (0, 1] (ties, dare_*).")
    @click.option("--rank", type=int, help="Rank of the result (svd only; default the largest input rank).")
    @click.option(
        "--majority-sign",
        type=click.Choice(["total", "frequency"]),
        default="total",
        show_default=True,
        help="How ties/dare_ties elect each entry's sign.",
    )
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the dare_* random drops.")
    @click.option("--name", required=True, help="Name of the merged adapter to publish.")
    @click.option("--version", "version", help="Version of the merged adapter (default: next number).")
    @click.option("--tag", "tags", multiple=True, help="Tag the new version (repeatable).")
    @click.option("--description", help="Description (default: what was merged, and how).")
    @json_option
    @handle_errors
    def merge(
        refs: tuple[str, ...],
        method: str,
        weights: str | None,
        density: float | None,
        rank: int | None,
        majority_sign: str,
        seed: int,
        name: str,
        version: str | None,
        tags: tuple[str, ...],
        description: str | None,
        as_json: bool,
    ) -> None:
        """Merge LoRA adapters REFS into one new LoRA and publish it as --name.

        Example: deltahub merge math@2 code@prod --method svd --rank 16 --name math-code
        """
        from deltahub.compose.merge import merge_adapters

        version_ = merge_adapters(
            list(refs),
            method=method,
            weights=_parse_weights(weights),
            density=density,
            rank=rank,
            name=name,
            version=version,
            seed=seed,
            majority_sign_method=majority_sign,
            tags=tags,
            description=description,
            progress=lambda modules, n: progress(modules, f"{method} merge", total=n),
        )
        from deltahub.registry import Registry

        note = Registry().manifest(version_).extra.get("merge", {}).get("task_head", "")
        if note.startswith("dropped"):
            click.echo(f"warning: task head {note}", err=True)
        if as_json:
            print_json(version_.to_dict())
        else:
            click.echo(f"{version_.ref} {version_.digest}")
