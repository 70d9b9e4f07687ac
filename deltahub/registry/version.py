"""What the registry hands out: `Version` (one published version), result pages and reports."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Generic, TypeVar

from deltahub.errors import InvalidConfig


@dataclass
class Version:
    """One published version, as the registry records it."""

    full_name: str
    version: str
    digest: str
    method: str
    created: str
    base_model: str | None = None
    base_fingerprint: str | None = None
    task: str | None = None
    description: str = ""
    license: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    parents: list[dict[str, str]] = field(default_factory=list)
    size: int = 0
    tags: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    id: int = 0

    @property
    def name(self) -> str:
        return self.full_name.rsplit("/", 1)[-1]

    @property
    def namespace(self) -> str | None:
        return self.full_name.rsplit("/", 1)[0] if "/" in self.full_name else None

    @property
    def ref(self) -> str:
        return f"{self.full_name}@{self.version}"

    def __str__(self) -> str:
        return self.ref

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("id")
        d["name"] = self.full_name
        d["ref"] = self.ref
        return d


def version_key(version: str, created: str) -> tuple[int, int, str]:
    """Order versions: integer versions numerically, others by creation time."""
    return (1, int(version), created) if version.isdigit() else (0, 0, created)


T = TypeVar("T")


class Page(list[T], Generic[T]):
    """One page of results: a plain list, plus `next_cursor` (None on the last page).

    Pass `next_cursor` back as `cursor=` to get the page after this one. Cursors are keyset
    positions (the last row's sort key), so a page costs the same at any depth and rows
    published meanwhile are neither skipped nor repeated.
    """

    next_cursor: str | None

    def __init__(self, items: list[T] = (), next_cursor: str | None = None) -> None:  # type: ignore[assignment]
        super().__init__(items)
        self.next_cursor = next_cursor


def encode_cursor(kind: str, key: list[Any]) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str, types: tuple[type, ...]) -> list[Any]:
    """The key a cursor of `kind` carries; a cursor from another listing or mangled text is refused."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got_kind, *key = json.loads(raw)
    except (ValueError, TypeError):
        raise InvalidConfig(f"cursor {cursor!r} is not one this registry handed out") from None
    if (
        got_kind != kind
        or len(key) != len(types)
        or not all(type(k) is t for k, t in zip(key, types, strict=True))
    ):
        raise InvalidConfig(f"cursor {cursor!r} belongs to another listing; start again without it")
    return key


def check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidConfig(f"limit must be a positive integer, got {limit!r}")
    return limit


@dataclass
class VerifyReport:
    versions: int
    blobs: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    removed: list[str]
    bytes_freed: int
    tmp_removed: int
