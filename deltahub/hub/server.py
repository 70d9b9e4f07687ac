"""The hub server: one registry over HTTP (Starlette on uvicorn), and how it runs.

The routes live by job: api.py (registry: list, search, resolve, manifest, commit,
tags, auth), blobs.py (blob upload and download), hf_routes.py (the Hugging Face Hub's
download routes); state.py holds the shared state and access policy, responses.py the
errors and their statuses. Every failure answers `{"error": code, "message": why}`:
401 no, unknown, revoked or expired token; 403 a valid token whose scope or namespace
does not cover the request; 429 too many failed authentications from one client.

Connection limits (every one can be changed through `serve`/`ServerThread` keywords):

    header_timeout      a connection must deliver a request's headers within this many
                        seconds of opening (or of its previous response), else it is closed
    timeout_keep_alive  an idle kept-alive connection is closed after this many seconds
    limit_concurrency   connections + requests in flight before new requests get 503
    h11_max_incomplete_event_size   bytes of request line + headers (larger: 400, closed)
    BODY_IDLE_TIMEOUT_S an upload that sends nothing for this long is dropped (blobs.py)

A fronting TLS proxy should still add its own: a client body timeout, a request rate
limit per real client address, and a maximum body size (see README, "Security").
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from deltahub.errors import DeltahubError, Unsupported
from deltahub.hub import api, hf_routes, pages
from deltahub.hub import blobs as blob_routes
from deltahub.hub import predict as predict_routes
from deltahub.hub.auth import AuthThrottle
from deltahub.hub.remotes import is_loopback
from deltahub.hub.responses import deltahub_error, http_error, internal_error
from deltahub.hub.state import MAX_BLOB_BYTES, HubState
from deltahub.settings import default_home

DEFAULT_PORT = 8600
HEADER_TIMEOUT_S = 10.0
TIMEOUT_KEEP_ALIVE_S = 5
LIMIT_CONCURRENCY = 1024
MAX_HEADER_BYTES = 16 << 10

__all__ = [
    "DEFAULT_PORT",
    "MAX_BLOB_BYTES",
    "ServerThread",
    "check_bind",
    "create_app",
    "is_loopback",
    "serve",
]

# Names that lived here before the hub was split by job: importable from here for one
# release, with a DeprecationWarning naming their new home.
_MOVED = {
    "MAX_JSON_BODY": "deltahub.hub.api",
    "list_adapters": "deltahub.hub.api",
    "list_versions": "deltahub.hub.api",
    "resolve_ref": "deltahub.hub.api",
    "get_manifest": "deltahub.hub.api",
    "whoami": "deltahub.hub.api",
    "commit_version": "deltahub.hub.api",
    "move_tag": "deltahub.hub.api",
    "get_blob": "deltahub.hub.blobs",
    "put_blob": "deltahub.hub.blobs",
    "blob_response": "deltahub.hub.blobs",
    "HubState": "deltahub.hub.state",
    "bearer_token": "deltahub.hub.auth",
    "Forbidden": "deltahub.hub.responses",
    "PayloadTooLarge": "deltahub.hub.responses",
    "MissingBlobs": "deltahub.hub.responses",
    "HubNotFound": "deltahub.hub.responses",
    "error_response": "deltahub.hub.responses",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(
            f"deltahub.hub.server.{name} moved to {_MOVED[name]}.{name}; the old path goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'deltahub.hub.server' has no attribute {name!r}")


def create_app(
    home: Path | str | None = None,
    *,
    public_read: bool = False,
    max_blob_bytes: int = MAX_BLOB_BYTES,
    throttle: AuthThrottle | None = None,
    db: str | None = None,
    blobs: str | None = None,
    s3_endpoint_url: str | None = None,
    redirect_downloads: bool = False,
    predict_base: str | Path | None = None,
    predict_options: dict[str, Any] | None = None,
) -> Starlette:
    """The ASGI app serving the registry at `home` (default `$DELTAHUB_HOME`).

    `db` (`sqlite:///PATH` or `postgresql://...`) and `blobs` (a directory or
    `s3://BUCKET/PREFIX`) move the metadata and the blobs out of the home: see meta.py
    and blobstores.py. Several processes may serve one PostgreSQL database and one bucket.
    `predict_base` (a model directory) loads that base once and adds `POST /v1/predict`
    (predict.py; `predict_options`: device, quantize).
    """
    s3 = (
        {"endpoint_url": s3_endpoint_url, "redirect": redirect_downloads}
        if blobs and blobs.startswith("s3://")
        else {}
    )
    hub = HubState(
        Path(home) if home is not None else default_home(),
        public_read,
        max_blob_bytes,
        throttle or AuthThrottle(),
        db_url=db,
        blobs_url=blobs,
        s3=s3,
    )
    routes = [
        Route("/v1/auth", api.whoami),
        Route("/v1/adapters", api.list_adapters),
        Route("/v1/adapters/{name:path}/versions", api.list_versions, methods=["GET"]),
        Route("/v1/adapters/{name:path}/versions", api.commit_version, methods=["POST"]),
        Route("/v1/adapters/{name:path}/blobs/{digest}", blob_routes.put_blob, methods=["PUT"]),
        Route("/v1/adapters/{name:path}/tags/{tag}", api.move_tag, methods=["PUT"]),
        Route("/v1/resolve/{ref:path}", api.resolve_ref),
        Route("/v1/manifest/{ref:path}", api.get_manifest),
        Route("/v1/blobs/{digest}", blob_routes.get_blob, methods=["GET", "HEAD"]),
        *pages.routes(),  # web pages under /ui/ (before the HF routes, whose paths are open-ended)
        *predict_routes.routes(predict_base is not None),
        *hf_routes.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=_lifespan,
        exception_handlers={
            DeltahubError: deltahub_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    app.state.hub = hub
    app.state.predictor = (
        predict_routes.predictor_for(hub, predict_base, **(predict_options or {})) if predict_base else None
    )
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    # Webhook workers start with the server: deliveries a killed server left pending go out.
    app.state.hub.webhooks.start()
    yield


# ----------------------------------------------------------------------------- connections


class HubH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout.

    uvicorn times out a kept-alive connection only until its next byte arrives, and a
    new connection not at all: one that never sends, or sends half a request line, would
    hold a slot forever. Here a connection must complete a request's headers within
    `header_timeout` seconds of opening or of its previous response.
    """

    header_timeout: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._waiting_cycle = self.cycle
        self._header_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.header_timeout, self._header_timed_out
        )

    def _cancel_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.cycle is self._waiting_cycle and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if getattr(self, "_header_timer", None) is not None and self.cycle is not self._waiting_cycle:
            self._cancel_header_timer()  # a new request's headers arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Not while a pipelined request (started by the call above) is being answered.
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._cancel_header_timer()
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)


