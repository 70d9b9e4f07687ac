"""`deltahub diff REF_A REF_B`: what changed between two adapter versions."""

from __future__ import annotations

from typing import Any

import click

from deltahub.cli.output import handle_errors, json_option, print_json

DEFAULT_TOP = 10


def _num(x: float | None, fmt: str = ".4g") -> str:
    return "-" if x is None else format(x, fmt)


def _short(value: Any, width: int = 40) -> str:
    text = str(value)
    if text.startswith("sha256:") and len(text) > 19:
        return text[:19]  # sha256: + 12 hex, enough to paste as a ref
    return text if len(text) <= width else text[: width - 1] + "…"


def render(report: Any, top: int) -> None:
    """The one-screen summary: verdict first, then the modules that changed most."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=False, highlight=False)
    if report.different_base:
        console.print(f"[bold red]DIFFERENT BASE[/]: {escape(report.different_base)}")
    colour = {"identical": "green", "numerically_identical": "green", "changed": "yellow"}.get(
        report.verdict, "red"
    )
    console.print(
        f"verdict: [bold {colour}]{report.verdict}[/]   overall relative change "
        f"{_num(report.relative_change)}   (tolerance {report.tolerance:g})"
    )
    for tag, side in (("a", report.a), ("b", report.b)):
        console.print(f"  {tag}: {escape(side.label)}  {_short(side.digest)}  {side.method}")

    if report.modules:
        changed = report.changed_modules
        shown = changed[:top]
        console.print(f"modules: {len(changed)} of {len(report.modules)} changed")
        if shown:
            table = Table(box=None, header_style="bold", pad_edge=False)
            table.add_column("module", overflow="fold")
            # Narrow numeric columns leave the module path most of an 80-column screen.
            for col in ("rel.chg", "cosine", "subsp", "|dWa|", "|dWb|", "erank a>b"):
                table.add_column(col, justify="right", no_wrap=True)
            for m in shown:
                label = m.module if m.status == "changed" else f"{m.module} ({m.status})"
                ranks = f"{_num(m.effective_rank_a, '.1f')}>{_num(m.effective_rank_b, '.1f')}"
                table.add_row(
                    escape(label),
                    _num(m.relative_change, ".4g"),
                    _num(m.cosine, ".3f"),
                    _num(m.subspace_similarity, ".2f"),
                    _num(m.norm_a, ".3g"),
                    _num(m.norm_b, ".3g"),
                    ranks,
                )
            console.print(table)
            if len(changed) > top:
                console.print(f"  ... {len(changed) - top} more (--top N to show more)")

    counts = {
        s: len(report.tensor_names(s)) for s in ("changed", "unchanged", "added", "removed", "reshaped")
    }
    console.print("tensors: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    # With LoRA modules the table above already says it per module; factors would repeat it.
    numbered = [t for t in report.tensors if t.status == "changed" and t.relative_change is not None]
    numbered.sort(key=lambda t: -t.relative_change)  # type: ignore[operator]
    for t in [] if report.modules else numbered[:top]:
        console.print(
            f"  {escape(t.name)}: relative change {_num(t.relative_change)}, cosine {_num(t.cosine, '.3f')}"
        )

    for title, changes in (("config", report.config), ("manifest", report.manifest)):
        if changes:
            parts = [f"{c.field} {_short(c.a)} -> {_short(c.b)}" for c in changes]
            console.print(f"{title}: " + "; ".join(escape(p) for p in parts))
    for c in report.metrics:
        delta = f" ({c.change:+.4g})" if c.change is not None else ""
        console.print(f"metric {escape(c.field)}: {_num(c.a)} -> {_num(c.b)}{delta}")
    for p in report.parents:
        if p.status != "same":
            console.print(
                f"parent {escape(p.name)} ({p.role}) {p.status}: {_short(p.digest_a)} -> {_short(p.digest_b)}"
            )
    if report.behavior is not None:
        bh = report.behavior
        what = (
            f"mean KL {_num(bh.mean_kl)}" if bh.kind == "kl" else f"mean hidden cosine {_num(bh.mean_cosine)}"
        )
        console.print(
            f"behavior on {bh.inputs} probe inputs: {what}; top-1 differs on {bh.top1_differ} of {bh.positions}"
        )
    for note in report.notes:
        console.print(f"note: {escape(note)}")


@click.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
@json_option
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=None,
    help=f"Show the N modules that changed most (table default {DEFAULT_TOP}; JSON default all).",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=1e-6,
    show_default=True,
    help="Relative change at or below which a version counts as numerically identical.",
)
@click.option(
    "--base",
    type=click.Path(exists=True),
    default=None,
    help="Base model directory: run both versions on --probe inputs over it.",
)
@click.option(
    "--probe",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Text file of probe inputs, one per line (needs --base).",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw per-module relative change and subspace similarity to this .png or .svg "
    "(needs matplotlib: pip install 'deltahub[plots]').",
)
@handle_errors
def diff_cmd(
    ref_a: str,
    ref_b: str,
    as_json: bool,
    top: int | None,
    tolerance: float,
    base: str | None,
    probe: str | None,
    plot: str | None,
) -> None:
    """Compare two adapter versions: verdict, overall and per-module change, tensors, config.

    REF_A and REF_B are registry refs (name, name@2, name@tag, name@sha256:ab12...) or
    artifact directories. LoRA modules are compared exactly through dW = s B A.
    """
    from deltahub.diffing import diff

    if plot:
        from deltahub.plots import check_plot_path

        check_plot_path(plot)  # before the diff: a missing matplotlib fails at once
    report = diff(ref_a, ref_b, top=top, tolerance=tolerance, base=base, probe=probe)
    if as_json:
        print_json(report.to_dict())
    else:
        render(report, top or DEFAULT_TOP)
    if plot:
        from deltahub.plots import plot_diff

        click.echo(f"plot: {plot_diff(report, plot)}", err=True)


def register(cli: click.Group) -> None:
    cli.add_command(diff_cmd)
