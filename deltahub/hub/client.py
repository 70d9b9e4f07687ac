"""The hub client, and push / pull between a local registry and a hub server.

push:  resolve locally; HEAD each blob on the server; upload only the missing ones
       (the server re-hashes them); then commit {file: digest}. Every step is
       idempotent, so a failed push is retried by running it again.
pull:  resolve on the server (every answer is checked: `BadResponse` if it is not what
       the protocol says); download each blob the local store lacks through
       `BlobStore.put_stream(stream, expected=digest)` (hash while writing to tmp/, then
       rename), so no byte that fails its sha256 ever becomes visible; then one
       `Registry.commit`. Interrupted, a pull leaves at most whole, verified, unreferenced
       blobs (which `gc` removes) and no version. Concurrent pulls into one home are safe:
       two renames of the same content are harmless and `commit` is idempotent. No
       download writes more than the version's declared size (or the blob's
       Content-Length): a hub that streams on is cut off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, urlparse

import httpx

from deltahub import artifact as af
from deltahub.errors import (
    AlreadyExists,
    AuthError,
    IntegrityError,
    InvalidArtifact,
    NotFound,
    RemoteError,
)
from deltahub.hub.remotes import Remote, get_remote, is_loopback
from deltahub.registry import Registry, Version
from deltahub.registry.store import BlobStore, check_digest

# Set to 1 to let the client send tokens over plain http to a non-loopback host.
INSECURE_ENV = "DELTAHUB_ALLOW_INSECURE_HTTP"

ProgressFn = Callable[[int], None]
CHUNK = 1 << 20
RETRIES = 3


class TransientError(RemoteError):
    """The hub could not be reached or failed on its side (5xx): worth retrying."""


class BadResponse(RemoteError):
    """The hub answered something other than what the protocol says (never trusted)."""


def _field(d: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = d.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise BadResponse(f"{what} has no valid {key!r}")
    return value


def check_version_answer(d: Any, what: str = "the hub's version record") -> dict[str, Any]:
    """A version record from a hub (resolve, commit, tag), checked field by field."""
    if not isinstance(d, dict):
        raise BadResponse(f"{what} is not a JSON object")
    try:
        check_digest(_field(d, "digest", str, what))
    except IntegrityError:
        raise BadResponse(f"{what} has no valid 'digest'") from None
    files = _field(d, "files", dict, what)
    for fname, digest in files.items():
        if not isinstance(fname, str) or not isinstance(digest, str):
            raise BadResponse(f"{what} lists a file that is not name -> digest")
    for key in ("full_name", "version"):
        _field(d, key, str, what)
    size = _field(d, "size", int, what)
    if size < 0:
        raise BadResponse(f"{what} has a negative size")
    return d


class _UploadFile:
    """A file for httpx to stream (its length known, so Content-Length is sent), reporting progress."""

    def __init__(self, f: BinaryIO, on_bytes: ProgressFn | None) -> None:
        self._f = f
        self._on_bytes = on_bytes

    def fileno(self) -> int:
        return self._f.fileno()

    def read(self, n: int = -1) -> bytes:
        chunk = self._f.read(n)
        if chunk and self._on_bytes:
            self._on_bytes(len(chunk))
        return chunk

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(CHUNK):
            yield chunk


class _ResponseReader:
    """`read()` over a streaming httpx response, for `BlobStore.put_stream`.

    Never hands out more than `limit` bytes: a hub that streams past the size it
    declared is cut off before the excess reaches the disk.
    """

    def __init__(self, response: httpx.Response, on_bytes: ProgressFn | None, limit: int) -> None:
        self._chunks = response.iter_raw(CHUNK)
        self._on_bytes = on_bytes
        self._limit = limit
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        for chunk in self._chunks:
            if chunk:
                if self.size + len(chunk) > self._limit:
                    raise IntegrityError(f"the hub sent more than the {self._limit} bytes it declared")
                self.size += len(chunk)
                if self._on_bytes:
                    self._on_bytes(len(chunk))
                return chunk
        return b""


class HubClient:
    """HTTP client for one deltahub server (`deltahub serve`)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        parsed = urlparse(self.url)
        if (
            token
            and parsed.scheme == "http"
            and not is_loopback(parsed.hostname or "")
            and os.environ.get(INSECURE_ENV) != "1"
        ):
            raise AuthError(
                f"refusing to send a token over plain http to {parsed.hostname}: serve the hub "
                f"behind a TLS reverse proxy and use an https:// URL (or set {INSECURE_ENV}=1 "
                "on a network you trust)"
            )
        headers = {"User-Agent": "deltahub"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=False,
        )

    @classmethod
    def for_remote(cls, remote: str | Remote | None = None, home: Path | str | None = None) -> HubClient:
        r = remote if isinstance(remote, Remote) else get_remote(remote, home)
        return cls(r.url, r.token)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise TransientError(f"cannot reach {self.url}: {e}") from None
        self._check(r)
        return r

    def _check(self, r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            body = r.json() if r.request.method != "HEAD" else {}
        except (ValueError, httpx.ResponseNotRead):
            body = {}
        code = body.get("error", str(r.status_code)) if isinstance(body, dict) else str(r.status_code)
        msg = body.get("message", r.reason_phrase) if isinstance(body, dict) else r.reason_phrase
        where = f"{self.url}: {msg}"
        if r.status_code in (401, 403):
            raise AuthError(f"{where} (HTTP {r.status_code}; check `deltahub login` or DELTAHUB_TOKEN)")
        if r.status_code == 404:
            raise NotFound(where)
        if r.status_code == 409:
            raise AlreadyExists(where)
        if code in ("digest-mismatch", "corrupt-blob"):
            raise IntegrityError(where)
        if code == "invalid-artifact":
            raise InvalidArtifact(body.get("rule", "remote"), where)
        cls = TransientError if r.status_code >= 500 else RemoteError
        raise cls(f"{where} (HTTP {r.status_code} {code})")

    @staticmethod
    def _q(text: str) -> str:
        return quote(text, safe="/@:")

    def _json(self, r: httpx.Response, kind: type) -> Any:
        """The JSON body of an answer, which must be a `kind` (dict or list)."""
        try:
            data = r.json()
        except (ValueError, RecursionError):
            raise BadResponse(f"{self.url} answered {r.request.url.path} with something not JSON") from None
        if not isinstance(data, kind):
            raise BadResponse(f"{self.url} answered {r.request.url.path} with a {type(data).__name__}")
        if kind is list and not all(isinstance(item, dict) for item in data):
            raise BadResponse(f"{self.url} answered {r.request.url.path} with a list of non-objects")
        return data

    def _versions(self, r: httpx.Response) -> list[dict[str, Any]]:
        what = f"a version record from {self.url}"
        return [check_version_answer(d, what) for d in self._json(r, list)]

    # ------------------------------------------------------------------ reads

    def whoami(self) -> dict[str, Any]:
        d = self._json(self._request("GET", "/v1/auth"), dict)
        _field(d, "scope", str, f"{self.url}'s answer about the token")
        if d.get("namespace") is not None:
            _field(d, "namespace", str, f"{self.url}'s answer about the token")
        return d

    def list(self, query: str | None = None, **filters: str | None) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"q": query, **filters}.items() if v}
        return self._versions(self._request("GET", "/v1/adapters", params=params))

    def search(self, query: str) -> list[dict[str, Any]]:
        return self.list(query)

    def versions(self, name: str) -> list[dict[str, Any]]:
        return self._versions(self._request("GET", f"/v1/adapters/{self._q(name)}/versions"))

    def resolve(self, ref: str) -> dict[str, Any]:
        r = self._request("GET", f"/v1/resolve/{self._q(ref)}")
        return check_version_answer(self._json(r, dict), f"{self.url}'s answer for {ref}")

    def manifest(self, ref: str) -> dict[str, Any]:
        return self._json(self._request("GET", f"/v1/manifest/{self._q(ref)}"), dict)

    def has_blob(self, digest: str) -> bool:
        try:
            r = self.http.head(f"/v1/blobs/{check_digest(digest)}")
        except httpx.HTTPError as e:
            raise TransientError(f"cannot reach {self.url}: {e}") from None
        if r.status_code == 404:
            return False
        self._check(r)
        return True

    def download_blob(
        self,
        digest: str,
        store: BlobStore,
        on_bytes: ProgressFn | None = None,
        max_bytes: int | None = None,
    ) -> int:
        """Stream a blob into `store`; its bytes must hash to `digest` or nothing is kept.

        At most `max_bytes` (and at most the answer's Content-Length) are written.
        """
        check_digest(digest)
        try:
            with self._blob_stream(digest) as r:
                if r.status_code >= 400:
                    r.read()
                    self._check(r)
                limit = max_bytes if max_bytes is not None else (1 << 62)
                length = r.headers.get("content-length")
                if length is not None:
                    if not (length.isascii() and length.isdigit()):
                        raise BadResponse(f"{self.url} sent blob {digest} with Content-Length {length!r}")
                    if int(length) > limit:
                        raise IntegrityError(
                            f"{self.url} declares blob {digest} as {length} bytes, over the {limit} expected"
                        )
                    limit = int(length)
                _, size = store.put_stream(_ResponseReader(r, on_bytes, limit), expected=digest)
        except httpx.HTTPError as e:
            raise TransientError(f"download of {digest} from {self.url} failed: {e}") from None
        except IntegrityError as e:
            raise IntegrityError(f"{self.url} sent a corrupt blob: {e}; nothing was kept") from None
        return size

    @contextmanager
    def _blob_stream(self, digest: str) -> Iterator[httpx.Response]:
        """GET a blob; a hub that redirects (to a presigned object-store URL) is followed once.

        The redirect target gets no Authorization header: the presigned URL carries its
        own signature, and the hub's token must never leave for another host.
        """
        with self.http.stream("GET", f"/v1/blobs/{digest}") as r:
            location = r.headers.get("location")
            if r.status_code not in (301, 302, 303, 307, 308) or not location:
                yield r
                return
        target = httpx.URL(self.url).join(location)
        if target.scheme not in ("http", "https"):
            raise BadResponse(f"{self.url} redirected blob {digest} to {target.scheme}:")
        with (
            httpx.Client(timeout=self.http.timeout, follow_redirects=False) as plain,
            plain.stream("GET", target, headers={"User-Agent": "deltahub"}) as r2,
        ):
            yield r2

    # ------------------------------------------------------------------ writes

    def upload_blob(self, name: str, digest: str, path: Path, on_bytes: ProgressFn | None = None) -> None:
        with open(path, "rb") as f:
            self._request(
                "PUT",
                f"/v1/adapters/{self._q(name)}/blobs/{check_digest(digest)}",
                content=_UploadFile(f, on_bytes),
                headers={"Content-Type": "application/octet-stream"},
            )

    def commit(
        self, name: str, files: dict[str, str], tags: list[str] | tuple[str, ...] = ()
    ) -> dict[str, Any]:
        body = {"files": files, "tags": list(tags)}
        r = self._request("POST", f"/v1/adapters/{self._q(name)}/versions", json=body)
        return check_version_answer(self._json(r, dict), f"{self.url}'s answer to the commit of {name}")

    def tag(self, name: str, tag: str, ref: str) -> dict[str, Any]:
        r = self._request("PUT", f"/v1/adapters/{self._q(name)}/tags/{tag}", json={"ref": ref})
        return check_version_answer(self._json(r, dict), f"{self.url}'s answer to tagging {name}")