def _protocol(header_timeout: float) -> type[HubH11Protocol]:
    return type("HubH11Protocol", (HubH11Protocol,), {"header_timeout": header_timeout})


def uvicorn_config(
    app: Starlette,
    *,
    header_timeout: float = HEADER_TIMEOUT_S,
    timeout_keep_alive: int = TIMEOUT_KEEP_ALIVE_S,
    limit_concurrency: int = LIMIT_CONCURRENCY,
    max_header_bytes: int = MAX_HEADER_BYTES,
    **kw: Any,
) -> Any:
    """The uvicorn `Config` with the hub's connection limits."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=_protocol(header_timeout),
        server_header=False,
        timeout_keep_alive=timeout_keep_alive,
        limit_concurrency=limit_concurrency,
        h11_max_incomplete_event_size=max_header_bytes,
        **kw,
    )


# ----------------------------------------------------------------------------- running


def check_bind(host: str, allow_insecure_http: bool) -> None:
    if not is_loopback(host) and not allow_insecure_http:
        raise Unsupported(
            f"refusing to serve plain HTTP on {host}: tokens would cross the network in clear text. "
            "Put a TLS reverse proxy in front and bind 127.0.0.1, or pass --allow-insecure-http"
        )


def serve(
    home: Path | str | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    public_read: bool = False,
    allow_insecure_http: bool = False,
    log_level: str = "info",
    stores: dict[str, Any] | None = None,
    **limits: Any,
) -> None:
    """Run the hub server in the foreground until interrupted.

    `stores`: `create_app`'s db / blobs / s3_endpoint_url / redirect_downloads (and
    predict_base / predict_options);
    `limits`: see `uvicorn_config`.
    """
    import uvicorn

    check_bind(host, allow_insecure_http)
    app = create_app(home, public_read=public_read, **(stores or {}))
    try:
        uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level, **limits)).run()
    finally:
        app.state.hub.close()


class ServerThread:
    """A hub server on 127.0.0.1 and a free port, in a background thread (tests, benchmarks).

    The socket is bound before the thread starts, so `url` is usable at once and no
    other process can take the port in between. `limits` go to `uvicorn_config`; other
    keywords to `create_app`.
    """

    _LIMITS = ("header_timeout", "timeout_keep_alive", "limit_concurrency", "max_header_bytes")

    def __init__(
        self, home: Path | str, *, public_read: bool = False, log_level: str = "warning", **kw: Any
    ) -> None:
        import uvicorn

        limits = {k: kw.pop(k) for k in self._LIMITS if k in kw}
        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they
        # are TCP, and without it Nagle + delayed ACK add ~40 ms to every response.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(home, public_read=public_read, **kw)
        self.config = uvicorn_config(self.app, log_level=log_level, **limits)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the hub server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        self.app.state.hub.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
