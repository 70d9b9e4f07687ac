"""How the hub answers: its error types, their HTTP statuses, and strict JSON.

Every failure answers `{"error": code, "message": why}`. Messages never carry the hub's
paths or exception internals: those go to the server log (`deltahub.hub` logger), and a
500 names only an incident id to find them there.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from deltahub.errors import (
    AlreadyExists,
    AuthError,
    DeltahubError,
    IntegrityError,
    InvalidArtifact,
    InvalidConfig,
    InvalidRef,
    NotFound,
    ReadOnly,
    StorageFull,
    Unsupported,
)

log = logging.getLogger("deltahub.hub")


class Forbidden(AuthError):
    """A valid token whose scope or namespace does not cover the request (HTTP 403)."""


class PayloadTooLarge(DeltahubError):
    """An upload over the server's size limit (HTTP 413)."""


class TooManyFailures(AuthError):
    """Too many failed authentications from one client: back off (HTTP 429)."""

    def __init__(self, retry_after: float) -> None:
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
        super().__init__(f"too many failed authentications from this client; retry in {retry_after:.0f} s")


class CorruptBlob(DeltahubError):
    """A stored blob's bytes no longer match its digest (HTTP 500; details in the log)."""


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
    (TooManyFailures, 429, "too-many-failures"),
    (Forbidden, 403, "forbidden"),
    (MissingBlobs, 400, "missing-blobs"),
    (AuthError, 401, "unauthorized"),
    (CorruptBlob, 500, "corrupt-blob"),
    (StorageFull, 507, "storage-full"),
    (ReadOnly, 503, "read-only"),
    (InvalidArtifact, 400, "invalid-artifact"),
    (InvalidRef, 400, "invalid-ref"),
    (InvalidConfig, 400, "invalid-request"),
    (IntegrityError, 400, "digest-mismatch"),
    (NotFound, 404, "not-found"),
    (AlreadyExists, 409, "already-exists"),
    (PayloadTooLarge, 413, "too-large"),
    (Unsupported, 400, "unsupported"),
]


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def encode_json(data: Any) -> bytes:
    """Strict JSON (no NaN/Infinity tokens, which JSON parsers refuse)."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


class StrictJSONResponse(JSONResponse):
    """A JSON response that is always valid JSON, even for bad stored metadata.

    Stored rows are encoded strictly; a non-finite number that reached storage anyway
    (written before validation refused it) is answered as `null` and logged, so one bad
    row never turns every listing into a 500.
    """

    def render(self, content: Any) -> bytes:
        try:
            return encode_json(content)
        except ValueError:
            log.warning("a stored record holds a non-finite number; answered as null")
            return encode_json(_finite(content))


def _scrub(message: str, hidden: tuple[str, ...]) -> str:
    for path in hidden:
        if path:
            message = message.replace(f" in {path}", " on this hub").replace(path, "<hub>")
    return message


def _header_text(text: str) -> str:
    """A header value: HTTP headers are Latin-1, so anything else is escaped."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\r", " ").replace("\n", " ")


def error_response(
    exc: DeltahubError, extra: dict[str, Any] | None = None, hidden: tuple[str, ...] = ()
) -> JSONResponse:
    """The JSON answer for a `DeltahubError`; paths in `hidden` are scrubbed from it."""
    status, code = 400, "error"
    for cls, s, c in _STATUS:
        if isinstance(exc, cls):
            status, code = s, c
            break
    message = _scrub(str(exc), hidden)
    if status >= 500:
        incident = uuid.uuid4().hex[:12]
        log.error("incident %s: %s: %s", incident, type(exc).__name__, exc)
        said = (
            message if isinstance(exc, (CorruptBlob, StorageFull, ReadOnly)) else "the hub failed to answer"
        )
        message = f"{said} (incident {incident}, details in the server log)"
    body: dict[str, Any] = {"error": code, "message": message}
    if isinstance(exc, InvalidArtifact):
        body["rule"] = exc.rule
    body.update(extra or getattr(exc, "extra", None) or {})
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="deltahub"'
    headers.update(getattr(exc, "headers", None) or {})
    if hf_code := getattr(exc, "hf_code", None):
        headers["X-Error-Code"] = hf_code
        headers["X-Error-Message"] = _header_text(message[:500])
    return StrictJSONResponse(body, status_code=status, headers=headers)


def _close_unread_body(request: Request, response: Response) -> Response:
    """On an error to a request that carries a body, close the connection.

    The body may be unread (a 401 before a 5 GiB upload); on a kept-alive connection
    the server would have to drain all of it before the next request.
    """
    headers = request.headers
    if headers.get("transfer-encoding") or headers.get("content-length", "0") not in ("", "0"):
        response.headers["Connection"] = "close"
    return response


def _hidden(request: Request) -> tuple[str, ...]:
    hub = getattr(request.app.state, "hub", None)
    return hub.hidden_paths if hub is not None else ()


async def deltahub_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DeltahubError)
    return _close_unread_body(request, error_response(exc, hidden=_hidden(request)))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
    message = (
        f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else "bad request"
    )
    response = StrictJSONResponse({"error": code, "message": message}, status_code=exc.status_code)
    return _close_unread_body(request, response)


async def internal_error(request: Request, exc: Exception) -> Response:
    incident = uuid.uuid4().hex[:12]
    log.error("incident %s on %s %s", incident, request.method, request.url.path, exc_info=exc)
    body = {
        "error": "internal",
        "message": f"internal error (incident {incident}, details in the server log)",
    }
    return _close_unread_body(request, StrictJSONResponse(body, status_code=500))