def _retry(fn: Callable[[], Any]) -> Any:
    """Retry a transfer on network errors; every step of push/pull is idempotent."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except TransientError:
            if attempt == RETRIES - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    return None


def _client(remote: str | Remote | HubClient | None, registry: Registry) -> tuple[HubClient, bool]:
    if isinstance(remote, HubClient):
        return remote, False
    return HubClient.for_remote(remote, registry.home), True


def push(
    ref: str,
    remote: str | Remote | HubClient | None = None,
    registry: Registry | None = None,
    *,
    tags: tuple[str, ...] | list[str] = (),
    on_bytes: ProgressFn | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Upload a local version to a hub; return the server's record of it.

    Only blobs the server lacks are sent; the commit is idempotent, so retrying a
    failed push is safe. A different version under the same name and number on the
    server raises `AlreadyExists`.
    """
    reg = registry or Registry()
    client, own = _client(remote, reg)
    try:
        v = reg.resolve(ref)
        missing = {f: d for f, d in v.files.items() if not _retry(lambda d=d: client.has_blob(d))}
        if on_total:
            on_total(sum(reg.store.path(d).stat().st_size for d in missing.values()))
        for fname, digest in sorted(missing.items()):
            path = reg.store.path(digest)
            if not path.is_file():
                raise IntegrityError(f"{v.ref}: blob of {fname} is missing locally (run `deltahub verify`)")
            _retry(lambda n=v.full_name, d=digest, p=path: client.upload_blob(n, d, p, on_bytes))
        result = _retry(lambda: client.commit(v.full_name, v.files, list(tags)))
        if result.get("digest") != v.digest:
            raise IntegrityError(
                f"{client.url} recorded {v.ref} as {result.get('digest')}, expected {v.digest}"
            )
        return result
    finally:
        if own:
            client.close()


