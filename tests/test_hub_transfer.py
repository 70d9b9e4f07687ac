"""push / pull against a real server on 127.0.0.1: identity, idempotence, integrity, concurrency."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from deltahub.errors import AlreadyExists, IntegrityError, NotFound, RemoteError
from deltahub.hub.client import HubClient, pull, push
from deltahub.hub.server import ServerThread
from deltahub.registry import Registry
from tests.hub_helpers import BACKENDS, Hub, export_bytes, lora_dir, published, start_hub


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path, request.param)


def _no_leftovers(reg: Registry) -> None:
    assert list(reg.store.tmp.iterdir()) == []


def test_push_then_pull_is_byte_identical_and_loads_the_same(hub: Hub, tmp_path: Path) -> None:
    from peft import PeftModel

    from tests.helpers import peft_lora_dir, tiny_llama

    a = Registry(tmp_path / "a")
    src = peft_lora_dir(tmp_path / "src", seed=3)
    a.publish(src, "team/alpha", tags=["stable"], task="demo", metrics={"acc": 0.5})
    writer = HubClient(hub.url, hub.tokens["write"])
    record = push("team/alpha@stable", writer, a, tags=["stable"])
    assert record["ref"] == "team/alpha@1" and set(record["tags"]) == {"latest", "stable"}

    b = Registry(tmp_path / "b")
    v = pull("team/alpha@stable", HubClient(hub.url, hub.tokens["read"]), b)
    assert v.digest == a.resolve("team/alpha").digest
    assert export_bytes(a, "team/alpha@1", tmp_path / "ea") == export_bytes(
        b, "team/alpha@1", tmp_path / "eb"
    )
    assert b.verify().ok and hub.verify().ok
    _no_leftovers(b)

    # Identical outputs: PEFT on the pulled export vs PEFT on the original directory.
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(), str(src)).eval()(ids).logits
        got = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "eb")).eval()(ids).logits
        base = tiny_llama()(ids).logits
    assert torch.equal(want, got)
    assert not torch.allclose(want, base, atol=1e-4)  # the adapter does change outputs


def test_push_uploads_only_missing_blobs_and_is_safe_to_retry(hub: Hub, tmp_path: Path) -> None:
    local = published(tmp_path / "local")
    client = HubClient(hub.url, hub.tokens["write"])
    sent: list[int] = []
    push("team/alpha", client, local, on_bytes=sent.append)
    v1 = local.resolve("team/alpha@1")
    assert sum(sent) == sum(local.store.path(d).stat().st_size for d in v1.files.values())

    sent.clear()
    again = push("team/alpha", client, local, on_bytes=sent.append)  # a retry after success
    assert sum(sent) == 0 and again["digest"] == v1.digest

    # v2 shares adapter_config.json with v1: only the new weights and manifest travel.
    local.publish(lora_dir(tmp_path / "src2", seed=9), "team/alpha")
    v2 = local.resolve("team/alpha@2")
    assert v2.files["adapter_config.json"] == v1.files["adapter_config.json"]
    push("team/alpha@2", client, local, on_bytes=sent.append)
    new = {d for f, d in v2.files.items() if f != "adapter_config.json"}
    assert sum(sent) == sum(local.store.path(d).stat().st_size for d in new)
    assert [x["version"] for x in client.versions("team/alpha")] == ["1", "2"]


def test_conflicting_version_is_409(hub: Hub, tmp_path: Path) -> None:
    client = HubClient(hub.url, hub.tokens["write"])
    push("team/alpha", client, published(tmp_path / "one", seed=1))
    with pytest.raises(AlreadyExists, match="already exists"):
        push("team/alpha", client, published(tmp_path / "two", seed=2))


def _put(hub: Hub, name: str, digest: str, data: bytes) -> httpx.Response:
    return httpx.put(
        f"{hub.url}/v1/adapters/{name}/blobs/{digest}",
        content=data,
        headers={"Authorization": f"Bearer {hub.tokens['write']}"},
    )


def _commit(hub: Hub, name: str, files: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{hub.url}/v1/adapters/{name}/versions",
        json={"files": files},
        headers={"Authorization": f"Bearer {hub.tokens['write']}"},
    )


def test_server_refuses_wrong_digest_missing_blobs_and_invalid_artifacts(hub: Hub, tmp_path: Path) -> None:
    local = published(tmp_path / "local")
    v = local.resolve("team/alpha")
    weights = v.files["adapter_model.safetensors"]
    data = local.store.path(weights).read_bytes()
    r = _put(hub, "team/alpha", weights, data[:-1] + bytes([data[-1] ^ 1]))
    assert r.status_code == 400 and r.json()["error"] == "digest-mismatch"
    assert not hub.has_blob(weights)
    assert hub.verify().leftovers == []

    r = _commit(hub, "team/alpha", v.files)
    assert r.status_code == 400 and r.json()["error"] == "missing-blobs"
    assert len(r.json()["missing"]) == len(v.files) == 4 and weights in r.json()["message"]  # card too

    for d in v.files.values():
        assert _put(hub, "team/alpha", d, local.store.path(d).read_bytes()).status_code == 201
    r = _commit(hub, "team/beta", v.files)  # the manifest names team/alpha
    assert r.status_code == 400 and r.json()["rule"] == "manifest-schema"

    # Validated like a local publish: a pickle posing as the weights is refused by rule.
    pickle_bytes = b"\x80\x04\x95" + b"\x00" * 32
    import hashlib

    bad = "sha256:" + hashlib.sha256(pickle_bytes).hexdigest()
    assert _put(hub, "team/alpha", bad, pickle_bytes).status_code == 201
    r = _commit(hub, "team/alpha", {**v.files, "adapter_model.safetensors": bad})
    assert r.status_code == 400 and r.json()["error"] == "invalid-artifact"
    assert r.json()["rule"] == "pickle-file"
    r = _commit(hub, "team/alpha", {**v.files, "evil.bin": bad})
    assert r.status_code == 400 and r.json()["rule"] == "unknown-file"

    r = _commit(hub, "team/alpha", v.files)
    assert r.status_code == 201 and r.json()["digest"] == v.digest
    assert _commit(hub, "team/alpha", v.files).status_code == 200  # the same again: idempotent
    assert hub.verify().ok


def test_client_refuses_a_blob_corrupted_on_the_server(hub: Hub, tmp_path: Path) -> None:
    local = published(tmp_path / "local")
    push("team/alpha", HubClient(hub.url, hub.tokens["write"]), local)
    weights = local.resolve("team/alpha").files["adapter_model.safetensors"]
    hub.corrupt_blob(weights)

    b = Registry(tmp_path / "b")
    with pytest.raises(IntegrityError, match="corrupt"):
        pull("team/alpha", HubClient(hub.url, hub.tokens["read"]), b)
    assert not b.store.has(weights)
    with pytest.raises(NotFound):
        b.resolve("team/alpha")
    _no_leftovers(b)
    assert b.verify().ok


class _Truncate:
    """ASGI middleware: blob bodies stop halfway, though Content-Length promised them whole."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/blobs/") or scope["method"] != "GET":
            return await self.app(scope, receive, send)
        sent = 0

        async def cut(message: dict) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if sent + len(body) > 100:
                    await send({"type": "http.response.body", "body": body[: 100 - sent], "more_body": True})
                    raise ConnectionAbortedError("cut the download short")
                sent += len(body)
            await send(message)

        await self.app(scope, receive, cut)


