"""Hub commands: serve, token, webhook, hub (migrate, verify, copy), remote, login, push, pull.

`deltahub search --remote NAME QUERY` lives with `search` in registry_cmds.py and calls
`deltahub.hub.search`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from deltahub.cli.compose_cmds import predict_serve_options, predict_stores
from deltahub.cli.output import handle_errors, json_option, print_json, print_table


def _registry() -> Any:
    from deltahub.registry import Registry

    return Registry()


def _home_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--home",
        type=click.Path(file_okay=False),
        help="The hub's home (registry and hub.db); default $DELTAHUB_HOME, else ~/.deltahub.",
    )(fn)


@contextmanager
def _byte_progress(description: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """A transient bytes progress bar on stderr: yields (set_total, advance)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from deltahub.cli.output import _stderr_console

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
        console=_stderr_console(),
    ) as bar:
        task = bar.add_task(description, total=None)
        yield (lambda n: bar.update(task, total=n)), (lambda n: bar.advance(task, n))


def _stores_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--db and --blobs (and their environment variables), --s3-endpoint-url."""
    fn = click.option(
        "--s3-endpoint-url",
        envvar="DELTAHUB_S3_ENDPOINT_URL",
        help="S3-compatible endpoint for s3:// blobs (MinIO, Ceph, R2, moto); default AWS. "
        "Credentials: boto3's usual ones (AWS_ACCESS_KEY_ID, ~/.aws, ...).",
    )(fn)
    fn = click.option(
        "--blobs",
        "blobs_url",
        envvar="DELTAHUB_BLOB_URL",
        help="Blob store: a directory or s3://BUCKET/PREFIX (default: the home's blobs/). [env DELTAHUB_BLOB_URL]",
    )(fn)
    return click.option(
        "--db",
        "db_url",
        envvar="DELTAHUB_DB_URL",
        help="Metadata store: sqlite:///HOME (default: the home) or postgresql://USER@HOST/DB. "
        "[env DELTAHUB_DB_URL]",
    )(fn)


def _meta(home: str | None, db_url: str | None) -> Any:
    """This thread's handle on the hub's metadata store (the home's hub.db, or PostgreSQL)."""
    from deltahub.hub.meta import open_meta

    store = open_meta(db_url, home)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:  # close the store (its PostgreSQL pool) when the command ends
        ctx.call_on_close(store.close)
    return store.handle()


# ----------------------------------------------------------------------------- serve


@click.command()
@_home_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8600, show_default=True, type=int, help="Port to listen on.")
@click.option("--public-read", is_flag=True, help="Let anyone read (list, pull) without a token.")
@click.option(
    "--allow-insecure-http",
    is_flag=True,
    help="Allow a non-loopback --host over plain HTTP (put a TLS reverse proxy in front instead).",
)
@click.option("--log-level", default="info", show_default=True, help="uvicorn log level.")
@click.option(
    "--limit-concurrency",
    type=click.IntRange(1),
    default=1024,
    show_default=True,
    help="Connections and requests in flight before new requests get 503.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds a connection has to send a request's headers before it is closed.",
)
@click.option(
    "--timeout-keep-alive",
    type=click.IntRange(1),
    default=5,
    show_default=True,
    help="Seconds an idle kept-alive connection stays open.",
)
@_stores_options
@click.option(
    "--redirect-downloads",
    is_flag=True,
    help="With s3:// blobs: answer blob downloads with a redirect to a presigned URL "
    "(clients fetch from the store) instead of streaming them through the server.",
)
@predict_serve_options
@handle_errors
def serve(
    home: str | None,
    db_url: str | None,
    blobs_url: str | None,
    s3_endpoint_url: str | None,
    redirect_downloads: bool,
    host: str,
    port: int,
    public_read: bool,
    allow_insecure_http: bool,
    log_level: str,
    limit_concurrency: int,
    header_timeout: float,
    timeout_keep_alive: int,
    predict_base: str | None,
    predict_device: str | None,
) -> None:
    """Serve the registry over HTTP for push, pull, search and Hugging Face downloads.

    Put a TLS reverse proxy in front for anything beyond this machine; it should also
    limit request rates and failed logins per real client, body sizes and body time.

    A team hub keeps its metadata in PostgreSQL and its blobs in S3 (--db, --blobs);
    several `serve` processes over one database and one bucket are interchangeable.
    """
    from deltahub.hub.server import check_bind
    from deltahub.hub.server import serve as run_server

    check_bind(host, allow_insecure_http)
    click.echo(
        f"deltahub hub on http://{host}:{port} ({'public read' if public_read else 'token needed to read'}"
        f"{'; metadata ' + _redacted(db_url) if db_url else ''}{'; blobs ' + blobs_url if blobs_url else ''}); "
        "create tokens with `deltahub token create`",
        err=True,
    )
    run_server(
        home,
        host,
        port,
        public_read=public_read,
        allow_insecure_http=allow_insecure_http,
        log_level=log_level,
        limit_concurrency=limit_concurrency,
        header_timeout=header_timeout,
        timeout_keep_alive=timeout_keep_alive,
        stores={
            "db": db_url,
            "blobs": blobs_url,
            "s3_endpoint_url": s3_endpoint_url,
            "redirect_downloads": redirect_downloads,
            **predict_stores(predict_base, predict_device),
        },
    )


