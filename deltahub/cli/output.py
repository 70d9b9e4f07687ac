"""Shared CLI plumbing: error mapping, tables, JSON output, progress bars."""

from __future__ import annotations

import functools
import json
import os
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


def print_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    title: str | None = None,
    *,
    keep: Sequence[str] = (),
    drop_first: Sequence[str] = (),
) -> None:
    """A rich table of `rows` (dicts) over `columns`, fitted to the terminal's width.

    When the table is wider than the terminal (or than `COLUMNS` in a pipe; a pipe
    without it never cuts), the columns of `drop_first` are shortened or dropped, in that
    order, until it fits; the columns of `keep` are never cut (they wrap instead).
    """
    from rich.console import Console
    from rich.table import Table

    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    console = Console()
    width = console.width if console.is_terminal or os.environ.get("COLUMNS") else None
    shown, limits = fit_columns(columns, cells, width, drop_first)
    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for col in shown:
        if col in keep:
            table.add_column(col, overflow="fold")
        else:
            table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=limits.get(col))
    index = [list(columns).index(col) for col in shown]
    for row in cells:
        table.add_row(*(row[i] for i in index))
    Console(width=width or 1000).print(table)  # a pipe without COLUMNS keeps the natural width


MIN_SHORTENED = 10  # a column cut narrower than this says too little: drop it instead


def fit_columns(
    columns: Sequence[str], cells: Sequence[Sequence[str]], width: int | None, drop_first: Sequence[str]
) -> tuple[list[str], dict[str, int]]:
    """The columns to show within `width` characters, and the widths to cut some of them to.

    Two spaces separate columns. Each column of `drop_first`, in order, is shortened (to no
    less than MIN_SHORTENED) if that makes the table fit, else dropped.
    """
    natural = {col: max([len(col), *(len(row[i]) for row in cells)]) for i, col in enumerate(columns)}
    shown, limits = list(columns), {}
    if width is None:
        return shown, limits

    def total() -> int:
        return sum(limits.get(c, natural[c]) for c in shown) + 2 * (len(shown) - 1)

    for col in drop_first:
        if total() <= width:
            break
        if col not in shown:
            continue
        cut = natural[col] - (total() - width)
        if cut >= max(MIN_SHORTENED, min(len(col), natural[col])):
            limits[col] = cut
            break
        shown.remove(col)
    return shown, limits


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
