"""What every request handler shares: the stores, per-thread handles, the access policy.

The metadata store (meta.py: the embedded SQLite registry + hub.db, or PostgreSQL) hands
each worker thread its own connection (`registry_for_thread()`); the blob store
(blobstores.py: a local directory, or S3) is shared. Webhook deliveries run on their own
thread (webhooks.py), never in a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.requests import Request

from deltahub.errors import AuthError
from deltahub.hub.auth import AuthThrottle, bearer_token, client_of
from deltahub.hub.responses import Forbidden
from deltahub.hub.tokens import TokenInfo
from deltahub.registry.refs import check_name

MAX_BLOB_BYTES = 16 << 30  # a LoRA of a 70B model at high rank stays well below this


def namespace_of(full_name: str) -> str:
    """The namespace of an adapter name as blob links record it ("" for a bare name)."""
    ns, _ = check_name(full_name)
    return ns or ""


@dataclass
class HubState:
    """The hub's shared state; `authorize` and `can_use_blob` are its access policy.

    `db_url` / `blobs_url` pick the stores (none: the embedded ones in `home`); `s3`
    holds the S3 options (`endpoint_url`, `redirect`).
    """

    home: Path
    public_read: bool = False
    max_blob_bytes: int = MAX_BLOB_BYTES
    throttle: AuthThrottle = field(default_factory=AuthThrottle)
    db_url: str | None = None
    blobs_url: str | None = None
    s3: dict[str, Any] = field(default_factory=dict)
    meta: Any = field(init=False)
    store: Any = field(init=False)
    webhooks: Any = field(init=False)
    hidden_paths: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        from deltahub.hub.blobstores import open_blobs
        from deltahub.hub.meta import check_pairing, open_meta
        from deltahub.hub.webhooks import Dispatcher

        self.meta = open_meta(self.db_url, self.home)
        check_pairing(self.meta, self.blobs_url)
        home = getattr(self.meta, "home", self.home)
        self.store = open_blobs(self.blobs_url, home, self.meta, **self.s3)
        self.webhooks = Dispatcher(self.meta)
        paths = {str(self.home), str(self.home.resolve()), str(getattr(self.store, "root", self.home))}
        self.hidden_paths = tuple(sorted(paths, key=len, reverse=True))

    def registry_for_thread(self) -> Any:
        """This thread's metadata handle (list, search, versions, resolve, commit, tag, ...)."""
        return self.meta.handle()

    def tokens_for_thread(self) -> Any:
        return self.meta.handle().tokens

    def authenticate(self, request: Request) -> TokenInfo:
        """The presented token's record; failures count against the client's back-off."""
        client = client_of(request)
        self.throttle.check(client)
        token = bearer_token(request)
        try:
            return self.tokens_for_thread().check(token)
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
        return self.registry_for_thread().namespace_uses(info.namespace, digest)

    def link_blobs(self, full_name: str, digests: list[str]) -> None:
        self.registry_for_thread().link(namespace_of(full_name), digests)

    def close(self) -> None:
        self.webhooks.stop()
        self.meta.close()


def hub_state(request: Request) -> HubState:
    return request.app.state.hub
