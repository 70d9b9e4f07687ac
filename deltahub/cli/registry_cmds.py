"""Registry commands: publish, list, search, show, tag, export, rm, verify, gc."""

from __future__ import annotations

import sys
from typing import Any

import click

from deltahub.cli.output import handle_errors, json_option, parse_key_values, print_json, print_table

LIST_COLUMNS = ("name", "version", "tags", "method", "task", "base_model", "digest", "created")
# In a narrow terminal: name, version and tags stay whole; these give way first, in this order.
LIST_DROP_FIRST = ("created", "digest", "base_model", "task", "method")


def _registry() -> Any:
    from deltahub.registry import Registry

    return Registry()


def _row(v: Any) -> dict[str, Any]:
    d = v.to_dict()
    d["digest"] = v.digest[:19]  # sha256: + 12 hex, enough to paste as a ref
    d["tags"] = ",".join(v.tags)
    d["created"] = v.created[:16].replace("T", " ")
    return d


def _print_versions(versions: list[Any], as_json: bool, empty: str, more: str | None = None) -> None:
    """Print a page; when there is a next one, say on stderr how to get it (stdout stays parseable)."""
    if as_json:
        print_json([v.to_dict() for v in versions])
    elif not versions:
        click.echo(empty)
    else:
        print_table(
            [_row(v) for v in versions],
            LIST_COLUMNS,
            keep=("name", "version", "tags"),
            drop_first=LIST_DROP_FIRST,
        )
    cursor = getattr(versions, "next_cursor", None)
    if cursor and more:
        click.echo(f"more: {more} --cursor {cursor}", err=True)


def page_options(default: int) -> Any:
    """`--limit N --cursor C`: one page at a time, from where the previous page stopped."""

    def decorate(fn: Any) -> Any:
        fn = click.option(
            "--cursor", help="Continue after the previous page (the cursor it printed on stderr)."
        )(fn)
        return click.option(
            "--limit",
            default=default,
            show_default=True,
            type=click.IntRange(min=1),
            help="At most this many rows a page.",
        )(fn)

    return decorate


def _again(command: str, *args: str) -> str:
    import shlex

    return shlex.join(["deltahub", command, *args])


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--name", required=True, help="Adapter name, [namespace/]name.")
@click.option("--version", "version", help="Explicit version (default: the next integer).")
@click.option("--tag", "tags", multiple=True, help="Tag to point at the new version (repeatable).")
@click.option("--task", help="Task the adapter was trained for.")
@click.option("--description", help="One-line description (searchable).")
@click.option("--base-model", help="Base model id (default: from adapter_config.json).")
@click.option("--license", "license_", help="License identifier, e.g. apache-2.0.")
@click.option("--metric", "metrics", multiple=True, help="Metric as KEY=NUMBER (repeatable).")
@click.option("--dry-run", is_flag=True, help="Validate and show what would be stored; store nothing.")
@click.option(
    "--check-finite", is_flag=True, help="Scan the weights and refuse a NaN or infinite value in any tensor."
)
@json_option
@handle_errors
def publish(
    directory: str,
    name: str,
    version: str | None,
    tags: tuple[str, ...],
    task: str | None,
    description: str | None,
    base_model: str | None,
    license_: str | None,
    metrics: tuple[str, ...],
    dry_run: bool,
    check_finite: bool,
    as_json: bool,
) -> None:
    """Validate an adapter DIRECTORY (ours or PEFT's) and publish it as a new version.

    With --dry-run: validate, hash and print what would be stored (version, files, new
    bytes, versions with the same content), and store nothing; with --check-finite too,
    the scan runs and refuses as the publish would.
    """
    from deltahub.registry.preview import preview_publish, same_content

    registry = _registry()
    if dry_run:
        plan = preview_publish(
            registry, directory, name, version, tags, base_model=base_model, check_finite=check_finite
        )
        if as_json:
            print_json(plan)
            return
        what = f"{plan['method']}, {plan['tensors']} tensors"
        click.echo(f"would publish {plan['name']}@{plan['version']} ({what})")
        click.echo(f"  tags: {', '.join(plan['tags'])}; base model: {plan['base_model'] or '(none)'}")
        if check_finite:
            click.echo("  every floating tensor is finite")
        for fname, f in plan["files"].items():
            stored = "  (stored already)" if f["stored"] else ""
            click.echo(f"  {fname}  {f['digest'][:19]}  {f['size']:,} bytes{stored}")
        click.echo(f"  new bytes: {plan['bytes_new']:,}")
        if plan["same_content_as"]:
            click.echo(f"  same weights and config as {', '.join(plan['same_content_as'])}")
        return
    v = registry.publish(
        directory,
        name=name,
        version=version,
        tags=tags,
        task=task,
        description=description,
        base_model=base_model,
        license=license_,
        metrics=parse_key_values(metrics, "--metric"),
        check_finite=check_finite,
    )
    if same := same_content(registry, v):
        click.echo(
            f"notice: {v.ref} has the same weights and config as {', '.join(s.ref for s in same)}", err=True
        )
    if as_json:
        print_json(v.to_dict())
    else:
        click.echo(f"published {v.ref} {v.digest}")


