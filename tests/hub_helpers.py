"""Fixtures for the hub tests: a real server on 127.0.0.1, tokens of every kind, adapters.

Back-ends: `BACKENDS` names the storage a hub runs on: "embedded" (the home's SQLite
files and blob directory, `deltahub serve` with no flags) and "postgres+s3" (a fresh
database on the tests' PostgreSQL cluster and a fresh bucket on moto's S3 server, from
tests/hub_services.py; skipped, with the reason, where those engines are absent). A test
module parametrizes its `hub` fixture with `params=BACKENDS` and uses the `Hub` methods
below (has_blob, corrupt_blob, overwrite_blob, sql, token_store, another_server, verify)
instead of reaching into a home.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltahub import artifact as af
from deltahub.hub.server import ServerThread
from deltahub.hub.tokens import TokenStore
from deltahub.registry import Registry


def lora_dir(path: Path, seed: int = 0, r: int = 4, layers: int = 2) -> Path:
    """A PEFT-format LoRA directory for the tiny Llama of tests/helpers.py (no PEFT needed)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, out in (("q_proj", 64), ("v_proj", 32)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, 64, generator=g) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-llama",
    }
    return af.write_dir(path, tensors, config)


BACKENDS = ["embedded", "postgres+s3"]


def backend_stores(backend: str) -> dict[str, Any]:
    """`create_app` keywords for a fresh store of this back-end ({} for the embedded one)."""
    if backend == "embedded":
        return {}
    from tests.hub_services import fresh_bucket, fresh_database, s3_endpoint

    db = fresh_database()
    return {"db": db, "blobs": fresh_bucket(), "s3_endpoint_url": s3_endpoint()}


@dataclass
class Hub:
    """A running hub: its URL, home, one token of each kind, and the stores it runs on."""

    url: str
    home: Path
    server: ServerThread
    tokens: dict[str, str]
    backend: str = "embedded"
    stores: dict[str, Any] = field(default_factory=dict)

    def registry(self) -> Registry:
        """The embedded hub's registry (its home): only for tests of that back-end."""
        assert self.backend == "embedded", "only the embedded hub has a registry home"
        return Registry(self.home)

    def open_stores(self) -> Any:
        from deltahub.hub.admin import open_stores

        s = self.stores
        return open_stores(s.get("db"), s.get("blobs"), self.home, s3_endpoint_url=s.get("s3_endpoint_url"))

    def has_blob(self, digest: str) -> bool:
        return self.server.app.state.hub.store.has(digest)

    def raw_blob(self, digest: str) -> bytes:
        """A stored blob's bytes as they are (unverified): the file, or the S3 object."""
        store = self.server.app.state.hub.store
        if store.kind == "local":
            return store.path(digest).read_bytes()
        return b"".join(store.chunks(digest))

    def overwrite_blob(self, digest: str, data: bytes) -> None:
        """Replace a stored blob's bytes under its digest, past every check (a disk or bucket gone bad)."""
        store = self.server.app.state.hub.store
        if store.kind == "local":
            store.path(digest).write_bytes(data)
        else:
            store.s3.put_object(Bucket=store.bucket, Key=store.key(digest), Body=data)

    def corrupt_blob(self, digest: str) -> None:
        """Flip one byte of a stored blob in place, same size, under its digest."""
        data = bytearray(self.raw_blob(digest))
        data[len(data) // 2] ^= 0xFF
        self.overwrite_blob(digest, bytes(data))

    def sql(self, statement: str) -> None:
        """Run one SQL statement on the hub's metadata database (registry.db or PostgreSQL),
        as an older hub or an operator could have written it."""
        if self.stores.get("db"):
            import psycopg

            with psycopg.connect(self.stores["db"], autocommit=True) as conn:
                conn.execute(statement)
        else:
            with contextlib.closing(sqlite3.connect(self.home / "registry.db")) as db, db:
                db.execute(statement)

    def token_store(self) -> Any:
        """This hub's token store (close it after use)."""
        return token_store(self.home, self.stores)

    @contextmanager
    def another_server(self, **kw: Any) -> Iterator[ServerThread]:
        """One more server over this hub's stores, with other settings (`ServerThread` keywords)."""
        with ServerThread(self.home, **self.stores, **kw) as server:
            yield server

    def verify(self) -> Any:
        from deltahub.hub.admin import verify_hub

        stores = self.open_stores()
        try:
            return verify_hub(stores)
        finally:
            stores.close()


def token_store(home: Path, stores: dict[str, Any] | None = None) -> Any:
    """The token store of a hub: hub.db in its home, or its PostgreSQL database."""
    if stores and stores.get("db"):
        from deltahub.hub.pgmeta import PostgresMeta

        meta = PostgresMeta(stores["db"])
        tokens = meta.handle().tokens
        tokens.close = meta.close  # its connection closes with the store
        return tokens
    return TokenStore(home)


def make_tokens(home: Path, stores: dict[str, Any] | None = None) -> dict[str, str]:
    store = token_store(home, stores)
    tokens = {
        "read": store.create("read")[0],
        "write": store.create("write", namespace="team")[0],
        "write_other": store.create("write", namespace="other")[0],
        "admin": store.create("admin")[0],
    }
    revoked, info = store.create("write")
    store.revoke(info.id)
    tokens["revoked"] = revoked
    expired, info = store.create("write", expires_days=1)
    # an hour in the past: the check must use the clock, not just the row
    store._update(info.id, {"expires": time.time() - 3600})
    tokens["expired"] = expired
    store.close()
    return tokens


def start_hub(tmp_path: Path, backend: str = "embedded", **kw: Any) -> Iterator[Hub]:
    """A hub server for one test; use as `yield from start_hub(tmp_path)` in a fixture.

    `kw` go to `ServerThread` (e.g. `redirect_downloads=True`, `public_read=True`).
    """
    home = tmp_path / "server-home"
    stores = backend_stores(backend)
    if not stores:
        Registry(home).close()
    tokens = make_tokens(home, stores)
    with ServerThread(home, **stores, **kw) as server:
        yield Hub(server.url, home, server, tokens, backend, stores)


@contextmanager
def running_hub(tmp_path: Path, backend: str = "embedded", **kw: Any) -> Iterator[Hub]:
    """`start_hub` as a context manager, for a test that needs its own settings."""
    yield from start_hub(tmp_path, backend, **kw)


def published(home: Path, name: str = "team/alpha", seed: int = 0, **kw: object) -> Registry:
    """A registry at `home` with one version of `name` published from a fresh LoRA dir."""
    reg = Registry(home)
    src = home.parent / f"src-{name.replace('/', '-')}-{seed}"
    kw.setdefault("description", f"adapter {name} seed {seed}")
    reg.publish(lora_dir(src, seed), name, **kw)  # type: ignore[arg-type]
    return reg


def export_bytes(reg: Registry, ref: str, out: Path) -> dict[str, bytes]:
    path = reg.export(ref, out)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Any ASGI app (a fake hub) on 127.0.0.1 and a free port; yields its URL, stops it after."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake hub did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
