"""A commit checks tensors from what the upload saw (deltahub/hub/blobfacts.py).

- `StreamScan` (tensorscan.py), fed a file in chunks of any size, reaches the verdict
  `check_finite` reaches on the whole file (every float dtype, bf16 and f8 included,
  NaN/Inf split across chunks), and keeps exactly the bytes the header check reads: a
  stand-in (those bytes, then a hole) gets the same typed error as the real file.
- On both back-ends a NaN blob is still refused at commit (400 `tensor-non-finite`,
  naming the tensor), also when its facts are missing (a blob from an older server).
- On S3 a good commit downloads no tensor bytes (GetObject counted by a boto3 event hook on
  the server's own client); without facts it streams the blob once and records them; an
  object rewritten under its digest is caught by its ETag and refused as corrupt.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save, save_file

from deltahub import artifact as af
from deltahub.errors import InvalidArtifact
from deltahub.fileformat import read_safetensors_header
from deltahub.hub import blobfacts
from deltahub.registry import Registry
from deltahub.tensorscan import StreamScan, check_finite
from tests.hub_helpers import BACKENDS, Hub, lora_dir, start_hub

NAME = "team/alpha"
B = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


# ----------------------------------------------------------------------------- the scanner


def _feed(data: bytes, rng: random.Random, most: int) -> Any:
    scan, i = StreamScan(), 0
    while i < len(data):
        k = rng.randint(1, most)
        scan.update(data[i : i + k])
        i += k
    return scan.finish()


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value", [None, float("nan"), float("inf"), float("-inf")])
def test_stream_scan_agrees_with_check_finite_in_any_chunking(
    dtype: torch.dtype, value: Any, tmp_path: Path
) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=g).to(dtype),
        "ids": torch.arange(9),
        "b": torch.randn(33, 3, generator=g).to(dtype),
        "c": torch.randn(301, generator=g).to(dtype),
    }
    if value is not None and dtype == torch.float8_e4m3fn:
        value = float("nan")  # e4m3fn has no infinity (torch saturates one to 448): NaN only
    if value is not None:  # the last element of "c": its bytes end the file, split by chunks
        c = tensors["c"].float()
        c[-1] = value
        tensors["c"] = c.to(dtype)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    expected: str | None = None
    try:
        check_finite(path, read_safetensors_header(path))
    except InvalidArtifact as e:
        assert e.rule == "tensor-non-finite"
        expected = "c"
    assert (expected is None) == (value is None)  # the reference itself can fail
    (n,) = struct.unpack("<Q", data[:8])
    names = [k for k in json.loads(data[8 : 8 + n]) if k != "__metadata__"]
    rng = random.Random(1)
    for most in (1, 3, 64, 1 << 20):
        for _ in range(5 if most < 100 else 1):
            got = _feed(data, rng, most)
            assert got.size == len(data) and got.finite == (expected is None)
            assert (got.bad[0] if got.bad else None) == expected
            assert [t[0] for t in got.tensors] == names and got.head == data[: 8 + n]


def _header_error(path: Path) -> tuple[str, str] | None:
    try:
        read_safetensors_header(path)
    except InvalidArtifact as e:
        return e.rule, str(e)
    return None


def _hostile(good: bytes) -> dict[str, bytes]:
    (n,) = struct.unpack("<Q", good[:8])
    return {
        "good": good,
        "trailing-bytes": good + b"\0\0",
        "truncated-data": good[:-3],
        "truncated-header": good[: 8 + n // 2],
        "header-too-large": struct.pack("<Q", 5 << 20) + good[8:],
        "short": good[:5],
        "pickle": b"\x80\x02" + good[2:],
        "not-json": good[:8] + b"[" + good[9:],
        "empty-header": struct.pack("<Q", 0) + good[8:],
    }


@pytest.mark.parametrize("case", list(_hostile(save({"x": torch.ones(4)}))))
def test_a_stand_in_from_the_scanned_head_gets_the_real_files_header_verdict(
    case: str, tmp_path: Path
) -> None:
    data = _hostile(save({"x": torch.ones(4), "y": torch.zeros(2, 3, dtype=torch.bfloat16)}))[case]
    real = tmp_path / "real" / af.WEIGHTS_FILE
    real.parent.mkdir()
    real.write_bytes(data)
    scan = _feed(data, random.Random(0), 7)
    stand = tmp_path / "stand" / af.WEIGHTS_FILE
    stand.parent.mkdir()
    blobfacts._stand_in(stand, scan.head, scan.size)
    assert stand.stat().st_size == len(data) and len(scan.head) <= 8 + len(data)
    assert _header_error(stand) == _header_error(real)
    assert (case == "good") == (_header_error(real) is None)


# ----------------------------------------------------------------------------- the hub


@pytest.fixture(params=BACKENDS)
def hub(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path, request.param)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _version(tmp_path: Path, seed: int = 0, poison: float | None = None, layers: int = 2, **kw: Any) -> Any:
    """A published version in a fresh client registry (a NaN in `B` if `poison`)."""
    src = lora_dir(tmp_path / f"src-{seed}", seed, layers=layers, **kw)
    if poison is not None:
        tensors = load_file(str(src / af.WEIGHTS_FILE))
        tensors[B][1, 2] = poison
        save_file(tensors, str(src / af.WEIGHTS_FILE))
    reg = Registry(tmp_path / f"client-{seed}")
    return reg, reg.publish(src, NAME)


def _upload(hub: Hub, reg: Registry, v: Any) -> None:
    for d in v.files.values():
        data = reg.store.path(d).read_bytes()
        r = httpx.put(
            f"{hub.url}/v1/adapters/{NAME}/blobs/{d}",
            content=data,
            headers=_auth(hub.tokens["write"]),
            timeout=60,
        )
        assert r.status_code in (200, 201), r.text


def _commit(hub: Hub, v: Any) -> httpx.Response:
    return httpx.post(
        f"{hub.url}/v1/adapters/{NAME}/versions",
        json={"files": v.files},
        headers=_auth(hub.tokens["write"]),
        timeout=120,
    )


def _state(hub: Hub) -> Any:
    return hub.server.app.state.hub


def _forget(hub: Hub, digest: str) -> None:
    """As if the blob had come from a server that records no facts."""
    blobfacts.forget(_state(hub).registry_for_thread(), digest)


@pytest.mark.parametrize("stale", [False, True], ids=["facts", "no-facts"])
def test_a_nan_blob_is_refused_at_commit_and_leaves_no_version(hub: Hub, tmp_path: Path, stale: bool) -> None:
    reg, v = _version(tmp_path, poison=float("nan"))
    _upload(hub, reg, v)
    weights = v.files[af.WEIGHTS_FILE]
    facts = blobfacts.get(_state(hub).registry_for_thread(), weights)
    assert facts is not None and facts.scan.finite is False and facts.scan.bad[0] == B
    if stale:
        _forget(hub, weights)
    r = _commit(hub, v)
    assert r.status_code == 400 and r.json()["error"] == "invalid-artifact", r.text
    assert "tensor-non-finite" in r.json()["message"] and B in r.json()["message"]
    got = httpx.get(f"{hub.url}/v1/resolve/{NAME}", headers=_auth(hub.tokens["read"]), timeout=30)
    assert got.status_code == 404  # nothing was committed
    # A good version of the same adapter still commits.
    reg2, good = _version(tmp_path, seed=1)
    _upload(hub, reg2, good)
    assert _commit(hub, good).status_code == 201


def test_facts_record_the_header_summary(hub: Hub, tmp_path: Path) -> None:
    reg, v = _version(tmp_path, seed=3)
    _upload(hub, reg, v)
    digest = v.files[af.WEIGHTS_FILE]
    facts = blobfacts.get(_state(hub).registry_for_thread(), digest)
    path = reg.store.path(digest)
    header = read_safetensors_header(path)
    assert facts is not None and facts.scan.size == path.stat().st_size and facts.scan.finite is True
    assert {t[0]: (t[1], tuple(t[2])) for t in facts.scan.tensors} == {
        k: (i.dtype, i.shape) for k, i in header.items()
    }
    assert path.read_bytes().startswith(facts.scan.head)
    assert (facts.etag is None) == (hub.backend == "embedded")


class GetCounter:
    """Bytes of every GetObject the server's own S3 client receives, by key (boto3 events:
    the key is noted when the request is built, the length read when its answer is parsed)."""

    def __init__(self, s3: Any) -> None:
        self.by_key: dict[str, int] = {}
        self.s3 = s3
        s3.meta.events.register("before-parameter-build.s3.GetObject", self._key)
        s3.meta.events.register("after-call.s3.GetObject", self._count)

    def _key(self, params: dict[str, Any], context: dict[str, Any], **kw: Any) -> None:
        context["counted_key"] = params.get("Key", "?")

    def _count(self, parsed: dict[str, Any], context: dict[str, Any], **kw: Any) -> None:
        key = context.get("counted_key", "?")
        self.by_key[key] = self.by_key.get(key, 0) + int(parsed.get("ContentLength", 0))

    def close(self) -> None:
        self.s3.meta.events.unregister("before-parameter-build.s3.GetObject", self._key)
        self.s3.meta.events.unregister("after-call.s3.GetObject", self._count)


@pytest.fixture
def s3_hub(tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path, "postgres+s3")


def test_a_good_s3_commit_downloads_no_tensor_bytes(s3_hub: Hub, tmp_path: Path) -> None:
    store = _state(s3_hub).store
    # 16 layers at r=64: ~1 MB of weights
    reg, v = _version(tmp_path, seed=4, layers=16, r=64)
    _upload(s3_hub, reg, v)
    weights = v.files[af.WEIGHTS_FILE]
    counter = GetCounter(store.s3)
    try:
        r = _commit(s3_hub, v)
        assert r.status_code == 201, r.text
        small = sum(reg.store.path(d).stat().st_size for f, d in v.files.items() if f != af.WEIGHTS_FILE)
        assert counter.by_key.get(store.key(weights), 0) == 0
        assert 0 < sum(counter.by_key.values()) <= small
        # Facts missing (a blob from an older server): streamed once, then recorded.
        _forget(s3_hub, weights)
        counter.by_key.clear()
        manifest = json.loads(reg.store.path(v.files[af.MANIFEST_FILE]).read_bytes())
        manifest["version"] = "2"  # the same weights under a new version
        data = json.dumps(manifest).encode()
        files = {**v.files, af.MANIFEST_FILE: "sha256:" + hashlib.sha256(data).hexdigest()}
        put = httpx.put(
            f"{s3_hub.url}/v1/adapters/{NAME}/blobs/{files[af.MANIFEST_FILE]}",
            content=data,
            headers=_auth(s3_hub.tokens["write"]),
            timeout=30,
        )
        assert put.status_code in (200, 201)
        r2 = httpx.post(
            f"{s3_hub.url}/v1/adapters/{NAME}/versions",
            json={"files": files},
            headers=_auth(s3_hub.tokens["write"]),
            timeout=120,
        )
        assert r2.status_code == 201, r2.text
        assert counter.by_key[store.key(weights)] == reg.store.path(weights).stat().st_size
        assert blobfacts.get(_state(s3_hub).registry_for_thread(), weights) is not None
    finally:
        counter.close()


def test_an_object_rewritten_under_its_digest_is_refused_at_commit(s3_hub: Hub, tmp_path: Path) -> None:
    reg, v = _version(tmp_path, seed=5)
    _upload(s3_hub, reg, v)
    s3_hub.corrupt_blob(v.files[af.WEIGHTS_FILE])  # a new ETag: the facts no longer hold
    r = _commit(s3_hub, v)
    assert r.status_code == 500 and r.json()["error"] == "corrupt-blob", r.text