@click.command(name="list")
@click.option("--base-model", help="Only adapters for this base model id.")
@click.option("--method", help="Only this method (lora, bottleneck, ...).")
@click.option("--task", help="Only this task.")
@click.option("--name", help="Only this adapter (use with --all for its versions).")
@click.option("--all", "all_versions", is_flag=True, help="Every version, not just the latest of each.")
@page_options(default=100)
@json_option
@handle_errors
def list_(
    base_model: str | None,
    method: str | None,
    task: str | None,
    name: str | None,
    all_versions: bool,
    limit: int,
    cursor: str | None,
    as_json: bool,
) -> None:
    """List adapters in the local registry (latest version of each), by name, a page at a time."""
    versions = _registry().list(
        name=name,
        base_model=base_model,
        method=method,
        task=task,
        all_versions=all_versions,
        limit=limit,
        cursor=cursor,
    )
    args = [
        *(
            f"--{flag}={value}"
            for flag, value in (
                ("base-model", base_model),
                ("method", method),
                ("task", task),
                ("name", name),
            )
            if value
        ),
        *(["--all"] if all_versions else []),
        f"--limit={limit}",
    ]
    _print_versions(
        versions,
        as_json,
        "no adapters (publish one with `deltahub publish DIR --name NAME`)",
        more=_again("list", *args),
    )


@click.command()
@click.argument("query")
@page_options(default=50)
@click.option("--remote", "remote_name", help="Search this hub remote instead of the local registry.")
@json_option
@handle_errors
def search(query: str, limit: int, cursor: str | None, remote_name: str | None, as_json: bool) -> None:
    """Full-text search over the latest version of each adapter (names, descriptions, tasks,
    methods, base models), newest first, a page at a time."""
    if remote_name is not None:
        from deltahub.hub.client import search_versions

        versions = search_versions(query, remote_name)[:limit]
        _print_versions(versions, as_json, f"nothing on {remote_name} matches {query!r}")
        return
    versions = _registry().search(query, limit=limit, cursor=cursor)
    _print_versions(
        versions, as_json, f"nothing matches {query!r}", more=_again("search", query, f"--limit={limit}")
    )


