"""Per-tensor comparison of two safetensors files.

"Unchanged" is decided without deserializing anything: each tensor's raw bytes are
hashed straight from a memory map of the file, at the byte range its header declares
(`artifact.read_safetensors_header`). Only tensors whose bytes differ are loaded, and
compared in float64:

    relative change = ||t_b - t_a||_2 / ||t_a||_2,    cosine = <t_a, t_b> / (||t_a|| ||t_b||)
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltahub.artifact import TensorInfo
from deltahub.diffing.report import TensorDiff


@contextlib.contextmanager
def serial_torch() -> Iterator[None]:
    """Run the enclosed torch work on one intra-op thread, then restore the setting.

    A diff's torch work is many small latency-bound operations (per-tensor norms, d x 2r
    QRs with r <= 64, (2r)^2 SVDs): a second thread saves little, and when other
    processes keep the cores busy every parallel region waits for a scheduler wake-up.
    Measured on a shared 2-core machine for the 56-module diff of bench/diff_bench.py:
    3.4 s with 2 threads, 0.17 s with 1.
    """
    import torch

    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


class Weights:
    """One side's safetensors file: header, raw-byte digests, and tensors loaded on demand."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo]) -> None:
        self.path = Path(path)
        self.infos = infos
        self._digests: dict[str, str] | None = None
        self._handle: Any = None

    def digests(self) -> dict[str, str]:
        """sha256 of every tensor's raw bytes, read through one memory map."""
        if self._digests is None:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                start = 8 + n
                out: dict[str, str] = {}
                if not any(i.nbytes for i in self.infos.values()):
                    out = {name: hashlib.sha256(b"").hexdigest() for name in self.infos}
                else:
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                        view = memoryview(mm)
                        try:
                            for name, info in self.infos.items():
                                lo, hi = info.offsets
                                out[name] = hashlib.sha256(view[start + lo : start + hi]).hexdigest()
                        finally:
                            view.release()
            self._digests = out
        return self._digests

    def get(self, name: str) -> Any:
        """The tensor `name` (torch, CPU), memory-mapped by safetensors."""
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
        return self._handle.get_tensor(name)


def _numbers(ta: Any, tb: Any) -> tuple[float, float, float, float]:
    """(||a||, ||b||, ||b - a||, <a, b>) in float64."""
    import torch

    a = ta.detach().to(torch.float64).flatten()
    b = tb.detach().to(torch.float64).flatten()
    return float(a.norm()), float(b.norm()), float((b - a).norm()), float(a @ b)


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


def compare_tensors(wa: Weights, wb: Weights, same_file: bool = False) -> list[TensorDiff]:
    """Classify every tensor name of either side; numbers for the tensors whose bytes differ.

    `same_file` skips hashing when the two weights files are already known to be the
    same blob.
    """
    da = {} if same_file else wa.digests()
    db = {} if same_file else wb.digests()
    out: list[TensorDiff] = []
    for name in sorted(set(wa.infos) | set(wb.infos)):
        ia, ib = wa.infos.get(name), wb.infos.get(name)
        if ib is None:
            out.append(TensorDiff(name, "removed", ia.shape, None, ia.dtype, None))  # type: ignore[union-attr]
            continue
        if ia is None:
            out.append(TensorDiff(name, "added", None, ib.shape, None, ib.dtype))
            continue
        if ia.shape != ib.shape:
            out.append(TensorDiff(name, "reshaped", ia.shape, ib.shape, ia.dtype, ib.dtype))
            continue
        if same_file or (ia.dtype == ib.dtype and da[name] == db[name]):
            out.append(TensorDiff(name, "unchanged", ia.shape, ib.shape, ia.dtype, ib.dtype))
            continue
        t = TensorDiff(name, "changed", ia.shape, ib.shape, ia.dtype, ib.dtype)
        na, nb, nd, dot = _numbers(wa.get(name), wb.get(name))
        t.norm_a, t.norm_b, t.diff_norm = na, nb, nd
        t.relative_change = _ratio(nd, na)
        t.cosine = dot / (na * nb) if na > 0 and nb > 0 else 0.0
        out.append(t)
    return out


def _norm(t: Any) -> float:
    import torch

    return float(t.detach().to(torch.float64).norm())


def tensor_sums(wa: Weights, wb: Weights, diffs: list[TensorDiff]) -> tuple[float, float]:
    """(sum ||a - b||^2, sum ||a||^2) over all tensors, for an overall relative change.

    An added tensor counts as b - 0, a removed one as 0 - a; a reshaped one cannot be
    subtracted, so it counts as entirely replaced (||a||^2 + ||b||^2).
    """
    num = den = 0.0
    for t in diffs:
        if t.status == "added":
            num += _norm(wb.get(t.name)) ** 2
            continue
        if t.norm_a is None:  # unchanged, removed or reshaped: the denominator needs it
            t.norm_a = _norm(wa.get(t.name))
        den += t.norm_a**2
        if t.status == "removed":
            num += t.norm_a**2
        elif t.status == "reshaped":
            num += t.norm_a**2 + _norm(wb.get(t.name)) ** 2
        elif t.diff_norm is not None:
            num += t.diff_norm**2
    return num, den