def _redacted(url: str) -> str:
    from deltahub.hub.meta import redact

    return redact(url)


# ----------------------------------------------------------------------------- tokens


@click.group()
def token() -> None:
    """Create, list and revoke this hub's access tokens."""


def _tokens(home: str | None, db_url: str | None = None) -> Any:
    if db_url:
        return _meta(home, db_url).tokens
    from deltahub.hub.tokens import TokenStore
    from deltahub.settings import default_home

    return TokenStore(home or default_home())


def _db_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--db",
        "db_url",
        envvar="DELTAHUB_DB_URL",
        help="The hub's metadata store, as `serve --db` (default: the home). [env DELTAHUB_DB_URL]",
    )(fn)


@token.command(name="create")
@_home_option
@_db_option
@click.option(
    "--scope", type=click.Choice(["read", "write", "admin"]), required=True, help="What the token may do."
)
@click.option("--namespace", help="Limit the token to adapters named NAMESPACE/... (default: every name).")
@click.option("--expires", type=float, help="Expire after this many days (default: never).")
@click.option("--description", default="", help="A note to recognize the token by in `token list`.")
@json_option
@handle_errors
def token_create(
    home: str | None,
    db_url: str | None,
    scope: str,
    namespace: str | None,
    expires: float | None,
    description: str,
    as_json: bool,
) -> None:
    """Make a token and print it once: only its SHA-256 is kept."""
    secret, info = _tokens(home, db_url).create(scope, namespace, expires, description)
    if as_json:
        print_json({"token": secret, **info.to_dict()})
        return
    click.echo(secret)
    click.echo(
        f"(id {info.id}, {scope}{f' on {namespace}/*' if namespace else ''}; shown once: store it now)",
        err=True,
    )


@token.command(name="list")
@_home_option
@_db_option
@json_option
@handle_errors
def token_list(home: str | None, db_url: str | None, as_json: bool) -> None:
    """List tokens (their prefix, scope, namespace, expiry, status; never the token)."""
    rows = [t.to_dict() for t in _tokens(home, db_url).list()]
    if as_json:
        print_json(rows)
    elif not rows:
        click.echo("no tokens (create one with `deltahub token create --scope read`)")
    else:
        print_table(rows, ("id", "prefix", "scope", "namespace", "status", "expires", "description"))


@token.command(name="revoke")
@_home_option
@_db_option
@click.argument("token_id")
@handle_errors
def token_revoke(home: str | None, db_url: str | None, token_id: str) -> None:
    """Revoke a token by its id, its exact prefix as `token list` shows it, or the token itself.

    A prefix is matched exactly and case-sensitively; the token stops working at once.
    """
    info = _tokens(home, db_url).revoke(token_id)
    click.echo(f"revoked token {info.id} ({info.lookup}…)")


# ----------------------------------------------------------------------------- remotes


@click.group()
def remote() -> None:
    """Manage named hub servers to push to and pull from."""


