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

Access is the API's, through the same `HubState.authorize`: a bearer header, or the token
a login stored in an HttpOnly, SameSite=Strict cookie (sent as if it were the header, so
scopes, namespaces, expiry, revocation and the failure back-off all apply unchanged).
Without a valid token a hub that is not `--public-read` shows only the login form; a
token limited to a namespace sees only that namespace's adapters. The cookie is honoured
by these pages only, never by the API, so no API route can be driven cross-site.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from deltahub import artifact as af
from deltahub import plots
from deltahub.errors import AuthError, DeltahubError, InvalidConfig, InvalidRef, NotFound
from deltahub.hub.auth import bearer_token
from deltahub.hub.responses import Forbidden, TooManyFailures, log
from deltahub.hub.state import HubState, hub_state
from deltahub.registry.refs import check_name, parse_ref

COOKIE = "deltahub_token"
MAX_FORM_BYTES = 4096
MAX_QUERY_CHARS = 256
MAX_TEXT_BYTES = 256 << 10  # config / card shown on a page
MAX_LISTED = 500
MAX_SCANNED = 20000  # versions scanned for children (a fusion or merge pinning this one)
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make a form post's Origin "null"
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

_env = Environment(
    loader=PackageLoader("deltahub.hub", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["q"] = lambda s: quote(str(s), safe="/@:")
_env.filters["short"] = lambda d: str(d)[:19]
_env.filters["num"] = lambda x, fmt=".4g": "-" if x is None else format(x, fmt)


def page_url(full_name: str, selector: str | None = None, suffix: str = "") -> str:
    """The path of an adapter's page, or of one version's (`selector`: version, tag, digest)."""
    url = "/ui/a/" + quote(full_name, safe="/")
    if selector is not None:
        url += "/v/" + quote(selector, safe=":")
    return url + suffix


_env.globals["page_url"] = page_url


# ----------------------------------------------------------------------------- access


def _with_cookie(request: Request) -> Request:
    """The request as the API would see it: the session cookie's token as a bearer header."""
    token = request.cookies.get(COOKIE)
    if bearer_token(request) is not None or not token:
        return request
    scope = dict(request.scope)
    headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
    scope["headers"] = [*headers, (b"authorization", b"Bearer " + token.encode("latin-1", "replace"))]
    return Request(scope)


def _authorize(request: Request, name: str | None = None) -> Any:
    return hub_state(request).authorize(_with_cookie(request), "read", name)


def _session(request: Request) -> dict[str, Any]:
    """Who is browsing (for the header line): scope and namespace, or nobody."""
    hub = hub_state(request)
    if bearer_token(_with_cookie(request)) is None:
        return {"signed_in": False, "public": hub.public_read}
    try:
        info = hub.authenticate(_with_cookie(request))
    except AuthError:
        return {"signed_in": False, "public": hub.public_read}
    return {"signed_in": True, "scope": info.scope, "namespace": info.namespace, "public": hub.public_read}


def _render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("session", _session(request))
    html = _env.get_template(template).render(request_path=request.url.path, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def _page(fn: Callable[[Request], Response]) -> Callable[[Request], Any]:
    """A page handler: run in a worker thread; errors become pages, not JSON."""

    async def handler(request: Request) -> Response:
        try:
            return await run_in_threadpool(fn, request)
        except TooManyFailures as e:
            page: tuple[Any, ...] = ("error.html", 429, {"title": "Too many attempts", "message": str(e)})
        except Forbidden as e:
            page = ("error.html", 403, {"title": "Not allowed", "message": str(e)})
        except AuthError:
            page = ("login.html", 401, {"next": _local(request.url.path), "error": None, "session": {}})
        except NotFound as e:
            page = ("error.html", 404, {"title": "Not found", "message": _scrub(request, e)})
        except DeltahubError as e:
            page = ("error.html", 400, {"title": "Cannot show that", "message": _scrub(request, e)})
        template, status, context = page
        # in a worker thread too: the header line looks the token up
        response = await run_in_threadpool(lambda: _render(request, template, status, **context))
        if status == 401 and COOKIE in request.cookies:  # revoked or expired: forget it
            response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    return handler


def _scrub(request: Request, exc: Exception) -> str:
    message = str(exc)
    for path in hub_state(request).hidden_paths:
        if path:
            message = message.replace(f" in {path}", " on this hub").replace(path, "<hub>")
    return message


def _local(path: str | None) -> str:
    """A redirect target that stays on these pages (never another site)."""
    if not path or not path.startswith("/ui/") or path.startswith("//") or "\\" in path:
        return "/ui/"
    return path


def _text(value: str | None, key: str) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > MAX_QUERY_CHARS or _CONTROL_RE.search(value):
        raise InvalidConfig(f"{key} must be at most {MAX_QUERY_CHARS} printable characters")
    return value


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


@_page
def adapters(request: Request) -> Response:
    hub = hub_state(request)
    info = _authorize(request)
    q = request.query_params
    f = {k: _text(q.get(k), k) for k in ("q", "method", "base_model", "task", "tag", "namespace")}
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
    return _render(
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


@_page
def adapter(request: Request) -> Response:
    hub = hub_state(request)
    name = request.path_params["name"]
    check_name(name)
    _authorize(request, name)
    versions = hub.registry_for_thread().versions(name)
    if not versions:
        raise NotFound(f"no adapter named {name!r} on this hub")
    latest = next((v for v in versions if "latest" in v.tags), versions[-1])
    series, chart = _metric_chart(versions, _text(request.query_params.get("metric"), "metric"))
    tags = sorted((t, v.version) for v in versions for t in v.tags)
    return _render(
        request, "adapter.html", name=name, versions=versions, latest=latest, tags=tags, series=series,
        chart=chart, card=_blob_text(hub, latest, af.README_FILE),
    )  # fmt: skip


def _resolve(request: Request) -> tuple[HubState, Any, Any]:
    hub = hub_state(request)
    name = request.path_params["name"]
    check_name(name)
    info = _authorize(request, name)
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


@_page
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
    return _render(
        request, "version.html", v=v, manifest=manifest, config=config, parents=parents,
        children=_children(hub, info, v), pinned=pinned, hub_url=hub_url, peft=peft,
        fusion=manifest.extra.get("fusion") if v.method == "fusion" else None,
        card=_blob_text(hub, v, af.README_FILE),
    )  # fmt: skip


@_page
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
    return _render(
        request, "fusion.html", v=v, matrix=matrix, heat=plots.svg_heatmap(matrix) if matrix.sites else None,
        constituents=constituents, overall=data.get("attention") or {}, on=data.get("attention_on", "eval"),
    )  # fmt: skip


def _diff(hub: HubState, a: Any, b: Any) -> Any:
    from deltahub.diffing import diff  # torch: only when a diff is asked for

    with hub.store.local_files(a.files) as fa, hub.store.local_files(b.files) as fb:
        return diff(af.load_files(fa), af.load_files(fb))


@_page
def diff_page(request: Request) -> Response:
    hub = hub_state(request)
    q = request.query_params
    ref_a, ref_b = _text(q.get("a"), "a"), _text(q.get("b"), "b")
    if not ref_a or not ref_b:
        return _render(request, "diff.html", report=None, a=ref_a or "", b=ref_b or "")
    sides = []
    for ref in (ref_a, ref_b):
        parsed = parse_ref(ref)
        _authorize(request, parsed.full_name)
        sides.append(hub.registry_for_thread().resolve(parsed))
    report = _diff(hub, *sides)
    series = plots.diff_series(report)
    return _render(
        request, "diff.html", report=report, a=ref_a, b=ref_b, va=sides[0], vb=sides[1],
        rel=plots.svg_bars(series.modules, series.relative_change),
        sim=plots.svg_bars(series.modules, series.subspace_similarity, vmax=1.0), series=series,
    )  # fmt: skip


# ----------------------------------------------------------------------------- session


async def login_form(request: Request) -> Response:
    return _render(
        request, "login.html", next=_local(request.query_params.get("next")), error=None, session={}
    )


def _same_origin(request: Request) -> bool:
    """A form post from these pages (a browser sends Origin on POST; refuse another site's)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


async def _form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidConfig("form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    return {k: v[0] for k, v in fields.items()}


async def login(request: Request) -> Response:
    if not _same_origin(request):
        return _render(request, "error.html", 403, title="Not allowed", message="cross-site login refused")
    try:
        form = await _form(request)
    except InvalidConfig as e:
        return _render(request, "error.html", 400, title="Bad form", message=str(e))
    token, target = form.get("token", "").strip(), _local(form.get("next"))
    hub = hub_state(request)
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in (b"authorization", b"cookie")]
    scope["headers"].append((b"authorization", b"Bearer " + token.encode("utf-8", "replace")))
    try:
        await run_in_threadpool(hub.authenticate, Request(scope))
    except AuthError as e:
        status = 429 if isinstance(e, TooManyFailures) else 401
        message = str(e) if isinstance(e, TooManyFailures) else "that token is not valid on this hub"
        return _render(request, "login.html", status, next=target, error=message, session={})
    log.info("browser session started from %s", request.client.host if request.client else "?")
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/ui"
    )
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/ui/login", status_code=303, headers=SECURITY_HEADERS)
    if _same_origin(request):
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


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


def diff_url(a: str, b: str) -> str:
    return "/ui/diff?" + urlencode({"a": a, "b": b})


_env.globals["diff_url"] = diff_url
