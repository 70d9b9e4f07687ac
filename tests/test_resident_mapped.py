"""Resident adapters loaded from the registry hold their factors as views of the blob's
memory map (`deltahub.compose.mapped`): the tensors' addresses lie in the blob's map
(/proc/self/maps), outputs equal the copy-loading path exactly (activated, routed and
paged through slots), an in-place write never reaches the blob, unload releases the map
(no map, no descriptor left); a directory's file is copied (rewriting it in place changes
nothing); casts and misaligned tensors are copies, counted."""

from __future__ import annotations

import gc
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deltahub import AdaptedModel, load_base
from deltahub.compose import slots
from deltahub.compose.mapped import mapped_path, read_tensors
from deltahub.methods.lora.layer import LoraLayer
from deltahub.registry import Registry
from deltahub.registry.store import sha256_file
from tests.compose_helpers import ids, out_of, randomize, tiny

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

TARGETS = ["q_proj", "v_proj", "down_proj"]
N = 5


def _publish(tmp_path: Path, n: int = N, dtype: torch.dtype | None = None) -> tuple[Registry, list[Path]]:
    """n random LoRAs (ranks 2..), each saved as a directory and published."""
    src = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    reg, dirs = Registry(), []
    for i in range(n):
        r = 2 + i % 3
        src.add_adapter(f"a{i}", {"method": "lora", "r": r, "lora_alpha": 2 * r, "target_modules": TARGETS})
        randomize(src.get_adapter(f"a{i}"), seed=10 + i, std=0.1)
        if dtype is not None:
            src.get_adapter(f"a{i}").to(dtype)
        dirs.append(src.save_adapter(f"a{i}", tmp_path / f"a{i}"))
        reg.publish(dirs[-1], f"a{i}")
    return reg, dirs


def _fresh() -> AdaptedModel:
    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    model.eval()
    return model


def _layers(model: AdaptedModel, name: str) -> list[LoraLayer]:
    return [x for x in model.get_adapter(name).layers if isinstance(x, LoraLayer)]


def _blob(reg: Registry, name: str) -> str:
    return os.path.realpath(reg.open(name).weights_path)


def _maps_of(paths: set[str]) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if any(p in line for p in paths)]


def _rss_kib_of(paths: set[str]) -> dict[str, int]:
    """Resident KiB of each map of `paths` (/proc/self/smaps)."""
    out: dict[str, int] = {}
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=5)
            if "-" in first[0] and len(first) > 4:  # a map's header line
                current = first[5].strip() if len(first) > 5 and first[5].strip() in paths else None
            elif current is not None and line.startswith("Rss:"):
                out[current] = out.get(current, 0) + int(line.split()[1])
    return out


def _fds_of(paths: set[str]) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.replace(" (deleted)", "") in paths:
            out.append(target)
    return out


