"""Resident adapters' tensors as views of their blob's memory map, not copies.

`safetensors.safe_open(path, framework="pt")` maps the whole file once, privately
(`torch.UntypedStorage.from_file(path, shared=False)`: `mmap(MAP_PRIVATE)`, the file
descriptor closed right away), and `get_tensor` returns views into that map (safetensors
0.4 to 0.8; `tests/test_resident_mapped.py` keeps checking it). An adapter whose tensors
need no dtype or device change therefore holds them as pages of its file: a load costs
the header and the Python objects, RSS grows only by the pages a forward or a copy into a
routing slot (`compose.slots`) reads, and those are clean file pages the kernel may drop
again. A thousand resident LoRAs cost a thousand maps, not a thousand copies.

Which files may stay mapped: registry blobs only (`map_file=True`). A blob is content
addressed and never written in place: the store writes a new file and renames it over
(a new inode) and `gc` unlinks (the map keeps the old inode alive). A file rewritten in
place under a map changes the adapter silently, and a truncated one kills the process
with SIGBUS on the next read. Artifact directories (`AdaptedModel.load_path`) are
rewritten in place by ordinary tools (`cp`, a trainer saving its checkpoint), so their
tensors are copied into process memory.

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
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn


@dataclass
class LoadStats:
    """What one loaded adapter holds: tensors viewing its file's map, and copies."""

    mapped: int = 0  # tensors held as views of the file's map
    mapped_bytes: int = 0
    copied: int = 0  # tensors in process memory (cast, moved, transformed, or not a blob)
    copied_bytes: int = 0
    misaligned: int = 0  # of the copies: offset in the file not a multiple of the element size


class TensorReader:
    """`get(key)`: the tensor `key` of a safetensors file, a view of the file's map when
    `map_file` (and aligned), else a copy in process memory."""

    def __init__(self, handle: object, map_file: bool) -> None:
        self._handle = handle
        # Views need the file's bytes in the machine's order (safetensors is little-endian).
        self.map_file = map_file and sys.byteorder == "little"
        self.misaligned = 0
        self._spans: list[tuple[int, int]] = []  # (start, end) addresses of the views handed out

    def get(self, key: str) -> Tensor:
        t: Tensor = self._handle.get_tensor(key)  # type: ignore[attr-defined]
        if not self.map_file:
            return t.clone()
        if t.data_ptr() % t.element_size():
            self.misaligned += 1
            return t.clone()
        start = t.data_ptr()
        self._spans.append((start, start + t.numel() * t.element_size()))
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
def read_tensors(path: str | Path, map_file: bool) -> Iterator[TensorReader]:
    """A `TensorReader` over the safetensors file at `path` (see the module docstring for
    when `map_file` is safe: immutable registry blobs)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        yield TensorReader(handle, map_file)


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
