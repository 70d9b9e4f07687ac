"""What every hub metadata store shares: the per-thread handle protocol, the base class,
and the helpers both implementations use (webhook checks, URL redaction).

The implementations: meta.py (the embedded default, and `open_meta`), pgmeta.py (PostgreSQL).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from deltahub.errors import InvalidConfig
from deltahub.registry.refs import Ref, check_name
from deltahub.registry.version import Version

EVENTS = ("version.published", "tag.moved")
# What the delivery log shows of a delivery row (not its body or its claim token).
DELIVERY_COLUMNS = (
    "id",
    "hook_id",
    "event",
    "delivery",
    "url",
    "state",
    "status",
    "ok",
    "attempts",
    "error",
    "at",
)


class MetaHandle(Protocol):
    """One thread's view of a metadata store (see the module docstring)."""

    tokens: Any

    # Listings page by keyset: `limit` rows, `cursor` from the last page's `.next_cursor`.
    def list(self, **filters: Any) -> list[Version]: ...
    def search(self, query: str, limit: int | None = 50, cursor: str | None = None) -> list[Version]: ...
    def versions(self, name: str, limit: int | None = None, cursor: str | None = None) -> list[Version]: ...
    def resolve(self, ref: str | Ref) -> Version: ...
    # With `emit`, a commit or tag move writes the webhook delivery rows it causes
    # (webhooks.outbox_rows) in its own transaction: both commit, or neither.
    def commit(
        self, files: dict[str, str], paths: dict[str, Path], tags: Sequence[str], *, emit: bool = False
    ) -> tuple[Version, bool]: ...
    def tag(
        self, name: str, selector: str, tag: str, *, emit: bool = False
    ) -> tuple[Version, str | None]: ...
    def link(self, namespace: str, digests: Iterable[str]) -> None: ...
    def namespace_uses(self, namespace: str, digest: str) -> bool: ...
    def checked_key(self, digest: str) -> tuple[int, int, int, int] | None: ...
    def record_check(self, digest: str, key: tuple[int, int, int, int]) -> None: ...
    def hooks(self, event: str | None = None, full_name: str | None = None) -> list[dict[str, Any]]: ...
    def add_hook(
        self, url: str, events: Sequence[str], namespace: str | None, secret: str | None = None
    ) -> dict[str, Any]: ...
    def remove_hook(self, hook_id: int) -> None: ...
    # The durable delivery queue (webhooks.py): rows `pending` from their event to their outcome.
    def claim(self, limit: int, lease: float, token: str) -> tuple[list[dict[str, Any]], float | None]: ...
    def finish(self, delivery_id: int, token: str, outcome: dict[str, Any]) -> bool: ...
    def pending(self) -> int: ...
    def deliveries(self, limit: int = 50) -> list[dict[str, Any]]: ...
    def every_version(self) -> Iterator[Version]: ...
    def close(self) -> None: ...


class MetaStore:
    """A metadata store shared by threads: `handle()` is this thread's connection."""

    url: str

    def __init__(self) -> None:
        self._local = threading.local()
        self._handles: list[MetaHandle] = []
        self._lock = threading.Lock()

    def _open(self) -> MetaHandle:
        raise NotImplementedError

    def handle(self) -> MetaHandle:
        h = getattr(self._local, "handle", None)
        if h is None or getattr(h, "broken", False):
            h = self._local.handle = self._open()
            with self._lock:
                self._handles.append(h)
        return h

    def close(self) -> None:
        with self._lock:
            for h in self._handles:
                with contextlib.suppress(Exception):  # closing is best effort
                    h.close()
            self._handles.clear()


def redact(url: str) -> str:
    """A database URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def check_hook(url: str, events: Sequence[str], namespace: str | None) -> None:
    from urllib.parse import urlsplit

    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise InvalidConfig(f"webhook URL {url!r} must be http(s)://HOST/...")
    for e in events:
        if e not in EVENTS:
            raise InvalidConfig(f"event {e!r} is not one of {', '.join(EVENTS)}")
    if not events:
        raise InvalidConfig(f"give at least one --event ({', '.join(EVENTS)})")
    if namespace is not None:
        check_name(namespace)


def hook_matches(hook: dict[str, Any], event: str | None, full_name: str | None) -> bool:
    if event is not None and event not in hook["events"]:
        return False
    ns = hook.get("namespace")
    return ns is None or full_name is None or full_name.startswith(ns + "/")


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)
