"""safetensors files read and written without torch (numpy for the little arithmetic needed).

The header is validated by `deltahub.fileformat.read_safetensors_header` (size caps, names,
offsets) before any byte is used. bfloat16, which numpy lacks, is widened to float32
exactly and narrowed back with round-to-nearest-even.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import check_tensor_name, read_safetensors_header

_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


@dataclass
class Raw:
    """One tensor: its safetensors dtype name, shape, and little-endian bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def array(self) -> np.ndarray:
        """The values as a numpy array (bfloat16 widened to float32, exactly)."""
        if self.dtype == "BF16":
            bits = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        if self.dtype not in _NUMPY:
            raise InvalidArtifact("dtype", f"tensor dtype {self.dtype} cannot be converted")
        return np.frombuffer(self.data, dtype=np.dtype(_NUMPY[self.dtype]).newbyteorder("<")).reshape(
            self.shape
        )

    @classmethod
    def of(cls, values: np.ndarray, dtype: str) -> Raw:
        """`values` stored as `dtype` (the dtype of the tensor it was computed from)."""
        if dtype == "BF16":
            f = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
            rounded = (f + 0x7FFF + ((f >> 16) & 1)) >> 16  # round to nearest even
            data = rounded.astype("<u2").tobytes()
        else:
            data = np.ascontiguousarray(values, dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<")).tobytes()
        return cls(dtype, tuple(int(n) for n in values.shape), data)


def comma_name(name: str) -> None:
    """A safe tensor name that may hold commas (AdapterHub names a fusion "a,b")."""
    check_tensor_name(name.replace(",", "_"))


def read(path: Path | str, commas: bool = False) -> dict[str, Raw]:
    """Every tensor of a safetensors file (the header checked first)."""
    infos = read_safetensors_header(path, comma_name if commas else None)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        body = f.read()
    return {k: Raw(i.dtype, tuple(i.shape), body[i.offsets[0] : i.offsets[1]]) for k, i in infos.items()}


def write(path: Path | str, tensors: dict[str, Raw]) -> None:
    """A safetensors file of `tensors` (sorted by name, header padded to 8 bytes)."""
    header: dict[str, object] = {}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        header[name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(t.data)],
        }
        offset += len(t.data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in sorted(tensors):
            f.write(tensors[name].data)
