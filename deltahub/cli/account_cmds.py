"""`deltahub whoami` and `deltahub logout`: which token a remote sees, and forgetting it."""

from __future__ import annotations

import os
from typing import Any

import click

from deltahub.cli.output import handle_errors, json_option, print_json


@click.command()
@click.option("--remote", "remote_name", help="Ask this remote (default: origin, or the only one).")
@json_option
@handle_errors
def whoami(remote_name: str | None, as_json: bool) -> None:
    """Ask a remote what the stored token (or $DELTAHUB_TOKEN) may do there."""
    from deltahub.hub.client import HubClient
    from deltahub.hub.remotes import get_remote
    from deltahub.settings import TOKEN_ENV

    remote = get_remote(remote_name)
    source = TOKEN_ENV if os.environ.get(TOKEN_ENV) else ("login" if remote.token else None)
    result: dict[str, Any] = {"remote": remote.name, "url": remote.url, "token_from": source}
    if remote.token is None:
        result.update({"logged_in": False, "scope": None, "namespace": None})
    else:
        with HubClient(remote.url, remote.token) as client:
            who = client.whoami()
        result.update({"logged_in": True, "scope": who.get("scope"), "namespace": who.get("namespace")})
    if as_json:
        print_json(result)
    elif not result["logged_in"]:
        click.echo(f"not logged in to {remote.name} ({remote.url}); run `deltahub login {remote.name}`")
    else:
        ns = f" on {result['namespace']}/*" if result["namespace"] else ""
        click.echo(f"{remote.name} ({remote.url}): a {result['scope']} token{ns}, from {source}")


@click.command()
@click.argument("name", required=False)
@handle_errors
def logout(name: str | None) -> None:
    """Forget the token stored for remote NAME (default: origin, or the only one)."""
    from deltahub.hub.remotes import forget_token, get_remote

    remote = get_remote(name)
    if forget_token(remote.name):
        click.echo(f"logged out of {remote.name}: its token is no longer stored")
    else:
        click.echo(f"no token was stored for {remote.name}")
    from deltahub.settings import TOKEN_ENV

    if os.environ.get(TOKEN_ENV):
        click.echo(f"note: ${TOKEN_ENV} is set and still sends a token; unset it too", err=True)


def register(cli: click.Group) -> None:
    for command in (whoami, logout):
        cli.add_command(command)