def _outputs(model: AdaptedModel, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """Each adapter active alone, then routed batches that page through 2 slots."""
    outs = []
    with torch.no_grad():
        for n in names:
            model.activate(n)
            outs.append(out_of(model(input_ids=x)))
        model.deactivate()
        model.routing_slots = 2
        for i in range(len(names)):  # rotating pairs: every batch pages one adapter in
            batch = [names[i], names[(i + 1) % len(names)], None]
            outs.append(out_of(model(input_ids=x, adapter_names=batch)))
    return outs


def test_registry_loads_are_views_of_the_blob_and_equal_copies_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(slots, "CPU_ELEMENTS_PER_ADAPTER", 10**12)  # gather on a tiny model
    reg, dirs = _publish(tmp_path)
    names = [f"a{i}" for i in range(N)]
    blobs = {n: _blob(reg, n) for n in names}
    mapped = _fresh()
    for n in names:
        mapped.load(n)
    for n in names:
        assert len(_layers(mapped, n)) == 2 * len(TARGETS)
        assert {mapped_path(t) for x in _layers(mapped, n) for t in (x.lora_A, x.lora_B)} == {blobs[n]}
        stats = mapped.load_stats[n]
        assert (stats.mapped, stats.copied, stats.misaligned) == (4 * len(TARGETS), 0, 0)
    assert not _fds_of(set(blobs.values()))  # the map needs no open descriptor
    # Loading read no page through the maps (safetensors' get_tensor faults in the whole file).
    assert _rss_kib_of(set(blobs.values())) == dict.fromkeys(blobs.values(), 0)

    copied = _fresh()
    for n, d in zip(names, dirs, strict=True):
        copied.load_path(d, n)
        assert all(mapped_path(x.lora_A) is None for x in _layers(copied, n))  # process memory
        assert copied.load_stats[n].mapped == 0
    x = ids(batch=3, length=6)
    got, want = _outputs(mapped, names, x), _outputs(copied, names, x)
    assert mapped._slot_table is not None and mapped._slot_table.page_ins >= N
    assert all(kib > 0 for kib in _rss_kib_of(set(blobs.values())).values())  # now read
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert (got[0] - got[1]).abs().max().item() > 1e-3  # the adapters do change the output
    # Paging copied the factors into the slot buffers; the adapters still view the blob.
    assert mapped_path(_layers(mapped, "a0")[0].lora_A) == blobs["a0"]

    for n in names:
        mapped.unload(n)
    gc.collect()
    assert not _maps_of(set(blobs.values()))
    assert not _fds_of(set(blobs.values()))


def test_an_in_place_write_into_a_mapped_factor_never_reaches_the_blob(tmp_path):
    reg, _ = _publish(tmp_path, n=1)
    model = _fresh()
    model.load("a0")
    blob = _blob(reg, "a0")
    before = sha256_file(blob)
    layer = _layers(model, "a0")[0]
    want = layer.lora_A.detach().clone() * 3
    with torch.no_grad():
        layer.lora_A.mul_(3)  # copy-on-write: the touched pages become the process's own
    assert torch.equal(layer.lora_A, want)
    assert sha256_file(blob) == before
    again = _fresh()
    again.load("a0")
    assert torch.equal(_layers(again, "a0")[0].lora_A * 3, want)


def test_a_directory_load_is_a_copy_so_rewriting_the_file_changes_nothing(tmp_path):
    _, dirs = _publish(tmp_path, n=1)
    model = _fresh()
    model.load_path(dirs[0], "a0")
    x = ids()
    with torch.no_grad():
        model.activate("a0")
        before = out_of(model(input_ids=x))
    weights = dirs[0] / "adapter_model.safetensors"
    (n,) = struct.unpack("<Q", weights.read_bytes()[:8])
    with open(weights, "r+b") as f:  # in place, same size, as `cp` over it would
        f.seek(8 + n)
        f.write(np.full((os.path.getsize(weights) - 8 - n) // 4, 0.5, np.float32).tobytes())
    with torch.no_grad():
        after = out_of(model(input_ids=x))
    assert torch.equal(before, after)
    fresh = _fresh()
    fresh.load_path(dirs[0], "a0")  # the rewrite itself did take effect on disk
    assert torch.equal(_layers(fresh, "a0")[0].lora_A, torch.full_like(_layers(fresh, "a0")[0].lora_A, 0.5))


def test_a_cast_to_the_base_dtype_is_a_copy_and_equals_the_directory_load(tmp_path):
    _, dirs = _publish(tmp_path, n=2, dtype=torch.bfloat16)
    mapped, copied = _fresh(), _fresh()
    x = ids()
    for i, d in enumerate(dirs):
        mapped.load(f"a{i}")
        copied.load_path(d, f"a{i}")
        stats = mapped.load_stats[f"a{i}"]
        assert (stats.mapped, stats.copied) == (0, 4 * len(TARGETS))
        layer = _layers(mapped, f"a{i}")[0]
        assert layer.lora_A.dtype == torch.float32 and mapped_path(layer.lora_A) is None
    got, want = _outputs(mapped, ["a0", "a1"], x), _outputs(copied, ["a0", "a1"], x)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def _write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray, str]]) -> None:
    """A safetensors file with tensors in the given order (no alignment padding)."""
    header, data, offset = {}, b"", 0
    for name, arr, dtype in tensors:
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_a_misaligned_tensor_is_copied_and_counted(tmp_path):
    path = tmp_path / "w.safetensors"
    half = np.array([1, 2, 3], np.float16)  # 6 bytes: what follows starts 2 bytes off
    f32 = np.arange(8, dtype=np.float32) + 0.5
    tail = np.arange(4, dtype=np.float32)
    _write_safetensors(path, [("h", half, "F16"), ("f", f32, "F32"), ("g", tail, "F32")])
    real = os.path.realpath(path)
    with read_tensors(path, map_file=True) as reader:
        h, f, g = reader.get("h"), reader.get("f"), reader.get("g")
        module = torch.nn.Module()
        module.register_buffer("h", h)
        module.register_buffer("f", f)
        stats = reader.stats(module, {"g": g})
    assert torch.equal(f, torch.from_numpy(f32)) and torch.equal(h, torch.from_numpy(half))
    assert torch.equal(g, torch.from_numpy(tail))
    # f (at 6) and g (at 6 + 32) are 2 bytes off: copied, aligned, in process memory.
    assert all(t.data_ptr() % 4 == 0 and mapped_path(t) is None for t in (f, g))
    assert mapped_path(h) == real
    assert (stats.misaligned, stats.copied, stats.mapped) == (2, 2, 1)
