"""Hub commands: serve, token, remote, login, push, pull.

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
@predict_serve_options
@handle_errors
def serve(
    home: str | None,
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
    """
    from deltahub.hub.server import check_bind
    from deltahub.hub.server import serve as run_server

    check_bind(host, allow_insecure_http)
    click.echo(
        f"deltahub hub on http://{host}:{port} ({'public read' if public_read else 'token needed to read'}); "
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
        stores=predict_stores(predict_base, predict_device),
    )


# ----------------------------------------------------------------------------- tokens


@click.group()
def token() -> None:
    """Create, list and revoke this hub's access tokens."""


def _tokens(home: str | None) -> Any:
    from deltahub.hub.tokens import TokenStore
    from deltahub.settings import default_home

    return TokenStore(home or default_home())


@token.command(name="create")
@_home_option
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
    scope: str,
    namespace: str | None,
    expires: float | None,
    description: str,
    as_json: bool,
) -> None:
    """Make a token and print it once: only its SHA-256 is kept."""
    secret, info = _tokens(home).create(scope, namespace, expires, description)
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
@json_option
@handle_errors
def token_list(home: str | None, as_json: bool) -> None:
    """List tokens (their prefix, scope, namespace, expiry, status; never the token)."""
    rows = [t.to_dict() for t in _tokens(home).list()]
    if as_json:
        print_json(rows)
    elif not rows:
        click.echo("no tokens (create one with `deltahub token create --scope read`)")
    else:
        print_table(rows, ("id", "prefix", "scope", "namespace", "status", "expires", "description"))


@token.command(name="revoke")
@_home_option
@click.argument("token_id")
@handle_errors
def token_revoke(home: str | None, token_id: str) -> None:
    """Revoke a token by its id, its exact prefix as `token list` shows it, or the token itself.

    A prefix is matched exactly and case-sensitively; the token stops working at once.
    """
    info = _tokens(home).revoke(token_id)
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


def register(cli: click.Group) -> None:
    for command in (serve, token, remote, login, push, pull):
        cli.add_command(command)
