"""What every request handler shares: the home, per-thread handles, the access policy.

A sqlite connection is not for concurrent use, and Starlette runs sync work in a thread
pool: each worker thread opens its own `Registry` and `TokenStore` (threading.local);
the token store's connection to `hub.db` also serves the blob links and checks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlite_utils import Database
from starlette.requests import Request

from deltahub.errors import AuthError
from deltahub.hub import hubdb
from deltahub.hub.auth import AuthThrottle, bearer_token, client_of
from deltahub.hub.responses import Forbidden
from deltahub.hub.tokens import ThreadLocalTokens, TokenInfo
from deltahub.registry import Registry
from deltahub.registry.refs import check_name
from deltahub.registry.store import BlobStore

MAX_BLOB_BYTES = 16 << 30  # a LoRA of a 70B model at high rank stays well below this


def namespace_of(full_name: str) -> str:
    """The namespace of an adapter name as blob links record it ("" for a bare name)."""
    ns, _ = check_name(full_name)
    return ns or ""


@dataclass
class HubState:
    """The hub's shared state; `authorize` and `can_use_blob` are its access policy."""

    home: Path
    public_read: bool = False
    max_blob_bytes: int = MAX_BLOB_BYTES
    throttle: AuthThrottle = field(default_factory=AuthThrottle)
    store: BlobStore = field(init=False)
    tokens: ThreadLocalTokens = field(init=False)
    hidden_paths: tuple[str, ...] = field(init=False)
    _local: threading.local = field(init=False, default_factory=threading.local)

    def __post_init__(self) -> None:
        self.registry_for_thread()  # create the home and apply migrations once, up front
        self.store = BlobStore(self.home)
        self.tokens = ThreadLocalTokens(self.home)
        self.tokens.get()
        paths = {str(self.home), str(self.home.resolve())}
        self.hidden_paths = tuple(sorted(paths, key=len, reverse=True))

    def registry_for_thread(self) -> Registry:
        reg = getattr(self._local, "registry", None)
        if reg is None:
            reg = self._local.registry = Registry(self.home)
        return reg

    def hubdb(self) -> Database:
        return self.tokens.get().db

    def authenticate(self, request: Request) -> TokenInfo:
        """The presented token's record; failures count against the client's back-off."""
        client = client_of(request)
        self.throttle.check(client)
        token = bearer_token(request)
        try:
            return self.tokens.get().check(token)
        except AuthError:
            if token:
                self.throttle.failed(client)
            raise

    def authorize(self, request: Request, need: str, name: str | None = None) -> TokenInfo | None:
        """Check the bearer token for `need` (read/write/admin) on adapter `name`.

        Runs in a worker thread (it reads hub.db). Returns None for a public read.
        """
        if need == "read" and self.public_read:
            return None
        info = self.authenticate(request)
        if not info.allows(need):
            raise Forbidden(f"this {info.scope} token cannot {need}; ask for a {need} token")
        if name is not None and not info.covers(name):
            raise Forbidden(f"this token covers namespace {info.namespace!r} only, not {name!r}")
        return info

    def can_use_blob(self, info: TokenInfo | None, digest: str) -> bool:
        """May this token (None: a public read) read, HEAD or commit this stored blob?

        A token without a namespace covers every blob; a namespaced one only blobs linked
        to its namespace: uploaded there, or part of a version committed there.
        """
        if info is None or info.namespace is None:
            return True
        if hubdb.is_linked(self.hubdb(), info.namespace, digest):
            return True
        # Versions committed without the hub (a publish or pull into the hub's home).
        found = self.registry_for_thread().db.execute(
            "select 1 from files f join versions v on v.id = f.version_id"
            " where f.blob = ? and v.namespace = ? limit 1",
            [digest, info.namespace],
        )
        return found.fetchone() is not None

    def link_blobs(self, full_name: str, digests: list[str]) -> None:
        hubdb.link(self.hubdb(), namespace_of(full_name), digests)


def hub_state(request: Request) -> HubState:
    return request.app.state.hub