@click.command()
@click.argument("ref")
@click.option(
    "--versions", "show_versions", is_flag=True, help="List the adapter's versions, a page at a time."
)
@page_options(default=100)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    help="Draw to this .png/.svg: a fusion's attention (sites x constituents), else a metric over "
    "versions (needs matplotlib: pip install 'deltahub[plots]').",
)
@click.option("--metric", help="With --plot: the metric to draw (default: the one most versions have).")
@json_option
@handle_errors
def show(
    ref: str,
    show_versions: bool,
    limit: int,
    cursor: str | None,
    plot: str | None,
    metric: str | None,
    as_json: bool,
) -> None:
    """Show one version (REF is name, name@3, name@tag or name@sha256:prefix)."""
    registry = _registry()
    if plot:
        from deltahub.plots import plot_version

        click.echo(f"plot: {plot_version(registry, ref, plot, metric)}", err=True)
    if show_versions:
        from deltahub.registry import parse_ref

        name = parse_ref(ref).full_name
        page = registry.versions(name, limit=limit, cursor=cursor)
        _print_versions(page, as_json, "", more=_again("show", name, "--versions", f"--limit={limit}"))
        return
    v = registry.show(ref)
    manifest = registry.manifest(v)
    evals = registry.evals(v)
    if as_json:
        print_json({**v.to_dict(), "manifest": manifest.to_dict(), "evals": evals})
        return
    fields = {
        "ref": v.ref,
        "digest": v.digest,
        "method": v.method,
        "base model": v.base_model,
        "base fingerprint": v.base_fingerprint,
        "task": v.task,
        "description": v.description,
        "license": v.license,
        "tags": ", ".join(v.tags),
        "metrics": ", ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items())),
        "parents": ", ".join(f"{p['ref']} ({p['digest'][:19]})" for p in v.parents),
        "created": v.created,
        "size": f"{v.size:,} bytes",
    }
    width = max(map(len, fields))
    for key, value in fields.items():
        if value:
            click.echo(f"{key:<{width}}  {value}")
    from deltahub.registry.evals import summary

    for line in summary(evals):  # scores measured after publishing (`deltahub eval --record`)
        click.echo(f"{'evaluated':<{width}}  {line}")
    for fname, digest in sorted(v.files.items()):
        click.echo(f"{'file':<{width}}  {fname}  {digest[:19]}")
    from deltahub.serving.rules import check_servable

    click.echo(f"{'servable on vllm':<{width}}  {check_servable(registry.open(v), 'vllm').summary()}")
    attention = (manifest.extra.get("fusion") or {}).get("attention") or {}
    for name, value in attention.items():  # a fusion: mean attention per adapter on the eval set
        click.echo(f"{'attention':<{width}}  {name}  {value:.3f}")


@click.command()
@click.argument("ref")
@click.argument("tag")
@click.option("--delete", is_flag=True, help="Remove TAG from the adapter named in REF instead.")
@handle_errors
def tag(ref: str, tag: str, delete: bool) -> None:
    """Point TAG at the version REF resolves to (moving it atomically)."""
    registry = _registry()
    if delete:
        from deltahub.registry import parse_ref

        registry.untag(parse_ref(ref).full_name, tag)
        click.echo(f"removed tag {tag}")
    else:
        v = registry.tag(ref, tag)
        click.echo(f"{v.full_name}@{tag} -> {v.version}")


