"""The registry routes of the hub API (JSON in, strict JSON out).

    GET  /v1/adapters?q=&method=&base_model=&task=&limit=&cursor=  list (latest versions) or search  read
    GET  /v1/adapters/{name}/versions?limit=&cursor=  the versions of one adapter, in pages read
    (a page's next cursor is the X-Next-Cursor header; no header on the last page)
    GET  /v1/resolve/{ref}                            the version a reference names       read
    GET  /v1/manifest/{ref}                           its deltahub.json                   read
    POST /v1/adapters/{name}/versions                 commit {"files": {file: digest}, "tags": []}
                                                      201 new, 200 same again, 409 other content,
                                                      400 missing blobs / invalid artifact     write
    PUT  /v1/adapters/{name}/tags/{tag}               move a tag to {"ref": selector}     write
    GET  /v1/auth                                     what the presented token may do     any token

A commit is checked before anything is written: every blob must be stored and linked to
a namespace the token covers, the manifest and JSON configs must encode as strict
JSON (no NaN or infinity), so the version's answer can always be serialized, and no
floating tensor may hold NaN or infinity (`tensor-non-finite`, 400). The tensor checks use
what each blob's upload recorded (blobfacts.py): header bytes and a NaN/Inf verdict, so a
commit on S3 fetches the small JSON files but no tensor data.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from deltahub import artifact as af
from deltahub.errors import InvalidArtifact, InvalidConfig, NotFound
from deltahub.hub import blobfacts
from deltahub.hub.responses import MissingBlobs, PayloadTooLarge, StrictJSONResponse, encode_json
from deltahub.hub.state import HubState, hub_state
from deltahub.hub.tokens import TokenInfo
from deltahub.registry.refs import check_name, check_tag, parse_ref
from deltahub.registry.store import check_digest

MAX_JSON_BODY = 4 << 20
MAX_CONFIG_BYTES = 4 << 20
MAX_LIST_LIMIT = 1000
MAX_QUERY_CHARS = 512
_LIMIT_RE = re.compile(r"[0-9]{1,7}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


async def read_json(request: Request) -> dict[str, Any]:
    size = 0
    parts: list[bytes] = []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise PayloadTooLarge(f"request body exceeds {MAX_JSON_BODY} bytes")
        parts.append(chunk)
    try:
        data = json.loads(b"".join(parts) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidConfig("request body is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidConfig("request body must be a JSON object")
    return data


def _version_dict(v: Any) -> dict[str, Any]:
    return v.to_dict()


# ----------------------------------------------------------------------------- reads


def _query_text(q: Any, key: str) -> str | None:
    value = q.get(key)
    if value is None:
        return None
    if len(value) > MAX_QUERY_CHARS or _CONTROL_RE.search(value):
        raise InvalidConfig(f"{key} must be at most {MAX_QUERY_CHARS} printable characters")
    return value


def list_adapters(request: Request) -> Response:
    hub = hub_state(request)
    info = hub.authorize(request, "read")
    reg = hub.registry_for_thread()
    q = request.query_params
    limit = q.get("limit", "50")
    if not _LIMIT_RE.fullmatch(limit) or int(limit) < 1:
        raise InvalidConfig("limit must be a positive integer (ASCII digits)")
    filters = {k: _query_text(q, k) for k in ("q", "base_model", "method", "task", "name", "cursor")}
    page = dict(limit=min(int(limit), MAX_LIST_LIMIT), cursor=filters["cursor"])
    if filters["q"]:
        found = reg.search(filters["q"], **page)
    else:
        found = reg.list(
            base_model=filters["base_model"],
            method=filters["method"],
            task=filters["task"],
            name=filters["name"],
            **page,
        )
    headers = _next_page(found)
    if info is not None:  # a page may come back shorter than `limit`; its cursor still goes on
        found = [v for v in found if info.covers(v.full_name)]
    return StrictJSONResponse([_version_dict(v) for v in found], headers=headers)


def _next_page(page: Any) -> dict[str, str]:
    """The next page's cursor travels in a header: the body stays a plain JSON list."""
    cursor = getattr(page, "next_cursor", None)
    return {"X-Next-Cursor": cursor} if cursor else {}


def list_versions(request: Request) -> Response:
    hub = hub_state(request)
    name = request.path_params["name"]
    check_name(name)
    hub.authorize(request, "read", name)
    q = request.query_params
    limit = q.get("limit", str(MAX_LIST_LIMIT))
    if not _LIMIT_RE.fullmatch(limit) or int(limit) < 1:
        raise InvalidConfig("limit must be a positive integer (ASCII digits)")
    found = hub.registry_for_thread().versions(
        name, limit=min(int(limit), MAX_LIST_LIMIT), cursor=_query_text(q, "cursor")
    )
    return StrictJSONResponse([_version_dict(v) for v in found], headers=_next_page(found))


def resolve_ref(request: Request) -> Response:
    hub = hub_state(request)
    ref = parse_ref(request.path_params["ref"])
    hub.authorize(request, "read", ref.full_name)
    return StrictJSONResponse(_version_dict(hub.registry_for_thread().resolve(ref)))


