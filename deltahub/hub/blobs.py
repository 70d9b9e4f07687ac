"""Blob routes: upload (streamed, re-hashed) and download (verified, Range supported).

    HEAD/GET /v1/blobs/{digest}                   blob bytes                      read
    PUT      /v1/adapters/{name}/blobs/{digest}   upload; re-hashed, mismatch 400 write

Uploads stream from the socket straight into the blob store's `put_stream` (hash while
writing; land under the digest only if it matches), so a blob is never held whole in memory and is visible only once its
bytes match the digest in the URL. An upload links the blob to the adapter's namespace, and
its bytes pass a NaN/Inf scan on the way whose verdict is recorded by digest (blobfacts.py).

A namespaced token reads and HEADs only blobs linked to its namespace; any other digest
answers 404, exactly as an absent one, so existence leaks nothing (`HubState.can_use_blob`).

Before a local blob is served, its (inode, size, mtime, ctime) is compared with those of
its last successful hash check (`blob_checks` in the metadata store); if anything
changed, the file is hashed again, and a blob whose bytes no longer match its digest is
never served: the answer is a 500 (details, with the path, in the server log). Where
the blobs live on S3 the same holds with (size, ETag) as the key (the facts the upload
recorded, blobfacts.py); then they stream through, or redirect to a presigned URL.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.from_thread
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from deltahub.errors import InvalidConfig, NotFound
from deltahub.hub import blobfacts
from deltahub.hub.responses import PayloadTooLarge, StrictJSONResponse
from deltahub.hub.state import HubState, hub_state
from deltahub.registry.refs import check_name
from deltahub.registry.store import check_digest

BODY_IDLE_TIMEOUT_S = 60.0  # an upload that sends nothing for this long is dropped


class _BodyReader:
    """A blocking `read()` over the request's async body stream, for a worker thread.

    `BlobStore.put_stream` reads a file-like object; this hands it the socket's chunks as
    they arrive (through `anyio.from_thread`), counting bytes against the size limit.
    """

    def __init__(self, request: Request, limit: int, idle_timeout: float = BODY_IDLE_TIMEOUT_S) -> None:
        self._chunks: AsyncIterator[bytes] = request.stream().__aiter__()
        self._limit = limit
        self._idle = idle_timeout
        self.size = 0

    async def _next(self) -> bytes | None:
        try:
            with anyio.fail_after(self._idle):
                return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise InvalidConfig(f"the upload sent nothing for {self._idle:.0f} s; dropped") from None

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


def verified_path(hub: HubState, digest: str) -> tuple[Path, os.stat_result]:
    """The path of a local blob whose bytes hash to `digest` (see `LocalBlobs.verified`)."""
    return hub.store.verified(digest)


def blob_response(
    hub: HubState, digest: str, headers: dict[str, str] | None = None, request: Request | None = None
) -> Response:
    """The bytes of a verified blob (GET, HEAD, Range), with content-addressed caching.

    Cacheable for a year by anyone on a public-read hub; otherwise `private`, so a
    shared cache never hands a token-protected blob to another client. An S3 store with
    `--redirect-downloads` answers a GET with a 302 to a presigned URL instead.
    """
    method = request.method if request is not None else "GET"
    range_header = request.headers.get("range") if request is not None else None
    if hub.store.kind == "s3":  # hashed at upload, or now if its ETag changed: corrupt is a 500
        facts = blobfacts.facts_for(hub.store, hub.registry_for_thread(), digest)
        # Stream exactly the object that was checked (a swap in between is a 412 from S3).
        return hub.store.response(digest, method, hub.public_read, headers, range_header, if_match=facts.etag)
    return hub.store.response(digest, method, hub.public_read, headers, range_header)


def get_blob(request: Request) -> Response:
    hub = hub_state(request)
    digest = check_digest(request.path_params["digest"])
    info = hub.authorize(request, "read")
    if not hub.can_use_blob(info, digest):
        raise NotFound(f"blob {digest} is not on this hub")
    return blob_response(hub, digest, request=request)


def _store_upload(hub: HubState, reader: _BodyReader, name: str, digest: str) -> tuple[str, int]:
    # Scanned as it streams, so a commit needs no second read of the bytes (blobfacts.py).
    scanning = blobfacts.ScanningReader(reader)
    stored, size = hub.store.put_stream(scanning, digest)
    hub.link_blobs(name, [stored])
    blobfacts.record_upload(hub.store, hub.registry_for_thread(), stored, scanning)
    return stored, size


async def put_blob(request: Request) -> Response:
    hub = hub_state(request)
    name = request.path_params["name"]
    check_name(name)
    digest = check_digest(request.path_params["digest"])
    # Authorize before a byte of the body is read; an error closes the connection
    # (responses._close_unread_body), so a refused upload is never drained.
    await run_in_threadpool(hub.authorize, request, "write", name)
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > hub.max_blob_bytes:
        raise PayloadTooLarge(f"a {length}-byte blob exceeds this hub's limit of {hub.max_blob_bytes} bytes")
    reader = _BodyReader(request, hub.max_blob_bytes)
    existed = await run_in_threadpool(hub.store.has, digest)
    stored, size = await run_in_threadpool(_store_upload, hub, reader, name, digest)
    return StrictJSONResponse({"digest": stored, "size": size}, status_code=200 if existed else 201)
