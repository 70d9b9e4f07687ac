"""The hub's web pages: browse adapters, versions, diffs and fusions in a browser.

    GET  /                                   redirect to /ui/
    GET  /ui/?q=&method=&base_model=&task=&tag=&namespace=     namespaces and adapters
    GET  /ui/a/{name}                        an adapter: versions, tags, metric chart, card
    GET  /ui/a/{name}/v/{selector}           a version (number, tag or sha256:digest): files,
                                             config, base, lineage, pull / serve commands
    GET  /ui/a/{name}/v/{selector}/fusion    a fusion: attention per site and constituent
    GET  /ui/diff?a=REF&b=REF                two versions compared (deltahub.diff)
    GET  /ui/login   POST /ui/login   POST /ui/logout                 a browser session

Server-rendered from Jinja2 templates (templates/, autoescaped: nothing user-supplied is
ever rendered as markup), with inline CSS and inline SVG charts: no script, no external
asset, so the pages work offline; the Content-Security-Policy forbids scripts outright.
Rendering, security headers and the browser session live in webpage.py.

Access is the API's, through the same `HubState.authorize`: a bearer header, or the token
a login stored in an HttpOnly, SameSite=Strict cookie (sent as if it were the header, so
scopes, namespaces, expiry, revocation and the failure back-off all apply unchanged).
Without a valid token a hub that is not `--public-read` shows only the login form; a
token limited to a namespace sees only that namespace's adapters. The cookie is honoured
by these pages only, never by the API, so no API route can be driven cross-site.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from deltahub import artifact as af
from deltahub import plots
from deltahub.errors import InvalidRef, NotFound
from deltahub.hub.state import HubState, hub_state
from deltahub.hub.webpage import (
    authorize,
    login,
    login_form,
    logout,
    page,
    query_text,
    render,
)
from deltahub.registry.refs import check_name, parse_ref

MAX_TEXT_BYTES = 256 << 10  # config / card shown on a page
MAX_LISTED = 500
MAX_SCANNED = 20000  # versions scanned for children (a fusion or merge pinning this one)


# ----------------------------------------------------------------------------- reading


def _blob_text(hub: HubState, v: Any, fname: str) -> str | None:
    digest = v.files.get(fname)
    if digest is None:
        return None
    data = hub.store.read_bytes(digest)
    text = data[:MAX_TEXT_BYTES].decode("utf-8", "replace")
    return text + ("\n… (truncated)" if len(data) > MAX_TEXT_BYTES else "")


def _manifest(hub: HubState, v: Any) -> af.Manifest:
    return af.Manifest.from_dict(json.loads(hub.store.read_bytes(v.files[af.MANIFEST_FILE])))


def _ref_name(ref: str) -> str | None:
    try:
        return parse_ref(ref).full_name
    except InvalidRef:
        return None


# ----------------------------------------------------------------------------- pages


def index(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


@page
def adapters(request: Request) -> Response:
    hub = hub_state(request)
    info = authorize(request)
    q = request.query_params
    f = {k: query_text(q.get(k), k) for k in ("q", "method", "base_model", "task", "tag", "namespace")}
    reg = hub.registry_for_thread()
    found = (
        reg.search(f["q"], limit=MAX_LISTED)
        if f["q"]
        else reg.list(base_model=f["base_model"], method=f["method"], task=f["task"])
    )
    visible = [v for v in found if info is None or info.covers(v.full_name)]
    options = {  # the filters' choices: what the visible adapters have
        "method": sorted({v.method for v in visible}),
        "base_model": sorted({v.base_model for v in visible if v.base_model}),
        "task": sorted({v.task for v in visible if v.task}),
        "namespace": sorted({v.namespace or "" for v in visible}),
    }
    shown = [
        v
        for v in visible
        if (
            not f["q"] or all(f[k] is None or getattr(v, k) == f[k] for k in ("method", "base_model", "task"))
        )
        and (f["namespace"] is None or (v.namespace or "") == f["namespace"])
    ][:MAX_LISTED]
    if f["tag"] is not None:  # a tag on any version of the adapter, not only its latest
        shown = [v for v in shown if f["tag"] in v.tags or _tagged(reg, v.full_name, f["tag"])]
    namespaces: dict[str, int] = {}
    for v in visible:
        namespaces[v.namespace or ""] = namespaces.get(v.namespace or "", 0) + 1
    return render(
        request, "index.html", adapters=shown, filters=f, options=options, namespaces=namespaces,
        total=len(visible),
    )  # fmt: skip


def _tagged(reg: Any, name: str, tag: str) -> bool:
    try:
        reg.resolve(f"{name}@{tag}")
        return True
    except (NotFound, InvalidRef):
        return False


def _metric_chart(versions: list[Any], metric: str | None) -> tuple[Any, Any]:
    series = plots.metric_series(versions, metric)
    if not series.values:
        return series, None
    return series, plots.svg_line(series.versions, series.values)


@page
def adapter(request: Request) -> Response:
    hub = hub_state(request)
    name = request.path_params["name"]
    check_name(name)
    authorize(request, name)
    versions = hub.registry_for_thread().versions(name)
    if not versions:
        raise NotFound(f"no adapter named {name!r} on this hub")
    latest = next((v for v in versions if "latest" in v.tags), versions[-1])
    series, chart = _metric_chart(versions, query_text(request.query_params.get("metric"), "metric"))
    tags = sorted((t, v.version) for v in versions for t in v.tags)
    return render(
        request, "adapter.html", name=name, versions=versions, latest=latest, tags=tags, series=series,
        chart=chart, card=_blob_text(hub, latest, af.README_FILE),
    )  # fmt: skip


def _resolve(request: Request) -> tuple[HubState, Any, Any]:
    hub = hub_state(request)
    name = request.path_params["name"]
    check_name(name)
    info = authorize(request, name)
    selector = request.path_params["selector"]
    return hub, info, hub.registry_for_thread().resolve(f"{name}@{selector}")


def _children(hub: HubState, info: Any, v: Any) -> list[Any]:
    """Versions that pin `v` (by its digest) as a parent, visible to this token."""
    out = []
    for i, other in enumerate(hub.registry_for_thread().every_version()):
        if i >= MAX_SCANNED:
            break
        if any(v.digest.startswith(p.get("digest", "-")) for p in other.parents) and (
            info is None or info.covers(other.full_name)
        ):
            out.append(other)
    return out


@page
def version(request: Request) -> Response:
    hub, info, v = _resolve(request)
    manifest = _manifest(hub, v)
    config_text = _blob_text(hub, v, af.CONFIG_FILE)
    try:
        config = json.dumps(json.loads(config_text or "{}"), indent=2, sort_keys=True)
    except ValueError:
        config = config_text
    parents = [dict(p, name=_ref_name(p.get("ref", ""))) for p in v.parents]
    pinned = f"{v.full_name}@{v.digest}"
    hub_url = str(request.base_url).rstrip("/")
    peft = "peft_type" in config_text if config_text else False
    return render(
        request, "version.html", v=v, manifest=manifest, config=config, parents=parents,
        children=_children(hub, info, v), pinned=pinned, hub_url=hub_url, peft=peft,
        fusion=manifest.extra.get("fusion") if v.method == "fusion" else None,
        card=_blob_text(hub, v, af.README_FILE),
    )  # fmt: skip


@page
def fusion(request: Request) -> Response:
    hub, _, v = _resolve(request)
    manifest = _manifest(hub, v)
    data = manifest.extra.get("fusion")
    if v.method != "fusion" or not isinstance(data, dict):
        raise NotFound(f"{v.ref} is not a fusion (method {v.method})")
    matrix = plots.attention_matrix(data)
    constituents = [
        dict(c, full=_ref_name(str(c.get("ref", ""))))
        for c in data.get("constituents", [])
        if isinstance(c, dict)
    ]
    return render(
        request, "fusion.html", v=v, matrix=matrix, heat=plots.svg_heatmap(matrix) if matrix.sites else None,
        constituents=constituents, overall=data.get("attention") or {}, on=data.get("attention_on", "eval"),
    )  # fmt: skip


def _diff(hub: HubState, a: Any, b: Any) -> Any:
    from deltahub.diffing import diff  # torch: only when a diff is asked for

    with hub.store.local_files(a.files) as fa, hub.store.local_files(b.files) as fb:
        return diff(af.load_files(fa), af.load_files(fb))


@page
def diff_page(request: Request) -> Response:
    hub = hub_state(request)
    q = request.query_params
    ref_a, ref_b = query_text(q.get("a"), "a"), query_text(q.get("b"), "b")
    if not ref_a or not ref_b:
        return render(request, "diff.html", report=None, a=ref_a or "", b=ref_b or "")
    sides = []
    for ref in (ref_a, ref_b):
        parsed = parse_ref(ref)
        authorize(request, parsed.full_name)
        sides.append(hub.registry_for_thread().resolve(parsed))
    report = _diff(hub, *sides)
    series = plots.diff_series(report)
    return render(
        request, "diff.html", report=report, a=ref_a, b=ref_b, va=sides[0], vb=sides[1],
        rel=plots.svg_bars(series.modules, series.relative_change),
        sim=plots.svg_bars(series.modules, series.subspace_similarity, vmax=1.0), series=series,
    )  # fmt: skip


def routes() -> list[BaseRoute]:
    return [
        Route("/", index, methods=["GET"]),
        Route("/ui/", adapters, methods=["GET"]),
        Route("/ui/login", login_form, methods=["GET"]),
        Route("/ui/login", login, methods=["POST"]),
        Route("/ui/logout", logout, methods=["POST"]),
        Route("/ui/diff", diff_page, methods=["GET"]),
        Route("/ui/a/{name:path}/v/{selector}/fusion", fusion, methods=["GET"]),
        Route("/ui/a/{name:path}/v/{selector}", version, methods=["GET"]),
        Route("/ui/a/{name:path}", adapter, methods=["GET"]),
    ]
