"""What every hub web page shares: templates, security headers, the browser session.

Templates (templates/) are Jinja2 with autoescaping on for every one of them: nothing
user-supplied is ever rendered as markup. Each page answers with a Content-Security-Policy
that allows no script and no external asset at all (inline CSS and SVG only).

The session: `POST /ui/login` checks a token exactly as the API does (`HubState.authenticate`,
through the failure back-off) and keeps it in an HttpOnly, SameSite=Strict cookie scoped to
/ui; `with_cookie` presents that cookie to `HubState.authorize` as a bearer header, so a
page applies the API's rules unchanged (scope, namespace, expiry, revocation). A bearer
header sent by the client wins over the cookie. Login and logout refuse cross-site posts
(Sec-Fetch-Site / Origin), so another site can neither sign a browser in nor out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from deltahub.errors import AuthError, DeltahubError, InvalidConfig, NotFound
from deltahub.hub.auth import bearer_token
from deltahub.hub.responses import Forbidden, TooManyFailures, log
from deltahub.hub.state import hub_state

COOKIE = "deltahub_token"
MAX_FORM_BYTES = 4096
MAX_QUERY_CHARS = 256
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


def with_cookie(request: Request) -> Request:
    """The request as the API would see it: the session cookie's token as a bearer header."""
    token = request.cookies.get(COOKIE)
    if bearer_token(request) is not None or not token:
        return request
    scope = dict(request.scope)
    headers = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
    scope["headers"] = [*headers, (b"authorization", b"Bearer " + token.encode("latin-1", "replace"))]
    return Request(scope)


def authorize(request: Request, name: str | None = None) -> Any:
    return hub_state(request).authorize(with_cookie(request), "read", name)


def session_of(request: Request) -> dict[str, Any]:
    """Who is browsing (for the header line): scope and namespace, or nobody."""
    hub = hub_state(request)
    if bearer_token(with_cookie(request)) is None:
        return {"signed_in": False, "public": hub.public_read}
    try:
        info = hub.authenticate(with_cookie(request))
    except AuthError:
        return {"signed_in": False, "public": hub.public_read}
    return {"signed_in": True, "scope": info.scope, "namespace": info.namespace, "public": hub.public_read}


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("session", session_of(request))
    html = _env.get_template(template).render(request_path=request.url.path, **context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def page(fn: Callable[[Request], Response]) -> Callable[[Request], Any]:
    """A page handler: run in a worker thread; errors become pages, not JSON."""

    async def handler(request: Request) -> Response:
        try:
            return await run_in_threadpool(fn, request)
        except TooManyFailures as e:
            answer: tuple[Any, ...] = ("error.html", 429, {"title": "Too many attempts", "message": str(e)})
        except Forbidden as e:
            answer = ("error.html", 403, {"title": "Not allowed", "message": str(e)})
        except AuthError:
            answer = ("login.html", 401, {"next": local(request.url.path), "error": None, "session": {}})
        except NotFound as e:
            answer = ("error.html", 404, {"title": "Not found", "message": scrub(request, e)})
        except DeltahubError as e:
            answer = ("error.html", 400, {"title": "Cannot show that", "message": scrub(request, e)})
        template, status, context = answer
        # in a worker thread too: the header line looks the token up
        response = await run_in_threadpool(lambda: render(request, template, status, **context))
        if status == 401 and COOKIE in request.cookies:  # revoked or expired: forget it
            response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    return handler


def scrub(request: Request, exc: Exception) -> str:
    message = str(exc)
    for path in hub_state(request).hidden_paths:
        if path:
            message = message.replace(f" in {path}", " on this hub").replace(path, "<hub>")
    return message


def local(path: str | None) -> str:
    """A redirect target that stays on these pages (never another site)."""
    if not path or not path.startswith("/ui/") or path.startswith("//") or "\\" in path:
        return "/ui/"
    return path


def query_text(value: str | None, key: str) -> str | None:
    if value is None or value == "":
        return None
    if len(value) > MAX_QUERY_CHARS or _CONTROL_RE.search(value):
        raise InvalidConfig(f"{key} must be at most {MAX_QUERY_CHARS} printable characters")
    return value


# ----------------------------------------------------------------------------- session


async def login_form(request: Request) -> Response:
    return render(request, "login.html", next=local(request.query_params.get("next")), error=None, session={})


def same_origin(request: Request) -> bool:
    """A form post from these pages (a browser sends Origin on POST; refuse another site's)."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.headers.get('host', '')}"


async def read_form(request: Request) -> dict[str, str]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidConfig("form too large")
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
    return {k: v[0] for k, v in fields.items()}


async def login(request: Request) -> Response:
    if not same_origin(request):
        return render(request, "error.html", 403, title="Not allowed", message="cross-site login refused")
    try:
        form = await read_form(request)
    except InvalidConfig as e:
        return render(request, "error.html", 400, title="Bad form", message=str(e))
    token, target = form.get("token", "").strip(), local(form.get("next"))
    hub = hub_state(request)
    scope = dict(request.scope)
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k not in (b"authorization", b"cookie")]
    scope["headers"].append((b"authorization", b"Bearer " + token.encode("utf-8", "replace")))
    try:
        await run_in_threadpool(hub.authenticate, Request(scope))
    except AuthError as e:
        status = 429 if isinstance(e, TooManyFailures) else 401
        message = str(e) if isinstance(e, TooManyFailures) else "that token is not valid on this hub"
        return render(request, "login.html", status, next=target, error=message, session={})
    log.info("browser session started from %s", request.client.host if request.client else "?")
    response = RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/ui"
    )
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/ui/login", status_code=303, headers=SECURITY_HEADERS)
    if same_origin(request):
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


def diff_url(a: str, b: str) -> str:
    return "/ui/diff?" + urlencode({"a": a, "b": b})


_env.globals["diff_url"] = diff_url