@click.command()
@click.argument("ref")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--merged", is_flag=True, help="Write a full-precision model with the LoRA folded in (needs --base)."
)
@click.option(
    "--base",
    help="With --merged or --convert: the base model directory or hub id (loaded in full precision).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["deltahub", "adapterhub"]),
    default="deltahub",
    show_default=True,
    help="adapterhub: a directory AdapterHub's `adapters` loads with load_adapter(DIR, use_safetensors=True).",
)
@click.option(
    "--model-type", help="With --format adapterhub: the base's model type, when the adapter does not tell."
)
@click.option(
    "--target",
    type=click.Choice(["vllm", "lorax", "peft"]),
    help="Write only what this engine loads; refuse naming the rule otherwise (see `deltahub check`).",
)
@click.option(
    "--convert",
    is_flag=True,
    help="With --target: turn DoRA / IA3 / a too-high rank into a plain LoRA by SVD (needs --base).",
)
@click.option(
    "--rank", type=click.IntRange(min=1), help="With --convert: the LoRA's rank (default: the adapter's)."
)
@click.option("--json", "as_json", is_flag=True, help="With --target: print the report as JSON.")
@handle_errors
def export(
    ref: str,
    directory: str,
    merged: bool,
    base: str | None,
    fmt: str,
    model_type: str | None,
    target: str | None,
    convert: bool,
    rank: int | None,
    as_json: bool,
) -> None:
    """Write a version out as an artifact DIRECTORY, byte-identical to what was published.

    With --merged --base PATH: a transformers model directory (safetensors) of the base
    with the adapter merged, for serving without deltahub. With --format adapterhub: an
    AdapterHub adapter directory (bottleneck, LoRA, IA3) with the same outputs. With
    --target vllm: the directory vLLM loads, or a refusal naming the rule; --convert
    --base BASE [--rank R] writes a plain LoRA by SVD of the exact update and reports its error.
    """
    if target or convert or rank:
        if not target or merged or fmt != "deltahub":
            raise click.UsageError("--convert and --rank go with --target (not --merged or --format)")
        from deltahub.cli.serving_cmds import print_export

        print_export(ref, directory, target, convert, rank, base, as_json)
        return
    if fmt == "adapterhub":
        if merged or base:
            raise click.UsageError("--format adapterhub exports the adapter itself, not --merged")
        from deltahub.interop.adapterhub_export import export_adapterhub

        path = export_adapterhub(_registry(), ref, directory, model_type=model_type)
        click.echo(f"exported {ref} to {path} (AdapterHub: model.load_adapter(DIR, use_safetensors=True))")
        return
    if merged or base:
        if not (merged and base):
            raise click.UsageError("--merged and --base go together: --merged --base PATH")
        from deltahub.compose.export import export_merged  # torch only on this path

        path = export_merged(ref, base, directory, registry=_registry())
        from deltahub.compose.export import head_note

        if note := head_note(path):
            click.echo(f"note: {note}", err=True)
        click.echo(f"exported {ref} merged into {base} to {path}")
        return
    path = _registry().export(ref, directory)
    click.echo(f"exported {ref} to {path}")


@click.command()
@click.argument("ref")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Remove it even if a fusion or merge pins it as a parent.")
@handle_errors
def rm(ref: str, yes: bool, force: bool) -> None:
    """Remove one version (its blobs are reclaimed by `deltahub gc`)."""
    registry = _registry()
    v = registry.resolve(ref)
    if not yes and sys.stdin.isatty():
        click.confirm(f"remove {v.ref} ({v.digest[:19]})?", abort=True)
    registry.remove(v.ref, force=force)
    click.echo(f"removed {v.ref}")


@click.command()
@json_option
@handle_errors
def verify(as_json: bool) -> None:
    """Re-hash every blob and check every row; exit 1 if anything is wrong."""
    report = _registry().verify()
    if as_json:
        print_json(
            {"ok": report.ok, "versions": report.versions, "blobs": report.blobs, "problems": report.problems}
        )
    else:
        for problem in report.problems:
            click.echo(f"problem: {problem}")
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"verified {report.versions} versions, {report.blobs} blobs: {status}")
    if not report.ok:
        sys.exit(1)


@click.command()
@click.option(
    "--grace",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Keep unreferenced blobs younger than this many seconds (a publisher may still need them).",
)
@json_option
@handle_errors
def gc(grace: float, as_json: bool) -> None:
    """Delete blobs no version references (older than the grace period)."""
    report = _registry().gc(grace_seconds=grace)
    if as_json:
        print_json(
            {"removed": report.removed, "bytes_freed": report.bytes_freed, "tmp_removed": report.tmp_removed}
        )
    else:
        click.echo(
            f"removed {len(report.removed)} blobs ({report.bytes_freed:,} bytes), {report.tmp_removed} temp files"
        )


def register(cli: click.Group) -> None:
    for command in (publish, list_, search, show, tag, export, rm, verify, gc):
        cli.add_command(command)
