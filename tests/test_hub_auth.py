"""The hub server's auth: every route x every kind of token, and what hub.db holds."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deltahub.errors import AuthError, Unsupported
from deltahub.hub.auth import AuthThrottle
from deltahub.hub.client import push
from deltahub.hub.server import ServerThread, check_bind, is_loopback
from deltahub.hub.tokens import TokenStore
from deltahub.registry import Registry
from tests.hub_helpers import BACKENDS, Hub, backend_stores, published, start_hub


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path, request.param)


KINDS = ("none", "read", "write", "write_other", "revoked", "expired")


def _routes(v_digest: str, files: dict[str, str]) -> list[tuple[str, str, str, dict]]:
    """(name, method, path, request kwargs) for every route, against team/alpha@1."""
    weights = files["adapter_model.safetensors"]
    return [
        ("list", "GET", "/v1/adapters", {}),
        ("search", "GET", "/v1/adapters?q=alpha", {}),
        ("versions", "GET", "/v1/adapters/team/alpha/versions", {}),
        ("resolve", "GET", "/v1/resolve/team/alpha@1", {}),
        ("manifest", "GET", "/v1/manifest/team/alpha@latest", {}),
        ("blob-head", "HEAD", f"/v1/blobs/{weights}", {}),
        ("blob-get", "GET", f"/v1/blobs/{weights}", {"headers": {"Range": "bytes=0-7"}}),
        ("hf-info", "GET", "/api/models/team/alpha/revision/main", {}),
        ("hf-tree", "GET", f"/api/models/team/alpha/tree/{v_digest[7:47]}", {}),
        ("hf-head", "HEAD", "/team/alpha/resolve/1/adapter_config.json", {}),
        ("hf-get", "GET", "/team/alpha/resolve/main/adapter_model.safetensors", {}),
        ("upload", "PUT", f"/v1/adapters/team/alpha/blobs/{weights}", {"path": weights}),
        ("commit", "POST", "/v1/adapters/team/alpha/versions", {"json": {"files": files}}),
        ("tag", "PUT", "/v1/adapters/team/alpha/tags/stable", {"json": {"ref": "1"}}),
    ]


WRITES = {"upload", "commit", "tag"}
BLOBS = {"blob-head", "blob-get"}
NAMED = {"versions", "resolve", "manifest", "hf-info", "hf-tree", "hf-head", "hf-get"}
OK = {"list": 200, "search": 200, "versions": 200, "resolve": 200, "manifest": 200, "blob-head": 200}
OK |= {"blob-get": 206, "hf-info": 200, "hf-tree": 200, "hf-head": 200, "hf-get": 200}
OK |= {"upload": 200, "commit": 200, "tag": 200}  # 200: all three already exist (idempotent)


def expected_status(route: str, kind: str, public_read: bool) -> int:
    """The documented status: 401 bad/no token, 403 scope or namespace, else success."""
    if route not in WRITES:
        if public_read:
            return OK[route]
        if kind in ("none", "revoked", "expired"):
            return 401
        if kind == "write_other" and route in NAMED:
            return 403  # a namespaced token reads only its namespace's adapters
        if kind == "write_other" and route in BLOBS:
            return 404  # ... and only blobs linked to its namespace: others look absent
        return OK[route]
    if kind in ("none", "revoked", "expired"):
        return 401
    if kind in ("read", "write_other"):
        return 403
    return OK[route]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("public_read", [False, True])
def test_auth_matrix(tmp_path: Path, public_read: bool, backend: str) -> None:
    from tests.hub_helpers import make_tokens

    home = tmp_path / "srv"
    stores = backend_stores(backend)
    if not stores:
        Registry(home).close()
    tokens = make_tokens(home, stores)
    local = published(tmp_path / "local")
    v = local.resolve("team/alpha")
    # The matrix sends dozens of bad tokens from one address: back-off is tested on its own.
    throttle = AuthThrottle(burst=10_000)
    with ServerThread(home, public_read=public_read, throttle=throttle, **stores) as srv:
        push("team/alpha", _client(srv.url, tokens["admin"]), local)
        seen: dict[tuple[str, str], int] = {}
        http = httpx.Client(timeout=30)
        for route, method, path, kw in _routes(v.digest, v.files):
            kw = dict(kw)
            content = local.store.path(kw.pop("path")).read_bytes() if "path" in kw else None
            for kind in KINDS:
                headers = dict(kw.get("headers", {}))
                if kind != "none":
                    headers["Authorization"] = f"Bearer {tokens[kind]}"
                r = http.request(
                    method, srv.url + path, headers=headers, json=kw.get("json"), content=content, timeout=30
                )
                seen[(route, kind)] = r.status_code
                if r.status_code >= 400 and method != "HEAD":
                    body = r.json()
                    assert set(body) >= {"error", "message"}, body
                    assert (
                        body["error"]
                        == {401: "unauthorized", 403: "forbidden", 404: "not-found"}[r.status_code]
                    )
                if r.status_code == 401:
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
        want = {
            (route, kind): expected_status(route, kind, public_read)
            for route, _, _, _ in _routes(v.digest, v.files)
            for kind in KINDS
        }
        wrong = {k: (seen[k], want[k]) for k in want if seen[k] != want[k]}
        assert not wrong, f"(route, token): (got, expected) {wrong}"


def _client(url: str, token: str):
    from deltahub.hub.client import HubClient

    return HubClient(url, token)


def test_admin_can_write_anywhere_and_namespace_token_only_its_own(hub: Hub, tmp_path: Path) -> None:
    local = published(tmp_path / "l1", "other/beta")
    with pytest.raises(AuthError, match="403"):
        push("other/beta", _client(hub.url, hub.tokens["write"]), local)
    assert push("other/beta", _client(hub.url, hub.tokens["write_other"]), local)["ref"] == "other/beta@1"
    published(tmp_path / "l1", "gamma")  # a bare name: only an un-namespaced token covers it
    with pytest.raises(AuthError):
        push("gamma", _client(hub.url, hub.tokens["write"]), local)
    assert push("gamma", _client(hub.url, hub.tokens["admin"]), local)["ref"] == "gamma@1"


def _dump(hub: Hub) -> tuple[str, list[tuple[str, str]]]:
    """The whole metadata database as text (sqlite's iterdump, or pg_dump), and its token rows."""
    if hub.backend == "embedded":
        conn = sqlite3.connect(hub.home / "hub.db")
        dump = "\n".join(conn.iterdump())
        rows = conn.execute("select lookup, hash from tokens").fetchall()
        conn.close()
        return dump, rows
    import subprocess

    import psycopg

    from tests.hub_services import pg_bindir

    url = hub.stores["db"]
    dump = subprocess.run(
        [f"{pg_bindir()}/pg_dump", "--data-only", url], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    with psycopg.connect(url) as conn:
        rows = conn.execute("select lookup, hash from tokens").fetchall()
    return dump, rows


def test_database_dump_holds_no_usable_token(hub: Hub) -> None:
    dump, rows = _dump(hub)
    assert len(rows) == 6
    for token in hub.tokens.values():
        secret = token[len("dh_") :]
        assert token not in dump and secret not in dump
        assert secret[12:] not in dump  # not even the unshown part
        raw = base64.urlsafe_b64decode(secret + "=")
        assert raw.hex() not in dump
        assert hashlib.sha256(token.encode()).hexdigest() in dump  # only the hash is stored
    # What the dump does hold cannot be presented as a token.
    http = httpx.Client()
    for lookup, digest in rows:
        for candidate in (lookup, digest, "dh_" + digest, lookup + digest):
            r = http.get(hub.url + "/v1/adapters", headers={"Authorization": f"Bearer {candidate}"})
            assert r.status_code == 401


def test_token_store_rules(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, info = store.create("read", expires_days=2)
    assert token.startswith("dh_") and len(token) > 40 and info.active
    assert store.check(token).scope == "read"
    with pytest.raises(AuthError, match="not valid"):
        store.check(token[:-1] + ("A" if token[-1] != "A" else "B"))
    with pytest.raises(AuthError):
        store.check(None)
    store.revoke(info.lookup)  # by the prefix `token list` shows
    with pytest.raises(AuthError, match="revoked"):
        store.check(token)
    assert [t.to_dict()["status"] for t in store.list()] == ["revoked"]
    from deltahub.errors import InvalidConfig

    with pytest.raises(InvalidConfig):
        store.create("superuser")
    with pytest.raises(InvalidConfig):
        store.create("write", namespace="../x")


def test_refuses_non_loopback_without_flag() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    with pytest.raises(Unsupported, match="reverse proxy"):
        check_bind("0.0.0.0", allow_insecure_http=False)
    check_bind("0.0.0.0", allow_insecure_http=True)
    check_bind("127.0.0.1", allow_insecure_http=False)


def test_every_failure_answers_json(hub: Hub) -> None:
    auth = {"Authorization": f"Bearer {hub.tokens['admin']}"}
    cases = [
        ("GET", "/v1/nothing-here", None, 404, "not-found"),
        ("GET", "/v1/resolve/team/missing", None, 404, "not-found"),
        ("GET", "/v1/resolve/bad name!", None, 400, "invalid-ref"),
        ("GET", "/v1/blobs/sha256:xyz", None, 400, "digest-mismatch"),
        ("POST", "/v1/adapters/team/alpha/versions", {"files": "nope"}, 400, "invalid-request"),
        ("DELETE", "/v1/adapters", None, 405, "method-not-allowed"),
    ]
    http = httpx.Client()
    for method, path, body, status, code in cases:
        r = http.request(method, hub.url + path, headers=auth, json=body)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"] == code and r.json()["message"], r.json()
