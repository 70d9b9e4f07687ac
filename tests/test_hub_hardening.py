"""Issue 14, the hub's side: hostile requests, stored data and hubs, each refused cleanly.

Every test of a hub runs on both back-ends (tests/hub_helpers.py `BACKENDS`: the embedded
home, and PostgreSQL + S3); the few that stay embedded-only say why. Every server runs on
127.0.0.1, started by the test and stopped through its handle; every loop is bounded in
count and in time.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from deltahub import artifact as af
from deltahub.errors import IntegrityError, NotFound
from deltahub.hub.auth import FAILURE_BURST, AuthThrottle
from deltahub.hub.client import BadResponse, HubClient, pull, push
from deltahub.hub.responses import TooManyFailures
from deltahub.hub.server import ServerThread
from deltahub.registry import Registry
from tests.hub_helpers import (
    BACKENDS,
    Hub,
    backend_stores,
    published,
    running_hub,
    serve_app,
    start_hub,
    token_store,
)


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    backend, _, redirect = request.param.partition(", ")
    yield from start_hub(tmp_path, backend, **({"redirect_downloads": True} if redirect else {}))


# S3 downloads that redirect to a presigned URL: the hub must check the blob before it redirects.
WITH_REDIRECT = [*BACKENDS, "postgres+s3, redirect"]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _pushed(hub: Hub, tmp_path: Path, name: str = "team/alpha") -> Registry:
    local = published(tmp_path / "local", name)
    push(name, HubClient(hub.url, hub.tokens["admin"]), local)
    return local


def _put(url: str, token: str, name: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.put(f"{url}/v1/adapters/{name}/blobs/{digest}", content=data, headers=_auth(token), timeout=30)
    assert r.status_code in (200, 201), r.text
    return digest


# ----------------------------------------------------------------------------- item 2


def test_a_manifest_with_nan_is_refused_before_commit_and_leaves_no_version(hub: Hub, tmp_path: Path) -> None:
    local = published(tmp_path / "local")
    v = local.resolve("team/alpha")
    manifest = json.loads(local.store.path(v.files[af.MANIFEST_FILE]).read_bytes())
    files = dict(v.files)
    for d in files.values():
        _put(hub.url, hub.tokens["write"], "team/alpha", local.store.path(d).read_bytes())
    manifest["metrics"] = {"acc": float("nan")}
    files[af.MANIFEST_FILE] = _put(hub.url, hub.tokens["write"], "team/alpha", json.dumps(manifest).encode())
    r = httpx.post(
        f"{hub.url}/v1/adapters/team/alpha/versions",
        json={"files": files},
        headers=_auth(hub.tokens["write"]),
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid-artifact", r.text
    reader = HubClient(hub.url, hub.tokens["read"])
    with pytest.raises(NotFound):
        reader.resolve("team/alpha")  # nothing was committed
    assert reader.list() == []


def test_readers_never_get_a_500_from_stored_non_finite_numbers(hub: Hub, tmp_path: Path) -> None:
    _pushed(hub, tmp_path)
    # A row written before validation refused NaN (an older hub, a local publish, a copy).
    hub.sql("""update versions set metrics = '{"acc": NaN, "f1": Infinity}'""")
    h = _auth(hub.tokens["read"])
    for path in (
        "/v1/adapters",
        "/v1/adapters?q=alpha",
        "/v1/adapters/team/alpha/versions",
        "/v1/resolve/team/alpha",
    ):
        r = httpx.get(hub.url + path, headers=h, timeout=30)
        assert r.status_code == 200, (path, r.text)
        assert "NaN" not in r.text and "Infinity" not in r.text  # strict JSON
        data = r.json()
        row = data[0] if isinstance(data, list) else data
        assert row["metrics"] == {"acc": None, "f1": None}


# ----------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("hub", WITH_REDIRECT, indirect=True)
def test_a_tampered_or_truncated_blob_is_never_served(hub: Hub, tmp_path: Path) -> None:
    local = _pushed(hub, tmp_path)
    weights = local.resolve("team/alpha").files["adapter_model.safetensors"]
    h = _auth(hub.tokens["read"])
    ok = httpx.get(f"{hub.url}/v1/blobs/{weights}", headers=h, timeout=30, follow_redirects=True)
    assert ok.status_code == 200 and ok.content == hub.raw_blob(weights)  # verified once, then cached

    data = bytearray(hub.raw_blob(weights))
    data[len(data) // 2] ^= 0xFF
    hub.overwrite_blob(weights, bytes(data))  # same size; a file write moves ctime even if mtime were reset
    with pytest.raises(IntegrityError, match="corrupt"):  # the client's own check, whatever the server does
        pull("team/alpha", HubClient(hub.url, hub.tokens["read"]), Registry(tmp_path / "a"))
    urls = [
        ("GET", f"/v1/blobs/{weights}"),
        ("HEAD", f"/v1/blobs/{weights}"),
        ("GET", "/team/alpha/resolve/main/adapter_model.safetensors"),
        ("HEAD", "/team/alpha/resolve/main/adapter_model.safetensors"),
    ]
    for method, path in urls:
        r = httpx.request(method, hub.url + path, headers=h, timeout=30)
        assert r.status_code == 500, (method, path, r.status_code)
        if method == "GET":
            assert r.json()["error"] == "corrupt-blob" and str(hub.home) not in r.text

    hub.overwrite_blob(weights, bytes(data[:100]))  # truncated
    assert httpx.get(f"{hub.url}/v1/blobs/{weights}", headers=h, timeout=30).status_code == 500
    with pytest.raises(IntegrityError, match="corrupt"):
        pull("team/alpha", HubClient(hub.url, hub.tokens["read"]), Registry(tmp_path / "b"))


@pytest.mark.parametrize("hub", ["postgres+s3"], indirect=True)  # S3 only: a local blob is hashed on read
def test_an_s3_blob_swapped_after_its_check_is_not_streamed(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltahub.hub import blobfacts

    local = _pushed(hub, tmp_path)
    weights = local.resolve("team/alpha").files["adapter_model.safetensors"]
    data = bytearray(hub.raw_blob(weights))
    data[len(data) // 2] ^= 0xFF
    checked = blobfacts.facts_for

    def check_then_swap(*args: Any, **kw: Any) -> Any:
        facts = checked(*args, **kw)  # the object passes its check ...
        hub.overwrite_blob(weights, bytes(data))  # ... and is replaced before it streams
        return facts

    monkeypatch.setattr(blobfacts, "facts_for", check_then_swap)
    r = httpx.get(f"{hub.url}/v1/blobs/{weights}", headers=_auth(hub.tokens["read"]), timeout=30)
    assert r.status_code == 500 and r.json()["error"] == "corrupt-blob", (r.status_code, r.text[:200])


@pytest.mark.parametrize("hub", WITH_REDIRECT, indirect=True)
def test_huggingface_hub_refuses_a_tampered_blob(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hfc
    import huggingface_hub.utils._http as hf_http
    from huggingface_hub import hf_hub_download

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)  # conftest's offline mode; 127.0.0.1 only
    monkeypatch.setattr(hf_http, "time", SimpleNamespace(sleep=lambda s: None))  # its 5xx retries
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    local = _pushed(hub, tmp_path)
    weights = local.resolve("team/alpha").files["adapter_model.safetensors"]
    data = hub.raw_blob(weights)
    hub.overwrite_blob(weights, data[:-1] + bytes([data[-1] ^ 0xFF]))
    kw: dict[str, Any] = {"endpoint": hub.url, "token": hub.tokens["read"], "cache_dir": tmp_path / "hf"}
    assert Path(hf_hub_download("team/alpha", "adapter_config.json", **kw)).is_file()  # the route works
    with pytest.raises(Exception):  # noqa: B017 - whichever error huggingface_hub raises for a 500
        hf_hub_download("team/alpha", "adapter_model.safetensors", **kw)
    assert not list((tmp_path / "hf").rglob("adapter_model.safetensors"))


# ----------------------------------------------------------------------------- items 7, 8


def test_blobs_are_scoped_per_namespace(hub: Hub, tmp_path: Path) -> None:
    local = _pushed(hub, tmp_path)
    v = local.resolve("team/alpha")
    weights = v.files["adapter_model.safetensors"]
    store = hub.token_store()
    team_reader = store.create("read", namespace="team")[0]
    other_reader = store.create("read", namespace="other")[0]
    store.close()

    for token, want in ((team_reader, 200), (hub.tokens["read"], 200), (other_reader, 404)):
        for method in ("HEAD", "GET"):
            r = httpx.request(method, f"{hub.url}/v1/blobs/{weights}", headers=_auth(token), timeout=30)
            assert r.status_code == want, (method, want, r.status_code)
    absent = "sha256:" + "0" * 64
    r = httpx.get(f"{hub.url}/v1/blobs/{absent}", headers=_auth(other_reader), timeout=30)
    assert r.status_code == 404  # an unlinked blob answers exactly as an absent one

    # A writer cannot commit another namespace's blobs without uploading them itself.
    writer = _auth(hub.tokens["write_other"])
    r = httpx.post(
        f"{hub.url}/v1/adapters/other/copy/versions", json={"files": v.files}, headers=writer, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"] == "missing-blobs"
    assert len(r.json()["missing"]) == len(v.files)
    # Uploading the bytes proves possession and links the blob to the namespace.
    _put(hub.url, hub.tokens["write_other"], "other/copy", local.store.path(weights).read_bytes())
    assert (
        httpx.head(f"{hub.url}/v1/blobs/{weights}", headers=_auth(other_reader), timeout=30).status_code
        == 200
    )


def test_cache_control_is_private_unless_the_hub_is_public_read(hub: Hub, tmp_path: Path) -> None:
    local = _pushed(hub, tmp_path)
    weights = local.resolve("team/alpha").files["adapter_model.safetensors"]
    # the same stores behind a second server that is public-read
    with hub.another_server(public_read=True) as public:
        for url, want in ((hub.url, "private"), (public.url, "public")):
            for path in (f"/v1/blobs/{weights}", "/team/alpha/resolve/main/adapter_model.safetensors"):
                r = httpx.get(url + path, headers=_auth(hub.tokens["read"]), timeout=30)
                assert r.status_code == 200
                assert r.headers["Cache-Control"].split(",")[0] == want, (url, path)


# ----------------------------------------------------------------------------- items 13, 14


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the peer closes `sock` within `seconds` (whatever it sends first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


@pytest.mark.parametrize("backend", BACKENDS)
def test_idle_and_half_header_connections_are_closed(tmp_path: Path, backend: str) -> None:
    with running_hub(tmp_path, backend, header_timeout=1.0, timeout_keep_alive=1) as hub:
        srv = hub.server
        config = srv.config
        assert config.limit_concurrency and config.timeout_keep_alive == 1
        assert config.h11_max_incomplete_event_size
        socks = []
        for i in range(40):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            if i % 2:
                s.sendall(b"GET /v1/adapters HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finishes
            socks.append(s)
        try:
            closed = [_closed_within(s, 8.0) for s in socks]
            assert all(closed), f"{closed.count(False)} of {len(socks)} connections still open"
        finally:
            for s in socks:
                s.close()
        # A kept-alive connection that sends a second request's half header is closed too.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 404")
            s.sendall(b"GET /v1/nothing HTTP/1.1\r\nHo")
            assert _closed_within(s, 8.0)
        # Headers over the limit: refused and closed.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (64 << 10) + b"\r\n\r\n")
            assert _closed_within(s, 8.0)


def test_default_limits_are_set(tmp_path: Path) -> None:
    # embedded only: uvicorn's settings, read back from the config; no store is involved
    from deltahub.hub import server

    with ServerThread(tmp_path / "srv") as srv:
        assert srv.config.limit_concurrency == server.LIMIT_CONCURRENCY
        assert srv.config.timeout_keep_alive == server.TIMEOUT_KEEP_ALIVE_S <= 10
        assert srv.config.h11_max_incomplete_event_size == server.MAX_HEADER_BYTES
        assert srv.config.http.header_timeout == server.HEADER_TIMEOUT_S <= 30


def test_an_unauthenticated_put_is_answered_before_its_body_is_read(hub: Hub) -> None:
    digest = "sha256:" + "ab" * 32
    head = (
        f"PUT /v1/adapters/team/alpha/blobs/{digest} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {5 << 30}\r\nContent-Type: application/octet-stream\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", hub.server.port), timeout=10) as s:
        s.sendall(head + b"\0" * (64 << 10))  # a first slice of the 5 GiB
        s.settimeout(10)
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
        assert b"connection: close" in answer.lower()
        assert _closed_within(s, 5.0)  # not kept open to drain 5 GiB


# ----------------------------------------------------------------------------- item 15


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_auth_backs_off_per_client(tmp_path: Path, backend: str) -> None:
    bad = _auth("dh_" + "x" * 43)
    statuses = []
    # The default burst; a slow refill (one per 20 s) so a slow machine cannot blur the count.
    throttle = AuthThrottle(per_second=0.05)
    with running_hub(tmp_path, backend, throttle=throttle) as hub, httpx.Client(timeout=30) as http:
        srv, tokens = hub.server, hub.tokens
        for _ in range(40):
            statuses.append(http.get(f"{srv.url}/v1/adapters", headers=bad).status_code)
        assert statuses == [401] * FAILURE_BURST + [429] * (40 - FAILURE_BURST), statuses
        r = http.get(f"{srv.url}/v1/adapters", headers=_auth(tokens["read"]))
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"] == "too-many-failures"
        # Another client address is not held back by this one's failures.
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30)
        with other:
            assert other.get(f"{srv.url}/v1/adapters", headers=_auth(tokens["read"])).status_code == 200


def test_auth_throttle_memory_is_bounded_and_it_refills() -> None:
    now = [0.0]
    t = AuthThrottle(burst=3, per_second=1.0, max_clients=100, clock=lambda: now[0])
    for i in range(10_000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t) == 100
    for _ in range(3):
        t.failed("a")
    with pytest.raises(TooManyFailures) as caught:
        t.check("a")
    assert "retry in" in str(caught.value)
    now[0] += 1.0
    t.check("a")  # one unit back after a second


# ----------------------------------------------------------------------------- items 16, 18


def test_no_paths_or_internals_reach_clients(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _auth(hub.tokens["read"])
    for path in ("/v1/resolve/team/nothing", "/v1/adapters/team/nothing/versions", "/v1/manifest/x@1"):
        r = httpx.get(hub.url + path, headers=h, timeout=30)
        assert r.status_code == 404 and r.json()["error"] == "not-found"
        assert str(tmp_path) not in r.text and str(hub.home) not in r.text, r.text

    def boom() -> None:
        raise RuntimeError(f"secret internals at {hub.stores.get('db') or hub.home / 'registry.db'}")

    monkeypatch.setattr(hub.server.app.state.hub, "registry_for_thread", boom)
    r = httpx.get(f"{hub.url}/v1/adapters", headers=h, timeout=30)
    assert r.status_code == 500 and r.json()["error"] == "internal"
    assert "secret" not in r.text and "RuntimeError" not in r.text and str(tmp_path) not in r.text
    assert "incident" in r.json()["message"]


@pytest.fixture(scope="module", params=BACKENDS)
def pushed_hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """One hub per back-end holding team/alpha@1, shared by the read-only tests below."""
    tmp_path = tmp_path_factory.mktemp("pushed")
    with running_hub(tmp_path, request.param) as hub:
        _pushed(hub, tmp_path)
        yield hub


@pytest.mark.parametrize(
    "path",
    [
        "/api/models/%E5%90%8D%E5%89%8D/%E6%A8%A1%E5%9E%8B/revision/main",
        "/api/models/team/%E6%A8%A1%E5%9E%8B/tree/main",
        "/%E5%90%8D%E5%89%8D/x/resolve/main/adapter_config.json",
        "/team/alpha/resolve/main/%E6%A8%A1%E5%9E%8B.json",
        "/v1/adapters?limit=%C2%B2",
        "/v1/adapters?limit=-1",
        "/v1/adapters?q=%00",
        "/v1/adapters?method=a%00b",
        "/v1/resolve/%E5%90%8D%E5%89%8D",
    ],
)
def test_odd_names_and_parameters_are_4xx_json(pushed_hub: Hub, path: str) -> None:
    hub = pushed_hub
    for method in ("GET", "HEAD"):
        if method == "HEAD" and "/resolve/main/" not in path:
            continue
        r = httpx.request(method, hub.url + path, headers=_auth(hub.tokens["read"]), timeout=30)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
        if method == "GET":
            assert set(r.json()) >= {"error", "message"}


# ----------------------------------------------------------------------------- item 19


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_revoke_matches_exactly_and_case_sensitively(tmp_path: Path, backend: str) -> None:
    store = token_store(tmp_path, backend_stores(backend))
    token, info = store.create("read")
    lookup = info.lookup
    flipped = lookup[:3] + lookup[3:].swapcase()
    wildcard = lookup[:5] + "_" + lookup[6:]
    for wrong in (flipped, wildcard, lookup[:6] + "%", lookup[:-1]):
        if wrong == lookup:
            continue
        with pytest.raises(NotFound):
            store.revoke(wrong)
    assert store.check(token).revoked is None  # none of those revoked it
    assert store.revoke(lookup + "…").id == info.id  # as `token list` prints it
    token2, info2 = store.create("read")
    assert store.revoke(token2).id == info2.id  # the whole token works too
    store.close()


# ----------------------------------------------------------------------------- item 20


def _fake_version(size: int) -> dict[str, Any]:
    files = {
        "adapter_config.json": "sha256:" + "1" * 64,
        "adapter_model.safetensors": "sha256:" + "2" * 64,
        "deltahub.json": "sha256:" + "3" * 64,
    }
    return {
        "full_name": "team/alpha",
        "version": "1",
        "ref": "team/alpha@1",
        "digest": af.artifact_digest(files),
        "files": files,
        "size": size,
        "method": "lora",
        "created": "2026-01-01T00:00:00Z",
    }


def _fake_hub(resolve_answer: Any, blob_bytes: int) -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def resolve(request: Any) -> Any:
        return JSONResponse(resolve_answer)

    async def blob(request: Any) -> Any:
        async def body() -> Any:
            chunk = b"\0" * (1 << 20)
            for _ in range(blob_bytes >> 20):  # bounded: at most blob_bytes
                yield chunk

        return StreamingResponse(body(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/v1/resolve/{ref:path}", resolve), Route("/v1/blobs/{digest}", blob)])


def test_pull_stops_at_the_declared_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub.hub import client as client_mod

    written = [0]
    real_read = client_mod._ResponseReader.read

    def counting_read(self: Any, n: int = -1) -> bytes:
        chunk = real_read(self, n)
        written[0] += len(chunk)
        return chunk

    monkeypatch.setattr(client_mod._ResponseReader, "read", counting_read)
    reg = Registry(tmp_path / "b")
    with (
        serve_app(_fake_hub(_fake_version(8192), 16 << 20)) as url,
        pytest.raises(IntegrityError, match="more than the 8192 bytes"),
    ):
        pull("team/alpha", HubClient(url), reg)
    assert written[0] <= 8192  # never more than declared reached the store
    assert list(reg.store.tmp.iterdir()) == [] and list(reg.store.digests()) == []


@pytest.mark.parametrize(
    "answer",
    [
        {k: v for k, v in _fake_version(10).items() if k != "digest"},
        {**_fake_version(10), "digest": 7},
        {**_fake_version(10), "files": ["a"]},
        {**_fake_version(10), "size": "big"},
        {**_fake_version(10), "size": -1},
        [1, 2, 3],
        "not an object",
    ],
)
def test_every_hub_answer_is_validated(tmp_path: Path, answer: Any) -> None:
    with serve_app(_fake_hub(answer, 0)) as url:
        with pytest.raises(BadResponse):
            pull("team/alpha", HubClient(url), Registry(tmp_path / "b"))
        with pytest.raises(BadResponse):
            HubClient(url).resolve("team/alpha")


def test_names_that_moved_out_of_server_still_import_with_a_warning() -> None:
    from deltahub.hub import responses, server

    with pytest.warns(DeprecationWarning, match="deltahub.hub.responses.error_response"):
        assert server.error_response is responses.error_response
    assert server.ServerThread and server.check_bind and server.is_loopback  # its own names: no warning


def test_a_full_disk_is_a_507_without_paths(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltahub.errors import StorageFull

    state = hub.server.app.state.hub

    def full(*args: Any, **kw: Any) -> Any:
        raise StorageFull(
            f"no space left on the disk of {state.home}: free some (`deltahub gc`) and try again"
        )

    monkeypatch.setattr(state.store, "put_stream", full)
    data = b"some bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    r = httpx.put(
        f"{hub.url}/v1/adapters/team/alpha/blobs/{digest}",
        content=data,
        headers=_auth(hub.tokens["write"]),
        timeout=30,
    )
    assert r.status_code == 507 and r.json()["error"] == "storage-full"
    assert "no space left" in r.json()["message"] and str(hub.home) not in r.text