@remote.command(name="add")
@click.argument("name")
@click.argument("url")
@click.option("--replace", is_flag=True, help="Overwrite an existing remote of that name.")
@handle_errors
def remote_add(name: str, url: str, replace: bool) -> None:
    """Add a remote NAME at URL (e.g. origin https://hub.example.com)."""
    from deltahub.hub.remotes import add_remote

    r = add_remote(name, url, replace=replace)
    click.echo(f"added remote {r.name} -> {r.url}; log in with `deltahub login {r.name}`")


@remote.command(name="list")
@json_option
@handle_errors
def remote_list(as_json: bool) -> None:
    """List remotes and whether a token is stored for each."""
    from deltahub.hub.remotes import list_remotes

    rows = [r.to_dict() for r in list_remotes()]
    if as_json:
        print_json(rows)
    elif not rows:
        click.echo("no remotes (add one with `deltahub remote add NAME URL`)")
    else:
        print_table(rows, ("name", "url", "logged_in"))


@remote.command(name="remove")
@click.argument("name")
@handle_errors
def remote_remove(name: str) -> None:
    """Remove remote NAME and its stored token."""
    from deltahub.hub.remotes import remove_remote

    remove_remote(name)
    click.echo(f"removed remote {name}")


@click.command()
@click.argument("name")
@click.option("--token", "token_value", help="The token (default: prompt for it, hidden).")
@click.option("--no-verify", is_flag=True, help="Store the token without asking the server about it.")
@handle_errors
def login(name: str, token_value: str | None, no_verify: bool) -> None:
    """Store a token for remote NAME (in a 0600 file in the home; DELTAHUB_TOKEN overrides it)."""
    from deltahub.hub.client import HubClient
    from deltahub.hub.remotes import get_remote, save_token

    url = get_remote(name).url
    secret = token_value or click.prompt(f"token for {name} ({url})", hide_input=True)
    scope = ""
    if not no_verify:
        with HubClient(url, secret.strip()) as client:
            who = client.whoami()
        scope = f" ({who['scope']}{', namespace ' + who['namespace'] if who.get('namespace') else ''})"
    path = save_token(name, secret)
    click.echo(f"logged in to {name}{scope}; token stored in {path}")


# ----------------------------------------------------------------------------- push / pull


@click.command()
@click.argument("ref")
@click.option("--remote", "remote_name", help="Remote to push to (default: origin, or the only one).")
@click.option("--to", "to", help="Push to the Hugging Face Hub instead: hf://ORG/REPO.")
@click.option("--tag", "tags", multiple=True, help="Also point this tag at the version on the remote.")
@click.option("--private", is_flag=True, help="With --to: create the Hub repository as private.")
@json_option
@handle_errors
def push(
    ref: str, remote_name: str | None, to: str | None, tags: tuple[str, ...], private: bool, as_json: bool
) -> None:
    """Upload version REF to a hub (only the blobs it lacks), or to the Hugging Face Hub."""
    from deltahub.errors import Unsupported

    if to is not None:
        from deltahub.hub.hf import parse_hf_url, push_to_hf

        if remote_name or tags:
            raise Unsupported(
                "--to hf://... takes neither --remote nor --tag (the commit is tagged v<version>)"
            )
        repo_id, _ = parse_hf_url(to)
        result = push_to_hf(ref, to, _registry(), private=private)
        if as_json:
            print_json(result)
        else:
            click.echo(
                f"pushed {ref} to hf://{repo_id} (commit {result['commit'][:12]}, tag {result['tag']})"
            )
        return
    from deltahub.hub.client import push as push_version
    from deltahub.hub.remotes import get_remote

    reg = _registry()
    r = get_remote(remote_name, reg.home)
    with _byte_progress(f"push {ref}") as (set_total, advance):
        result = push_version(ref, r, reg, tags=tags, on_total=set_total, on_bytes=advance)
    if as_json:
        print_json(result)
    else:
        click.echo(f"pushed {result['ref']} to {r.name} ({result['digest'][:19]})")


