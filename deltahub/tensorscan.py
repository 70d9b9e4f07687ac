"""An optional scan of an artifact's tensors for non-finite values (NaN, Inf).

NaN weights load and run, and give finite but wrong logits; `publish --check-finite`
refuses them. The scan reads each floating tensor's bytes in bounded chunks through numpy
(never torch: the registry validates without model code). numpy has no bfloat16 or float8,
so those are read as unsigned integers and tested on their exponent bits.

`StreamScan` does the same scan on a byte stream as it passes (the hub's uploads): it
keeps the file's first bytes (the 8-byte length and the header), parses the header
leniently to find each tensor's byte range, and tests each floating tensor's bytes chunk
by chunk, carrying an element split across two chunks over to the next. Its verdict is
only meaningful for a file whose header then passes `read_safetensors_header`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import DTYPE_BYTES, TensorInfo
from deltahub.settings import MAX_HEADER_BYTES

__all__ = ["ScanResult", "StreamScan", "check_finite", "head_length", "non_finite"]

CHUNK_BYTES = 8 << 20  # bytes read at a time: memory stays flat for large adapters

# dtype -> (numpy dtype its bytes are read as, test of one chunk: True where non-finite)
_SCANS = {
    "F64": ("<f8", lambda a: ~np.isfinite(a)),
    "F32": ("<f4", lambda a: ~np.isfinite(a)),
    "F16": ("<f2", lambda a: ~np.isfinite(a)),
    # bfloat16 is the top half of a float32: all exponent bits set means Inf or NaN.
    "BF16": ("<u2", lambda a: (a & 0x7F80) == 0x7F80),
    # float8 e5m2 is the top half of a float16; e4m3 (fn) has NaN only, S.1111.111.
    "F8_E5M2": ("u1", lambda a: (a & 0x7C) == 0x7C),
    "F8_E4M3": ("u1", lambda a: (a & 0x7F) == 0x7F),
}


def check_finite(path: Path | str, tensors: dict[str, TensorInfo]) -> None:
    """Raise `InvalidArtifact("tensor-non-finite")` naming the first floating tensor of the
    safetensors file `path` (its header already validated into `tensors`) that holds a NaN
    or an infinity."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        base = 8 + n
        for info in sorted(tensors.values(), key=lambda t: t.offsets):
            scan = _SCANS.get(info.dtype)
            if scan is None or info.nbytes == 0:
                continue  # integer and bool tensors are always finite
            np_dtype, is_bad = scan
            item = np.dtype(np_dtype).itemsize
            step = CHUNK_BYTES - CHUNK_BYTES % item
            f.seek(base + info.offsets[0])
            left = info.nbytes
            while left > 0:
                raw = f.read(min(step, left))
                if not raw:
                    raise InvalidArtifact("truncated", f"{path.name} ends inside tensor {info.name!r}")
                left -= len(raw)
                chunk = np.frombuffer(raw, dtype=np_dtype)
                bad = is_bad(chunk)
                if bad.any():
                    raise non_finite(info.name, info.dtype, int(bad.sum()))


def non_finite(name: str, dtype: str, count: int) -> InvalidArtifact:
    """The error for a tensor holding NaN or infinity (`count`: those found, at least)."""
    return InvalidArtifact(
        "tensor-non-finite", f"tensor {name!r} ({dtype}) holds {count}+ NaN or infinite value(s)"
    )


def head_length(prefix: bytes, size: int) -> int:
    """How many leading bytes of a `size`-byte file `read_safetensors_header` reads.

    The 8-byte length, the header it declares when that fits the limit and the file, and
    at least one byte more (the pickle-magic test reads the 9th byte).
    """
    if len(prefix) < 8:
        return min(size, 8)
    (n,) = struct.unpack("<Q", prefix[:8])
    fits = n <= MAX_HEADER_BYTES and 8 + n <= size
    return min(size, 8 + max(1, n if fits else 0))


@dataclass
class ScanResult:
    """What a `StreamScan` saw: size, leading bytes, the tensors, and the NaN/Inf verdict.

    `finite` is None when no verdict could be reached (not a parseable safetensors header).
    """

    size: int
    head: bytes
    tensors: list[tuple[str, str, list[int]]] | None  # (name, dtype, shape) in header order
    finite: bool | None
    bad: tuple[str, str, int] | None = None  # the first bad tensor: name, dtype, count

    def error(self) -> InvalidArtifact | None:
        return non_finite(*self.bad) if self.bad is not None else None