def get_manifest(request: Request) -> Response:
    hub = hub_state(request)
    ref = parse_ref(request.path_params["ref"])
    hub.authorize(request, "read", ref.full_name)
    v = hub.registry_for_thread().resolve(ref)
    data = json.loads(hub.store.read_bytes(v.files[af.MANIFEST_FILE]))
    return StrictJSONResponse(af.Manifest.from_dict(data).to_dict())


def whoami(request: Request) -> Response:
    hub = hub_state(request)
    info = hub.authenticate(request)
    return StrictJSONResponse(
        {"scope": info.scope, "namespace": info.namespace, "public_read": hub.public_read}
    )


# ----------------------------------------------------------------------------- writes


def _refuse_constant(name: str) -> Any:
    raise ValueError(name)


def _check_strict_json(fname: str, path: Path) -> None:
    """A stored JSON file of a commit must parse as strict JSON (no NaN/Infinity)."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidArtifact("json-size", f"{fname} is over {MAX_CONFIG_BYTES} bytes")
    try:
        json.loads(path.read_bytes(), parse_constant=_refuse_constant)
    except ValueError as e:
        raise InvalidArtifact("non-finite", f"{fname} holds {e} (JSON has no NaN or infinity)") from None
    except RecursionError:
        raise InvalidArtifact("json-depth", f"{fname} is nested too deeply") from None


def _stat(hub: HubState, digest: str) -> tuple[int, str | None] | None:
    try:
        return hub.store.stat(digest)
    except NotFound:
        return None


def _commit(
    hub: HubState, info: TokenInfo | None, name: str, files: dict[str, str], tags: list[str]
) -> tuple[dict[str, Any], bool]:
    reg = hub.registry_for_thread()
    for fname, digest in files.items():
        if fname not in af.KNOWN_FILES:
            raise InvalidArtifact(
                "unknown-file", f"{fname!r} is not an artifact file ({', '.join(af.KNOWN_FILES)})"
            )
        check_digest(digest)
    # A blob counts as present only if this token may use it (linked to its namespace):
    # a writer cannot commit another namespace's blobs without uploading them.
    stats = {d: _stat(hub, d) for d in set(files.values())}  # one HEAD each on S3, kept for the checks
    missing = sorted(
        f"{f} ({d})" for f, d in files.items() if not (stats[d] is not None and hub.can_use_blob(info, d))
    )
    if missing:
        raise MissingBlobs(missing)
    if af.MANIFEST_FILE not in files:
        raise InvalidArtifact("missing-file", f"a committed version needs its {af.MANIFEST_FILE}")
    # Tensor data is not read again here: the upload's scan left its facts (blobfacts.py).
    with blobfacts.commit_view(hub.store, reg, files, stats) as (paths, facts):
        for fname, path in paths.items():
            if fname.endswith(".json"):
                _check_strict_json(fname, path)
        manifest = af.Manifest.from_dict(
            af.read_json_file(paths[af.MANIFEST_FILE], af.MAX_MANIFEST_BYTES, "manifest-json")
        )
        if manifest.name != name:
            raise InvalidArtifact(
                "manifest-schema", f"the manifest names {manifest.name!r}, the URL {name!r}"
            )
        try:  # serialize what the version row will hold before anything is committed
            encode_json(manifest.to_dict())
        except ValueError:
            raise InvalidArtifact(
                "non-finite", "the manifest holds NaN or infinity (JSON has neither)"
            ) from None
        tags = [check_tag(t) for t in tags]
        artifact = af.load_files(paths)  # the header and schema checks the commit repeats
        blobfacts.check_weights_finite(hub.store, files, paths, facts, artifact.tensors)
        v, created = reg.commit(files, paths, tags, emit=True)  # with its webhook deliveries
    hub.link_blobs(name, list(files.values()))
    hub.webhooks.notify()
    return _version_dict(v), created


def _move_tag(hub: HubState, name: str, selector: str, tag: str) -> dict[str, Any]:
    v, _ = hub.registry_for_thread().tag(name, selector, tag, emit=True)
    hub.webhooks.notify()
    return _version_dict(v)


async def commit_version(request: Request) -> Response:
    hub = hub_state(request)
    name = request.path_params["name"]
    check_name(name)
    info = await run_in_threadpool(hub.authorize, request, "write", name)
    body = await read_json(request)
    files, tags = body.get("files"), body.get("tags", [])
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise InvalidConfig('body needs "files": {file name: "sha256:..."}')
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidConfig('"tags" must be a list of strings')
    version, created = await run_in_threadpool(_commit, hub, info, name, files, tags)
    return StrictJSONResponse(version, status_code=201 if created else 200)


async def move_tag(request: Request) -> Response:
    hub = hub_state(request)
    name = request.path_params["name"]
    check_name(name)
    tag = check_tag(request.path_params["tag"])
    await run_in_threadpool(hub.authorize, request, "write", name)
    body = await read_json(request)
    selector = body.get("ref")
    if not isinstance(selector, str) or not selector:
        raise InvalidConfig('body needs "ref": a version, tag or sha256 digest of this adapter')
    return StrictJSONResponse(await run_in_threadpool(_move_tag, hub, name, selector, tag))
