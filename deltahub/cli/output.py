"""Shared CLI plumbing: error mapping, tables, JSON output, progress bars."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import click

from deltahub.errors import DeltahubError

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn a `DeltahubError` into one line on stderr and its exit code: no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeltahubError as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper  # type: ignore[return-value]


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table."
)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """A rich table of `rows` (dicts) over `columns`; plain text when not a terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for col in columns:
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(row.get(col)) for col in columns))
    if not console.is_terminal:
        console = Console(width=1000)  # never truncate in a pipe; the table keeps its natural width
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def progress(iterable: Iterable[Any], description: str, total: int | None = None) -> Iterable[Any]:
    """A progress bar on stderr (silent when stderr is not a terminal)."""
    from rich.progress import track

    return track(iterable, description=description, total=total, transient=True, console=_stderr_console())


@functools.lru_cache(maxsize=1)
def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def parse_key_values(pairs: Iterable[str], what: str) -> dict[str, float]:
    """`("acc=0.91", "f1=0.8")` -> {"acc": 0.91, "f1": 0.8}; a clear error otherwise."""
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key] = float(value)
        except ValueError:
            raise click.BadParameter(f"{pair!r} is not KEY=NUMBER", param_hint=what) from None
    return out