@dataclass
class _Segment:
    name: str
    dtype: str
    start: int  # absolute byte offsets in the file
    end: int


@dataclass
class StreamScan:
    """Feed a safetensors file's bytes in order (`update`), then `finish()` for the facts."""

    size: int = 0
    _head: bytearray = field(default_factory=bytearray)
    _want: int = 8
    _segments: list[_Segment] | None = None
    _tensors: list[tuple[str, str, list[int]]] | None = None
    _parsed: bool = False
    _i: int = 0
    _carry: bytes = b""
    _bad: tuple[str, str, int] | None = None

    def update(self, chunk: bytes) -> None:
        pos = self.size
        self.size += len(chunk)
        view = memoryview(chunk)
        while pos <= len(self._head) < min(self._want, self.size):  # the head is a prefix
            self._take_head(view[len(self._head) - pos : self._want - pos])
        if self._segments is None or self._bad is not None:
            return
        while self._i < len(self._segments):
            seg = self._segments[self._i]
            lo, hi = max(pos, seg.start), min(self.size, seg.end)
            if lo < hi:
                self._scan(seg, view[lo - pos : hi - pos])
                if self._bad is not None:
                    return
            if self.size < seg.end:
                return
            self._i += 1
            self._carry = b""

    def _take_head(self, piece: memoryview) -> None:
        self._head += piece
        if len(self._head) < self._want:
            return
        if self._want == 8:
            (n,) = struct.unpack("<Q", bytes(self._head[:8]))
            self._want = 8 + max(1, n) if n <= MAX_HEADER_BYTES else 9
            if len(self._head) < self._want:
                return
        if not self._parsed:
            self._parsed = True
            n = struct.unpack("<Q", bytes(self._head[:8]))[0]
            if n <= MAX_HEADER_BYTES and len(self._head) >= 8 + n:
                self._parse(bytes(self._head[8 : 8 + n]), 8 + n)

    def _parse(self, raw: bytes, base: int) -> None:
        """The tensors' byte ranges, if the header is a plausible one (the strict check is
        `read_safetensors_header`'s, at commit); otherwise no verdict."""
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return
        if not isinstance(header, dict):
            return
        header.pop("__metadata__", None)
        segments, tensors = [], []
        for name, entry in header.items():
            try:
                dtype, shape, (a, b) = entry["dtype"], entry["shape"], entry["data_offsets"]
            except (TypeError, KeyError, ValueError):
                return
            if not (isinstance(dtype, str) and dtype in DTYPE_BYTES and isinstance(shape, list)):
                return
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b):
                return
            if (b - a) % DTYPE_BYTES[dtype]:
                return
            segments.append(_Segment(name, dtype, base + a, base + b))
            tensors.append((name, dtype, shape))
        segments.sort(key=lambda s: (s.start, s.end))
        end = base
        for seg in segments:
            if seg.start != end:
                return  # gaps or overlaps: the strict check refuses it anyway
            end = seg.end
        self._segments = [s for s in segments if s.dtype in _SCANS and s.end > s.start]
        self._tensors = tensors

    def _scan(self, seg: _Segment, piece: memoryview) -> None:
        np_dtype, is_bad = _SCANS[seg.dtype]
        item = DTYPE_BYTES[seg.dtype]
        if self._carry:
            data: bytes | memoryview = self._carry + bytes(piece)
        else:
            data = piece
        whole = len(data) - len(data) % item
        self._carry = bytes(data[whole:])
        if not whole:
            return
        bad = is_bad(np.frombuffer(data[:whole], dtype=np_dtype))
        if bad.any():
            self._bad = (seg.name, seg.dtype, int(bad.sum()))

    def finish(self) -> ScanResult:
        head = bytes(self._head[: head_length(bytes(self._head[:8]), self.size)])
        complete = self._segments is not None and (self._bad is not None or self._i >= len(self._segments))
        return ScanResult(
            size=self.size,
            head=head,
            tensors=self._tensors if self._segments is not None else None,
            finite=(self._bad is None) if complete else None,
            bad=self._bad,
        )
