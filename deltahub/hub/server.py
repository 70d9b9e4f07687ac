"""The hub server: one registry over HTTP (Starlette on uvicorn).

Routes (JSON unless noted; every failure answers `{"error": code, "message": why}`):

    GET  /v1/adapters?q=&method=&base_model=&task=   list (latest versions) or search    read
    GET  /v1/adapters/{name}/versions                 every version of one adapter        read
    GET  /v1/resolve/{ref}                            the version a reference names       read
    GET  /v1/manifest/{ref}                           its deltahub.json                   read
    HEAD/GET /v1/blobs/{digest}                       blob bytes (Range supported)        read
    PUT  /v1/adapters/{name}/blobs/{digest}           upload a blob; re-hashed, mismatch 400   write
    POST /v1/adapters/{name}/versions                 commit {"files": {file: digest}, "tags": []}
                                                      201 new, 200 same again, 409 other content,
                                                      400 missing blobs / invalid artifact     write
    PUT  /v1/adapters/{name}/tags/{tag}               move a tag to {"ref": selector}     write
    GET  /v1/auth                                     what the presented token may do     any token

plus the Hugging Face Hub download routes (`hf_routes.py`). Status codes: 401 no,
unknown, revoked or expired token; 403 a valid token whose scope or namespace does not
cover the request.

A sqlite connection is not for concurrent use, and Starlette runs sync work in a thread
pool: each worker thread opens its own `Registry` and `TokenStore` (threading.local).
Uploads stream from the socket straight into `BlobStore.put_stream` (hash while writing,
fsync, rename), so a blob is never held whole in memory and is visible only once its
bytes match the digest in the URL.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.from_thread
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from deltahub import artifact as af
from deltahub.errors import (
    AlreadyExists,
    AuthError,
    DeltahubError,
    IntegrityError,
    InvalidArtifact,
    InvalidConfig,
    InvalidRef,
    NotFound,
    Unsupported,
)
from deltahub.hub.remotes import is_loopback
from deltahub.hub.tokens import ThreadLocalTokens, TokenInfo
from deltahub.registry import Registry
from deltahub.registry.refs import check_name, check_tag, parse_ref
from deltahub.registry.store import BlobStore, check_digest
from deltahub.settings import default_home

DEFAULT_PORT = 8600
MAX_BLOB_BYTES = 16 << 30  # a LoRA of a 70B model at high rank stays well below this
MAX_JSON_BODY = 4 << 20


class Forbidden(AuthError):
    """A valid token whose scope or namespace does not cover the request (HTTP 403)."""


class PayloadTooLarge(DeltahubError):
    """An upload over the server's size limit (HTTP 413)."""


class MissingBlobs(DeltahubError):
    """A commit names blobs the hub does not have (HTTP 400, listing them)."""

    def __init__(self, missing: list[str]) -> None:
        self.extra = {"missing": missing}
        super().__init__(f"upload these blobs first: {', '.join(missing)}")