@click.command()
@click.argument("ref")
@click.option("--remote", "remote_name", help="Remote to pull from (default: origin, or the only one).")
@click.option("--name", help="With hf://: the local adapter name (default: from the repository).")
@click.option("--tag", "tags", multiple=True, help="Also point this local tag at the pulled version.")
@json_option
@handle_errors
def pull(ref: str, remote_name: str | None, name: str | None, tags: tuple[str, ...], as_json: bool) -> None:
    """Download REF from a hub (or hf://ORG/REPO[@REV] from the Hugging Face Hub) into the registry."""
    from deltahub.errors import Unsupported
    from deltahub.hub.hf import is_hf_url, pull_from_hf

    reg = _registry()
    if is_hf_url(ref):
        if remote_name:
            raise Unsupported("hf://... pulls from the Hugging Face Hub (HF_ENDPOINT), not from --remote")
        v = pull_from_hf(ref, name, reg, tags=tags)
    else:
        if name:
            raise Unsupported("--name is for hf:// imports; a hub version keeps its name")
        from deltahub.hub.client import pull as pull_version
        from deltahub.hub.remotes import get_remote

        r = get_remote(remote_name, reg.home)
        with _byte_progress(f"pull {ref}") as (set_total, advance):
            v = pull_version(ref, r, reg, tags=tags, on_total=set_total, on_bytes=advance)
    if as_json:
        print_json(v.to_dict())
    else:
        click.echo(f"pulled {v.ref} ({v.digest[:19]})")


# ----------------------------------------------------------------------------- webhooks


@click.group()
def webhook() -> None:
    """Tell other systems (a serving fleet) when versions are published or tags move."""


@webhook.command(name="add")
@click.argument("url")
@click.option(
    "--event",
    "events",
    multiple=True,
    required=True,
    type=click.Choice(["version.published", "tag.moved"]),
    help="Send this event (repeat for several).",
)
@click.option("--ns", "namespace", help="Only for adapters named NS/... (default: every adapter).")
@_home_option
@_db_option
@json_option
@handle_errors
def webhook_add(
    url: str,
    events: tuple[str, ...],
    namespace: str | None,
    home: str | None,
    db_url: str | None,
    as_json: bool,
) -> None:
    """POST signed JSON to URL on each event; prints the signing secret (HMAC-SHA256)."""
    hook = _meta(home, db_url).add_hook(url, list(events), namespace)
    if as_json:
        print_json(hook)
        return
    click.echo(hook["secret"])
    click.echo(
        f"(webhook {hook['id']}: {', '.join(hook['events'])}{' on ' + namespace + '/*' if namespace else ''}"
        f" -> {url}; verify X-Deltahub-Signature with this secret)",
        err=True,
    )


@webhook.command(name="list")
@_home_option
@_db_option
@json_option
@handle_errors
def webhook_list(home: str | None, db_url: str | None, as_json: bool) -> None:
    """List webhooks (never their secrets)."""
    rows = [{k: v for k, v in h.items() if k != "secret"} for h in _meta(home, db_url).hooks()]
    for r in rows:
        r["events"] = ",".join(r["events"])
    if as_json:
        print_json(rows)
    elif not rows:
        click.echo("no webhooks (add one with `deltahub webhook add URL --event tag.moved`)")
    else:
        print_table(rows, ("id", "url", "events", "namespace"))


@webhook.command(name="remove")
@click.argument("hook_id", type=int)
@_home_option
@_db_option
@handle_errors
def webhook_remove(hook_id: int, home: str | None, db_url: str | None) -> None:
    """Remove webhook HOOK_ID."""
    _meta(home, db_url).remove_hook(hook_id)
    click.echo(f"removed webhook {hook_id}")


@webhook.command(name="log")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@_home_option
@_db_option
@json_option
@handle_errors
def webhook_log(limit: int, home: str | None, db_url: str | None, as_json: bool) -> None:
    """The latest deliveries: event, URL, state (pending, delivered, failed), HTTP status, attempts, last error."""
    rows = _meta(home, db_url).deliveries(limit)
    if as_json:
        print_json(rows)
    elif not rows:
        click.echo("no deliveries yet")
    else:
        print_table(rows, ("id", "hook_id", "event", "url", "state", "status", "ok", "attempts", "error"))


