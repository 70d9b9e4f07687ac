"""An optional scan of an artifact's tensors for non-finite values (NaN, Inf).

NaN weights load and run, and give finite but wrong logits; `publish --check-finite`
refuses them. The scan reads each floating tensor's bytes in bounded chunks through numpy
(never torch: the registry validates without model code). numpy has no bfloat16 or float8,
so those are read as unsigned integers and tested on their exponent bits.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from deltahub.errors import InvalidArtifact
from deltahub.fileformat import TensorInfo

__all__ = ["check_finite"]

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
            np_dtype, non_finite = scan
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
                bad = non_finite(chunk)
                if bad.any():
                    count = int(bad.sum())
                    raise InvalidArtifact(
                        "tensor-non-finite",
                        f"tensor {info.name!r} ({info.dtype}) holds {count}+ NaN or infinite value(s)",
                    )