class HubNotFound(NotFound):
    """A 404 on a Hugging Face route, with the `X-Error-Code` the HF client reads."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.hf_code = code
        self.headers = headers or {}
        super().__init__(message)


# error class -> (status, code); the first match in order wins (subclasses first).
_STATUS: list[tuple[type[DeltahubError], int, str]] = [
    (Forbidden, 403, "forbidden"),
    (MissingBlobs, 400, "missing-blobs"),
    (AuthError, 401, "unauthorized"),
    (InvalidArtifact, 400, "invalid-artifact"),
    (InvalidRef, 400, "invalid-ref"),
    (InvalidConfig, 400, "invalid-request"),
    (IntegrityError, 400, "digest-mismatch"),
    (NotFound, 404, "not-found"),
    (AlreadyExists, 409, "already-exists"),
    (PayloadTooLarge, 413, "too-large"),
    (Unsupported, 400, "unsupported"),
]


def error_response(exc: DeltahubError, extra: dict[str, Any] | None = None) -> JSONResponse:
    status, code = 400, "error"
    for cls, s, c in _STATUS:
        if isinstance(exc, cls):
            status, code = s, c
            break
    body: dict[str, Any] = {"error": code, "message": str(exc)}
    if isinstance(exc, InvalidArtifact):
        body["rule"] = exc.rule
    body.update(extra or getattr(exc, "extra", None) or {})
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="deltahub"'
    headers.update(getattr(exc, "headers", None) or {})
    if hf_code := getattr(exc, "hf_code", None):
        headers["X-Error-Code"] = hf_code
        headers["X-Error-Message"] = str(exc)[:500]
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class HubState:
    """What every request handler shares: the home, per-thread handles, the policy."""

    home: Path
    public_read: bool = False
    max_blob_bytes: int = MAX_BLOB_BYTES
    store: BlobStore = field(init=False)
    tokens: ThreadLocalTokens = field(init=False)
    _local: threading.local = field(init=False, default_factory=threading.local)

    def __post_init__(self) -> None:
        self.registry_for_thread()  # create the home and apply migrations once, up front
        self.store = BlobStore(self.home)
        self.tokens = ThreadLocalTokens(self.home)
        self.tokens.get()

    def registry_for_thread(self) -> Registry:
        reg = getattr(self._local, "registry", None)
        if reg is None:
            reg = self._local.registry = Registry(self.home)
        return reg

    def authorize(self, request: Request, need: str, name: str | None = None) -> TokenInfo | None:
        """Check the bearer token for `need` (read/write/admin) on adapter `name`.

        Runs in a worker thread (it reads hub.db). Returns None for a public read.
        """
        if need == "read" and self.public_read:
            return None
        info = self.tokens.get().check(bearer_token(request))
        if not info.allows(need):
            raise Forbidden(f"this {info.scope} token cannot {need}; ask for a {need} token")
        if name is not None and not info.covers(name):
            raise Forbidden(f"this token covers namespace {info.namespace!r} only, not {name!r}")
        return info


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _state(request: Request) -> HubState:
    return request.app.state.hub


# ----------------------------------------------------------------------------- bodies


class _BodyReader:
    """A blocking `read()` over the request's async body stream, for a worker thread.

    `BlobStore.put_stream` reads a file-like object; this hands it the socket's chunks as
    they arrive (through `anyio.from_thread`), counting bytes against the size limit.
    """

    def __init__(self, request: Request, limit: int) -> None:
        self._chunks: AsyncIterator[bytes] = request.stream().__aiter__()
        self._limit = limit
        self.size = 0

    async def _next(self) -> bytes | None:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None

    def read(self, n: int = -1) -> bytes:
        while True:
            chunk = anyio.from_thread.run(self._next)
            if chunk is None:
                return b""
            if not chunk:  # an empty chunk mid-stream is legal in ASGI; only the end stops us
                continue
            self.size += len(chunk)
            if self.size > self._limit:
                raise PayloadTooLarge(f"upload exceeds this hub's limit of {self._limit} bytes")
            return chunk


async def _read_json(request: Request) -> dict[str, Any]:
    size = 0
    parts: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise PayloadTooLarge(f"request body exceeds {MAX_JSON_BODY} bytes")
        parts.append(chunk)
    try:
        data = json.loads(b"".join(parts) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidConfig(f"request body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidConfig("request body must be a JSON object")
    return data


# ----------------------------------------------------------------------------- read routes


def _version_dict(v: Any) -> dict[str, Any]:
    return v.to_dict()


def list_adapters(request: Request) -> Response:
    hub = _state(request)
    info = hub.authorize(request, "read")
    reg = hub.registry_for_thread()
    q = request.query_params
    limit = q.get("limit", "50")
    if not limit.isdigit():
        raise InvalidConfig(f"limit must be a positive integer, got {limit!r}")
    if q.get("q"):
        found = reg.search(q["q"], limit=min(int(limit), 1000))
    else:
        found = reg.list(
            base_model=q.get("base_model"), method=q.get("method"), task=q.get("task"), name=q.get("name")
        )
    if info is not None:
        found = [v for v in found if info.covers(v.full_name)]
    return JSONResponse([_version_dict(v) for v in found])


def list_versions(request: Request) -> Response:
    hub = _state(request)
    name = request.path_params["name"]
    check_name(name)
    hub.authorize(request, "read", name)
    return JSONResponse([_version_dict(v) for v in hub.registry_for_thread().versions(name)])


def resolve_ref(request: Request) -> Response:
    hub = _state(request)
    ref = parse_ref(request.path_params["ref"])
    hub.authorize(request, "read", ref.full_name)
    return JSONResponse(_version_dict(hub.registry_for_thread().resolve(ref)))


def get_manifest(request: Request) -> Response:
    hub = _state(request)
    ref = parse_ref(request.path_params["ref"])
    hub.authorize(request, "read", ref.full_name)
    return JSONResponse(hub.registry_for_thread().manifest(ref).to_dict())


def get_blob(request: Request) -> Response:
    hub = _state(request)
    digest = check_digest(request.path_params["digest"])
    hub.authorize(request, "read")
    return blob_response(hub, digest)


def blob_response(hub: HubState, digest: str, headers: dict[str, str] | None = None) -> Response:
    path = hub.store.path(digest)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise NotFound(f"blob {digest} is not on this hub") from None
    base = {
        "ETag": f'"{digest.split(":", 1)[1]}"',
        "X-Content-Digest": digest,
        "Cache-Control": "public, max-age=31536000, immutable",  # content-addressed
    }
    return FileResponse(
        path, stat_result=stat, media_type="application/octet-stream", headers={**base, **(headers or {})}
    )


def whoami(request: Request) -> Response:
    hub = _state(request)
    info = hub.tokens.get().check(bearer_token(request))
    return JSONResponse({"scope": info.scope, "namespace": info.namespace, "public_read": hub.public_read})


# ----------------------------------------------------------------------------- write routes


async def put_blob(request: Request) -> Response:
    hub = _state(request)
    name = request.path_params["name"]
    check_name(name)
    digest = check_digest(request.path_params["digest"])
    await run_in_threadpool(hub.authorize, request, "write", name)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > hub.max_blob_bytes:
        raise PayloadTooLarge(f"a {length}-byte blob exceeds this hub's limit of {hub.max_blob_bytes} bytes")
    reader = _BodyReader(request, hub.max_blob_bytes)
    existed = await run_in_threadpool(hub.store.has, digest)
    stored, size = await run_in_threadpool(hub.store.put_stream, reader, digest)
    return JSONResponse({"digest": stored, "size": size}, status_code=200 if existed else 201)


def _commit(hub: HubState, name: str, files: dict[str, str], tags: list[str]) -> tuple[dict[str, Any], bool]:
    reg = hub.registry_for_thread()
    for fname, digest in files.items():
        if fname not in af.KNOWN_FILES:
            raise InvalidArtifact(
                "unknown-file", f"{fname!r} is not an artifact file ({', '.join(af.KNOWN_FILES)})"
            )
        check_digest(digest)
    missing = sorted(f"{f} ({d})" for f, d in files.items() if not hub.store.has(d))
    if missing:
        raise MissingBlobs(missing)
    if af.MANIFEST_FILE not in files:
        raise InvalidArtifact("missing-file", f"a committed version needs its {af.MANIFEST_FILE}")
    manifest = af.Manifest.from_dict(
        af.read_json_file(hub.store.path(files[af.MANIFEST_FILE]), af.MAX_MANIFEST_BYTES, "manifest-json")
    )
    if manifest.name != name:
        raise InvalidArtifact("manifest-schema", f"the manifest names {manifest.name!r}, the URL {name!r}")
    existed = True
    if manifest.version is not None:
        try:
            reg.resolve(f"{name}@{manifest.version}")
        except (NotFound, InvalidRef):
            existed = False
    v = reg.commit(files, tags)
    return _version_dict(v), not existed


async def commit_version(request: Request) -> Response:
    hub = _state(request)
    name = request.path_params["name"]
    check_name(name)
    await run_in_threadpool(hub.authorize, request, "write", name)
    body = await _read_json(request)
    files, tags = body.get("files"), body.get("tags", [])
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise InvalidConfig('body needs "files": {file name: "sha256:..."}')
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidConfig('"tags" must be a list of strings')
    version, created = await run_in_threadpool(_commit, hub, name, files, tags)
    return JSONResponse(version, status_code=201 if created else 200)


async def move_tag(request: Request) -> Response:
    hub = _state(request)
    name = request.path_params["name"]
    check_name(name)
    tag = check_tag(request.path_params["tag"])
    await run_in_threadpool(hub.authorize, request, "write", name)
    body = await _read_json(request)
    selector = body.get("ref")
    if not isinstance(selector, str) or not selector:
        raise InvalidConfig('body needs "ref": a version, tag or sha256 digest of this adapter')
    v = await run_in_threadpool(lambda: hub.registry_for_thread().tag(f"{name}@{selector}", tag))
    return JSONResponse(_version_dict(v))


# ----------------------------------------------------------------------------- the app


async def _deltahub_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DeltahubError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    message = (
        f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    )
    return JSONResponse({"error": code, "message": message}, status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "internal", "message": f"{type(exc).__name__}: {exc}"}, status_code=500)


def create_app(
    home: Path | str | None = None, *, public_read: bool = False, max_blob_bytes: int = MAX_BLOB_BYTES
) -> Starlette:
    """The ASGI app serving the registry at `home` (default `$DELTAHUB_HOME`)."""
    from deltahub.hub import hf_routes

    hub = HubState(Path(home) if home is not None else default_home(), public_read, max_blob_bytes)
    routes = [
        Route("/v1/auth", whoami),
        Route("/v1/adapters", list_adapters),
        Route("/v1/adapters/{name:path}/versions", list_versions, methods=["GET"]),
        Route("/v1/adapters/{name:path}/versions", commit_version, methods=["POST"]),
        Route("/v1/adapters/{name:path}/blobs/{digest}", put_blob, methods=["PUT"]),
        Route("/v1/adapters/{name:path}/tags/{tag}", move_tag, methods=["PUT"]),
        Route("/v1/resolve/{ref:path}", resolve_ref),
        Route("/v1/manifest/{ref:path}", get_manifest),
        Route("/v1/blobs/{digest}", get_blob, methods=["GET", "HEAD"]),
        *hf_routes.routes(),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            DeltahubError: _deltahub_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    app.state.hub = hub
    return app


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
) -> None:
    """Run the hub server in the foreground until interrupted."""
    import uvicorn

    check_bind(host, allow_insecure_http)
    app = create_app(home, public_read=public_read)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)


class ServerThread:
    """A hub server on 127.0.0.1 and a free port, in a background thread (tests, benchmarks).

    The socket is bound before the thread starts, so `url` is usable at once and no
    other process can take the port in between.
    """

    def __init__(
        self, home: Path | str, *, public_read: bool = False, log_level: str = "warning", **kw: Any
    ) -> None:
        import uvicorn

        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they
        # are TCP, and without it Nagle + delayed ACK add ~40 ms to every response.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(home, public_read=public_read, **kw)
        config = uvicorn.Config(self.app, log_level=log_level, server_header=False, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
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

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