# ----------------------------------------------------------------------------- hub storage


@click.group(name="hub")
def hub_group() -> None:
    """Run the hub's storage: migrate its schema, verify it, copy it to PostgreSQL + S3."""


@hub_group.command(name="migrate")
@_home_option
@_db_option
@json_option
@handle_errors
def hub_migrate(home: str | None, db_url: str | None, as_json: bool) -> None:
    """Create or upgrade the hub's metadata schema (run before starting new servers)."""
    from deltahub.hub.admin import migrate

    result = migrate(db_url, home)
    if as_json:
        print_json(result)
    elif result["db"] == "postgresql":
        click.echo(f"schema at version {result['to']} (was {result['from']})")
    else:
        click.echo(f"embedded hub in {result['home']} is up to date")


@hub_group.command(name="verify")
@_home_option
@_stores_options
@click.option("--no-rehash", is_flag=True, help="Check blobs are present without reading them.")
@click.option(
    "--sweep", is_flag=True, help="Also remove leftovers of interrupted uploads older than --older-than."
)
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    help="Seconds: younger leftovers may be uploads still running on another server.",
)
@json_option
@handle_errors
def hub_verify(
    home: str | None,
    db_url: str | None,
    blobs_url: str | None,
    s3_endpoint_url: str | None,
    no_rehash: bool,
    sweep: bool,
    older_than: float,
    as_json: bool,
) -> None:
    """Check every version's blobs are present and hash to their digests."""
    from deltahub.hub.admin import open_stores, verify_hub

    stores = open_stores(db_url, blobs_url, home, s3_endpoint_url=s3_endpoint_url, create=False)
    try:
        report = verify_hub(stores, rehash=not no_rehash, sweep=sweep, older_than=older_than)
    finally:
        stores.close()
    if as_json:
        print_json(report.to_dict())
    else:
        for p in report.problems:
            click.echo(f"problem: {p}")
        click.echo(
            f"{report.versions} versions, {report.blobs} blobs: {'ok' if report.ok else 'PROBLEMS'}"
            f"; {len(report.leftovers)} upload leftovers{f', {report.swept} swept' if sweep else ''}"
        )
    if not report.ok:
        raise SystemExit(1)


@hub_group.command(name="copy")
@click.option("--from", "src_db", help="Source metadata (default: the home's, sqlite:///HOME).")
@click.option("--from-blobs", "src_blobs", help="Source blobs (default: the source home's blobs/).")
@click.option("--to", "dst_db", required=True, help="Target metadata: postgresql://USER@HOST/DB.")
@click.option(
    "--to-blobs", "dst_blobs", required=True, help="Target blobs: s3://BUCKET/PREFIX or a directory."
)
@click.option("--s3-endpoint-url", envvar="DELTAHUB_S3_ENDPOINT_URL", help="S3-compatible endpoint.")
@_home_option
@json_option
@handle_errors
def hub_copy(
    src_db: str | None,
    src_blobs: str | None,
    dst_db: str,
    dst_blobs: str,
    s3_endpoint_url: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Copy a whole hub (blobs, versions, tags, tokens, webhooks) to other stores, then verify it.

    Typically from the embedded default to a team hub:
    `deltahub hub copy --to postgresql://hub@db/hub --to-blobs s3://bucket/hub`.
    Running it again adds only what is missing.
    """
    from deltahub.hub.admin import copy_hub, open_stores

    src = open_stores(src_db, src_blobs, home, s3_endpoint_url=s3_endpoint_url, create=False)
    dst = open_stores(dst_db, dst_blobs, home, s3_endpoint_url=s3_endpoint_url)
    try:
        report = copy_hub(src, dst)
    finally:
        src.close()
        dst.close()
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(
            f"copied {report.versions} versions and {report.blobs} blobs ({report.bytes} bytes sent); "
            "verified: every version, tag and blob matches"
        )


def register(cli: click.Group) -> None:
    for command in (serve, token, webhook, hub_group, remote, login, push, pull):
        cli.add_command(command)
