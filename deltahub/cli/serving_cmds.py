"""Serving commands: `deltahub check REF --target vllm|lorax|peft`."""

from __future__ import annotations

import sys

import click

from deltahub.cli.output import handle_errors, json_option, print_json


@click.command()
@click.argument("ref")
@click.option(
    "--target",
    type=click.Choice(["vllm", "lorax", "peft"]),
    default="vllm",
    show_default=True,
    help="The engine that will serve the adapter.",
)
@click.option(
    "--base", "served_base", help="The model name the engine serves (checked against the adapter's base)."
)
@json_option
@handle_errors
def check(ref: str, target: str, served_base: str | None, as_json: bool) -> None:
    """List what TARGET would refuse in REF (DoRA, modules_to_save, bias, rank, target
    modules, base mismatch), each with its fix; exit 1 if anything is refused."""
    from deltahub.registry import Registry
    from deltahub.serving.rules import check_servable

    with Registry() as registry:
        v = registry.resolve(ref)
        art = registry.open(v)
        fp = None
        if served_base and art.manifest is not None and art.manifest.base_fingerprint:
            from deltahub.serving.basecheck import served_fingerprint

            fp = served_fingerprint(served_base)
        report = check_servable(
            art, target, served_base=served_base, served_fingerprint=fp, ref=v.ref, digest=v.digest
        )
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(f"{v.ref} ({v.digest[:19]}) on {target}: {report.summary()}")
        for f in report.refusals:
            click.echo(f"  refused  {f.rule}: {f.message}" + (f"\n           fix: {f.fix}" if f.fix else ""))
        for f in report.notes:
            click.echo(f"  note     {f.rule}: {f.message}")
    if not report.ok:
        sys.exit(1)


def print_export(
    ref: str,
    directory: str,
    target: str,
    convert: bool,
    rank: int | None,
    base: str | None,
    as_json: bool,
) -> None:
    """`deltahub export REF DIR --target T [--convert --base B --rank R]` (options in registry_cmds)."""
    from deltahub.serving.export import export_for_target

    result = export_for_target(ref, directory, target, convert=convert, rank=rank, base=base)
    if as_json:
        print_json(result)
        return
    conv = result.get("conversion")
    if conv is None:
        click.echo(f"exported {ref} to {result['path']} ({target} loads it)")
        return
    click.echo(
        f"exported {ref} as a rank-{conv['rank']} LoRA ({conv['source']} converted) to {result['path']}: "
        + ("exact" if conv["exact"] else "approximate")
    )
    click.echo(f"  relative Frobenius error of the update, worst module: {conv['max_module_rel_error']:.3g}")
    for module, err in conv["module_rel_errors"].items():
        click.echo(f"    {module}  {err:.3g}")
    click.echo(
        f"  logits on a probe batch: relative error {conv['logits_rel_error']:.3g}, "
        f"max abs {conv['logits_max_abs']:.3g}"
    )


def register(cli: click.Group) -> None:
    cli.add_command(check)