def pull(
    ref: str,
    remote: str | Remote | HubClient | None = None,
    registry: Registry | None = None,
    *,
    tags: tuple[str, ...] | list[str] = (),
    on_bytes: ProgressFn | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Version:
    """Download a version from a hub into the local registry; return the local version."""
    reg = registry or Registry()
    client, own = _client(remote, reg)
    try:
        info = _retry(lambda: client.resolve(ref))
        files: dict[str, str] = info["files"]
        for fname, digest in files.items():
            if fname not in af.KNOWN_FILES:
                raise InvalidArtifact("unknown-file", f"{client.url} lists {fname!r} in {info.get('ref')}")
            check_digest(digest)
        if af.artifact_digest(files) != info["digest"]:
            raise IntegrityError(
                f"{client.url}: the files of {info.get('ref')} do not hash to {info['digest']}"
            )
        missing = {f: d for f, d in files.items() if not reg.store.has(d)}
        declared = info["size"]  # every blob of the version together: no download may pass it
        if on_total:
            on_total(declared if missing else 0)
        budget = declared
        for digest in sorted(set(missing.values())):
            budget -= _retry(lambda d=digest, b=budget: client.download_blob(d, reg.store, on_bytes, b))
        v = reg.commit(files, list(tags))
        if v.digest != info["digest"]:
            raise IntegrityError(f"pulled {v.ref} has digest {v.digest}, the hub says {info['digest']}")
        return v
    finally:
        if own:
            client.close()


def search(
    query: str, remote: str | Remote | HubClient | None = None, home: Path | str | None = None
) -> list[dict]:
    """Search a hub's adapters (latest versions)."""
    if isinstance(remote, HubClient):
        return remote.search(query)
    with HubClient.for_remote(remote, home) as client:
        return client.search(query)


def version_from_dict(d: dict[str, Any]) -> Version:
    """A `Version` from a hub's JSON (its `to_dict()`), for the same tables as local ones."""
    from dataclasses import fields

    known = {f.name for f in fields(Version)} - {"id"}
    return Version(**{k: v for k, v in d.items() if k in known})


def search_versions(query: str, remote: str | Remote | HubClient | None = None) -> list[Version]:
    """`search`, as `Version` objects."""
    return [version_from_dict(d) for d in search(query, remote)]


__all__ = ["BadResponse", "HubClient", "pull", "push", "search", "search_versions", "version_from_dict"]
