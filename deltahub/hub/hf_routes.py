"""The Hugging Face Hub's download routes, answered from a deltahub registry.

With these, `huggingface_hub.snapshot_download(repo_id, revision=..., endpoint=URL)` and
`PeftModel.from_pretrained(repo_id)` under `HF_ENDPOINT=URL` fetch adapters from a
self-hosted deltahub. The mapping:

    repo id      the adapter's full name (`ns/name`, or a bare `name`)
    revision     a version, a tag or a digest; `main` means `latest`; a 40-hex commit hash
                 is a prefix of the version digest (the Hub's commit ids are 40 hex digits)
    token        the usual bearer token (`HF_TOKEN=dh_...`)

    GET      /api/models/{repo}[/revision/{rev}]    repo info: "sha" (the commit), "siblings"
    GET      /api/models/{repo}/tree/{rev}          the file listing snapshot_download reads
    HEAD/GET /{repo}/resolve/{rev}/{filename}       file bytes, with the headers
                                                    file_download.get_hf_file_metadata reads:
                                                    X-Repo-Commit, ETag and X-Linked-Etag (the
                                                    blob's sha256, as the Hub gives LFS files),
                                                    Content-Length and X-Linked-Size

A revision may also be the version's digest itself (`sha256:<64 hex>` or the 64 hex), so a
client pins exactly the bytes deltahub pinned; tree entries carry `lfs.sha256` likewise.

Blobs are served as on `/v1/blobs` (verified against their digest first; see blobs.py).
Errors carry `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) so the HF
client raises its usual exception types.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from deltahub.errors import InvalidRef, NotFound
from deltahub.hub.blobs import blob_response
from deltahub.hub.responses import CorruptBlob, HubNotFound, StrictJSONResponse, log
from deltahub.hub.state import hub_state
from deltahub.registry.refs import check_name, parse_ref
from deltahub.registry.registry import Version

COMMIT_HEX = 40


def commit_of(v: Version) -> str:
    """The Hub-style 40-hex commit id of a version: a prefix of its digest."""
    return v.digest.split(":", 1)[1][:COMMIT_HEX]


def _resolve(request: Request) -> Version:
    hub = hub_state(request)
    repo = request.path_params["repo"]
    rev = request.path_params.get("rev", "main")
    try:
        check_name(repo)
    except InvalidRef:
        raise HubNotFound("RepoNotFound", f"{repo!r} is not an adapter name on this hub") from None
    hub.authorize(request, "read", repo)
    reg = hub.registry_for_thread()
    if rev == "main":
        selector = "latest"
    elif len(rev) in (COMMIT_HEX, 64) and all(c in "0123456789abcdef" for c in rev):
        selector = "sha256:" + rev
    else:
        selector = rev
    try:
        ref = parse_ref(f"{repo}@{selector}")
    except InvalidRef:
        raise HubNotFound("RevisionNotFound", f"{rev!r} is not a version, tag or digest") from None
    try:
        reg.versions(repo, limit=1)  # does the repository exist (not: list all its versions)
    except NotFound:
        raise HubNotFound("RepoNotFound", f"no adapter named {repo!r} on this hub") from None
    try:
        return reg.resolve(ref)
    except NotFound as e:
        raise HubNotFound("RevisionNotFound", str(e)) from None


def _sizes(request: Request, v: Version) -> dict[str, int]:
    store = hub_state(request).store
    sizes = {}
    for f, d in v.files.items():
        try:
            sizes[f] = store.size(d)
        except (OSError, NotFound) as e:
            log.error("blob %s of %s (%s) cannot be read: %s", d, v.ref, f, e)
            raise CorruptBlob(f"a blob of {v.ref} is missing") from None
    return sizes


def repo_info(request: Request) -> Response:
    v = _resolve(request)
    sizes = _sizes(request, v)
    return StrictJSONResponse(
        {
            "id": v.full_name,
            "modelId": v.full_name,
            "sha": commit_of(v),
            "private": not hub_state(request).public_read,
            "library_name": "peft" if v.method == "lora" else "deltahub",
            "tags": ["deltahub", v.method, f"version:{v.version}"],
            "siblings": [{"rfilename": f, "size": s} for f, s in sorted(sizes.items())],
        }
    )


def repo_tree(request: Request) -> Response:
    v = _resolve(request)
    if request.path_params.get("sub"):
        raise HubNotFound("EntryNotFound", f"{v.ref} has no folder {request.path_params['sub']!r}")
    sizes = _sizes(request, v)
    return StrictJSONResponse(
        [
            {
                "type": "file",
                "path": f,
                "size": sizes[f],
                "oid": v.files[f].split(":", 1)[1][:COMMIT_HEX],
                "lfs": {"oid": v.files[f].split(":", 1)[1], "size": sizes[f], "pointerSize": 134},
            }
            for f in sorted(v.files)
        ]
    )


def resolve_file(request: Request) -> Response:
    v = _resolve(request)
    filename = request.path_params["filename"]
    headers = {"X-Repo-Commit": commit_of(v)}
    if filename not in v.files:
        raise HubNotFound(
            "EntryNotFound",
            f"{v.ref} has no file {filename!r} (it has {', '.join(sorted(v.files))})",
            headers,
        )
    # What get_hf_file_metadata reads first (the Hub sends them for LFS files, which may redirect).
    headers["X-Linked-Etag"] = f'"{v.files[filename].split(":", 1)[1]}"'
    headers["X-Linked-Size"] = str(_sizes(request, v)[filename])
    return blob_response(hub_state(request), v.files[filename], headers, request)


def routes() -> list[BaseRoute]:
    return [
        Route("/api/models/{repo:path}/revision/{rev}", repo_info),
        Route("/api/models/{repo:path}/tree/{rev}", repo_tree),
        Route("/api/models/{repo:path}/tree/{rev}/{sub:path}", repo_tree),
        Route("/api/models/{repo:path}", repo_info),  # no revision: main (latest)
        Route("/{repo:path}/resolve/{rev}/{filename}", resolve_file, methods=["GET", "HEAD"]),
    ]