def test_truncated_download_leaves_nothing_visible(tmp_path: Path) -> None:
    from tests.hub_helpers import make_tokens

    home = tmp_path / "srv"
    Registry(home).close()
    tokens = make_tokens(home)
    local = published(tmp_path / "local")
    server = ServerThread(home)
    server.server.config.app = _Truncate(server.app)
    with server:
        push("team/alpha", HubClient(server.url, tokens["write"]), local)
        b = Registry(tmp_path / "b")
        with pytest.raises(RemoteError, match="download of sha256:"):
            pull("team/alpha", HubClient(server.url, tokens["read"]), b)
    with pytest.raises(NotFound):
        b.resolve("team/alpha")
    assert list(b.store.digests()) == []  # every blob is over 100 bytes: none arrived whole
    _no_leftovers(b)


def test_eight_concurrent_pulls_into_one_home(hub: Hub, tmp_path: Path) -> None:
    src = Registry(tmp_path / "src")
    names = ["team/alpha", "team/beta"]
    for i, name in enumerate(names):
        src.publish(lora_dir(tmp_path / f"d{i}", seed=i), name)
        push(name, HubClient(hub.url, hub.tokens["write"]), src)
    home = tmp_path / "shared"
    Registry(home).close()
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            reg = Registry(home)  # one registry (sqlite connection) per thread
            client = HubClient(hub.url, hub.tokens["read"])
            barrier.wait()
            for name in names[i % 2 :] + names[: i % 2]:
                pull(name, client, reg)
            reg.close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    reg = Registry(home)
    assert reg.verify().ok
    assert [v.ref for v in reg.list()] == ["team/alpha@1", "team/beta@1"]
    for name in names:
        assert export_bytes(reg, name, tmp_path / f"got-{name}") == export_bytes(
            src, name, tmp_path / f"want-{name}"
        )
    _no_leftovers(reg)
    assert len(list(reg.store.digests())) == len({d for n in names for d in src.resolve(n).files.values()})


def test_search_and_tag_on_the_server(hub: Hub, tmp_path: Path) -> None:
    local = published(tmp_path / "local", description="sentiment adapter")
    client = HubClient(hub.url, hub.tokens["write"])
    push("team/alpha", client, local)
    assert [d["full_name"] for d in client.search("sentiment")] == ["team/alpha"]
    assert client.search("nothing-like-this") == []
    assert "stable" in client.tag("team/alpha", "stable", "1")["tags"]
    assert client.resolve("team/alpha@stable")["version"] == "1"
    assert client.manifest("team/alpha@1")["name"] == "team/alpha"
