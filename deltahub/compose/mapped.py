"""Resident adapters' tensors as views of their blob's memory map, not copies.

A registry blob is mapped once, privately (`torch.UntypedStorage.from_file(path,
shared=False)`: `mmap(MAP_PRIVATE)`, the file descriptor closed right away), and each
tensor is a view of its bytes (`Tensor.set_` on that storage, offsets from the header).
Mapping touches no page: a load costs the header and the Python objects, RSS grows only by
the pages a forward or a copy into a routing slot (`compose.slots`) reads, and those are
clean file pages the kernel may drop again. A thousand resident LoRAs cost a thousand
maps, not a thousand copies (`bench/resident_bench.py`).

`safetensors.safe_open` maps the file the same way, but its first `get_tensor` faults in
every page of the file (safetensors 0.8, measured: RSS grows by the file's size), so it
is not used here.

Which files may stay mapped: registry blobs only (`map_file=True`). A blob is content
addressed and never written in place: the store writes a new file and renames it over
(a new inode) and `gc` unlinks (the map keeps the old inode alive). A file rewritten in
place under a map changes the adapter silently, and a truncated one kills the process
with SIGBUS on the next read. Artifact directories (`AdaptedModel.load_path`) are
rewritten in place by ordinary tools (`cp`, a trainer saving its checkpoint), so their
tensors are read into process memory.

The map is private and copy-on-write, not read-only: an in-place write into a factor
(training a loaded adapter, an in-place scale) copies the pages it touches into the
process and never reaches the file, where a read-only map would fault.

What is copied even from a blob: a tensor cast to the base's dtype or moved to its
device (the method's `from_tensors` does it), a tensor a method transforms, and a tensor
whose offset in the file is not a multiple of its element size (safetensors does not
require alignment, though the files it writes are aligned; a misaligned view is undefined
behaviour for vectorized kernels on some CPUs). `LoadStats` counts each kind.

The map is released when the last tensor viewing it is freed (`AdaptedModel.unload`);
there is no file descriptor to close. Each resident adapter holds one map (Linux allows
65,530 per process by default, `vm.max_map_count`).
"""

from __future__ import annotations

import bisect
import contextlib
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TensorInfo, read_safetensors_header

DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
}


@dataclass
class LoadStats:
    """What one loaded adapter holds: tensors viewing its file's map, and copies."""

    mapped: int = 0  # tensors held as views of the file's map
    mapped_bytes: int = 0
    copied: int = 0  # tensors in process memory (cast, moved, transformed, or not a blob)
    copied_bytes: int = 0
    misaligned: int = 0  # of the copies: offset in the file not a multiple of the element size


class TensorReader:
    """`get(key)`: the tensor `key` of a safetensors file (header `infos`), a view of the
    file's map when `map_file` (and aligned), else a copy in process memory."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], map_file: bool, file: BinaryIO) -> None:
        self.infos = infos
        self._file = file
        (n,) = struct.unpack("<Q", file.read(8))
        self._data = 8 + n  # where the data section starts
        size = path.stat().st_size
        if any(self._data + t.offsets[1] > size for t in infos.values()):
            raise InvalidArtifact("truncated", f"{path.name} is {size} bytes, shorter than its header says")
        self._storage: torch.UntypedStorage | None = None
        # Views need the file's bytes in the machine's order (safetensors is little-endian).
        if map_file and sys.byteorder == "little" and size:
            self._storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
        self.misaligned = 0
        self._spans: list[tuple[int, int]] = []  # (start, end) addresses of the views handed out

    def get(self, key: str) -> Tensor:
        info = self.infos[key]
        dtype = DTYPES[info.dtype]
        offset = self._data + info.offsets[0]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=dtype)
        if self._storage is None:
            return self._read(info, dtype, offset)
        size = dtype.itemsize
        if offset % size:
            self.misaligned += 1
            raw = torch.empty(0, dtype=torch.uint8).set_(self._storage, offset, (info.nbytes,))
            return raw.clone().view(dtype).reshape(info.shape)
        t = torch.empty(0, dtype=dtype).set_(self._storage, offset // size, info.shape)
        self._spans.append((t.data_ptr(), t.data_ptr() + info.nbytes))
        return t

    def _read(self, info: TensorInfo, dtype: torch.dtype, offset: int) -> Tensor:
        """A copy in process memory, read straight into the tensor (one copy, no map)."""
        if sys.byteorder != "little":  # safetensors is little-endian; its reader swaps bytes
            from safetensors import safe_open

            with safe_open(self._file.name, framework="pt") as handle:
                return handle.get_tensor(info.name).clone()
        t = torch.empty(info.shape, dtype=dtype)
        self._file.seek(offset)
        got = self._file.readinto(memoryview(t.view(-1).view(torch.uint8).numpy()))  # type: ignore[attr-defined]
        if got != info.nbytes:
            raise InvalidArtifact("truncated", f"tensor {info.name!r}: read {got} of {info.nbytes} bytes")
        return t

    def _maps(self, t: Tensor) -> bool:
        """Whether `t` views one of the tensors handed out (so the file's map)."""
        p = t.data_ptr()
        i = bisect.bisect_right(self._spans, (p, sys.maxsize)) - 1
        return i >= 0 and self._spans[i][0] <= p < self._spans[i][1]

    def stats(self, module: nn.Module, extra: dict[str, Tensor] | None = None) -> LoadStats:
        """Classify what `module` holds (parameters, buffers, `extra`) as views or copies."""
        self._spans.sort()
        out = LoadStats(misaligned=self.misaligned)
        seen: set[tuple[int, int]] = set()
        tensors = [*module.parameters(), *module.buffers(), *(extra or {}).values()]
        for t in tensors:
            key = (t.data_ptr(), t.numel())
            if key in seen or not t.numel():
                continue
            seen.add(key)
            nbytes = t.numel() * t.element_size()
            if self._maps(t):
                out.mapped, out.mapped_bytes = out.mapped + 1, out.mapped_bytes + nbytes
            else:
                out.copied, out.copied_bytes = out.copied + 1, out.copied_bytes + nbytes
        return out


@contextlib.contextmanager
def read_tensors(
    path: str | Path, map_file: bool, infos: dict[str, TensorInfo] | None = None
) -> Iterator[TensorReader]:
    """A `TensorReader` over the safetensors file at `path`, whose header is `infos`
    (validated by `fileformat.read_safetensors_header`, read here when not given). See
    the module docstring for when `map_file` is safe: immutable registry blobs."""
    path = Path(path)
    if infos is None:
        infos = read_safetensors_header(path)
    with open(path, "rb") as f:
        yield TensorReader(path, infos, map_file, f)


def mapped_path(t: Tensor) -> str | None:
    """The file whose map holds `t`'s data, from /proc/self/maps (Linux; None elsewhere,
    or for anonymous memory). A diagnostic for tests and benchmarks."""
    p = t.data_ptr()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= p < hi:
                    path = parts[5].strip() if len(parts) > 5 else ""
                    return path if path.startswith("/") else None
    except OSError:
        return None
    return None


__all__ = ["LoadStats", "TensorReader", "mapped_path", "read_tensors"]
