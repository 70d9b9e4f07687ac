"""The bytes of an artifact's files, checked before anything is parsed further.

The weights file's safetensors header is read and validated here rather than by the
safetensors library, because that library lets a duplicate key silently win and every
rule broken must be reported by name (`InvalidArtifact.rule`). The small JSON files
(config, manifest) are read strictly too: size cap, UTF-8, no duplicate keys. Pickle is
refused by suffix and by magic bytes.

Torch-free: the registry and the method schemas read headers without model code.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltahub.errors import InvalidArtifact
from deltahub.settings import MAX_HEADER_BYTES, MAX_NAME_LENGTH, MAX_TENSORS

# A classification head trained with an adapter (deltahub train/fuse) is stored beside it
# in adapter_model.safetensors under this prefix; it is not a delta of the base, and
# method schemas and loaders skip it.
TASK_HEAD_PREFIX = "deltahub_head."

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Pickle protocol 2+ starts with 0x80 <proto>; torch.save zips start with "PK\x03\x04".
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

# Tensor names: dotted identifiers (PEFT's keys), never a path.
# Bounds that keep every reader (torch included) inside its integer types.
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_INT_DIGITS = 30
MAX_JSON_DEPTH = 64

TENSOR_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def short(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidArtifact("duplicate-key", f"key {short(key)} appears more than once")
        seen[key] = value
    return seen


class _NotStrict(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotStrict(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrict(f"{short(text)} is out of a float's range")
    return value


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NotStrict(f"an integer of {len(text)} digits (limit {MAX_INT_DIGITS})")
    return int(text)


def depth(value: Any) -> int:
    """Levels of nesting, counted without recursion."""
    levels, level = 0, [value]
    while level:
        levels += 1
        level = [
            c
            for v in level
            for c in (v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
        ]
    return levels


def loads_strict(raw: bytes, what: str, rule: str) -> Any:
    """Parse JSON strictly: UTF-8, no duplicate keys, no NaN or Infinity (not JSON; they
    break every reader downstream), integers of at most `MAX_INT_DIGITS` digits, at most
    `MAX_JSON_DEPTH` levels. Anything else is `InvalidArtifact(rule)` naming `what`."""
    try:
        value = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_small_int,
        )
    except InvalidArtifact:
        raise
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise InvalidArtifact(rule, f"{what} is not valid JSON: {short(str(e), 200)}") from None
    except RecursionError:
        raise InvalidArtifact(rule, f"{what} nests deeper than JSON readers allow") from None
    if depth(value) > MAX_JSON_DEPTH:
        raise InvalidArtifact(rule, f"{what} nests more than {MAX_JSON_DEPTH} levels")
    return value


def check_tensor_name(name: str) -> None:
    """Raise `InvalidArtifact("unsafe-name")` unless `name` is a plain dotted identifier."""
    if (
        not isinstance(name, str)
        or len(name) > MAX_NAME_LENGTH
        or not TENSOR_NAME_RE.match(name)
        or ".." in name
    ):
        raise InvalidArtifact(
            "unsafe-name",
            f"tensor name {name!r} is not a dotted identifier "
            "(letters, digits, '_', '.', '-'; no '..', no '/', no control characters)",
        )


def check_not_pickle(path: Path) -> None:
    """Refuse pickle files by suffix and by magic bytes."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidArtifact(
            "pickle-file",
            f"{path.name} is a pickle file; deltahub loads safetensors only "
            "(convert it with safetensors.torch.save_file)",
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if any(head.startswith(m) for m in PICKLE_MAGIC):
        raise InvalidArtifact("pickle-file", f"{path.name} holds pickle/zip bytes, not safetensors or JSON")


def read_safetensors_header(
    path: Path | str, check_name: Callable[[str], None] | None = None
) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without loading any tensor.

    `check_name` replaces `check_tensor_name` for a foreign format whose names differ
    (AdapterHub's fusion keys hold a comma); nothing else is relaxed.

    Rules: header length at most 1 MiB, at most 100,000 tensors, valid UTF-8 JSON, no
    duplicate keys, safe names, known dtypes, byte ranges that match the shapes and tile
    the data section exactly (no gaps, no overlaps), file size consistent.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidArtifact("truncated", f"{path.name} is {size} bytes, too short for a header")
        # A header length such as 640 (b"\x80\x02...") looks like pickle magic; a real
        # safetensors header then starts with "{".
        if any(prefix.startswith(m) for m in PICKLE_MAGIC) and f.read(1) != b"{":
            raise InvalidArtifact("pickle-file", f"{path.name} holds pickle/zip bytes, not safetensors")
        f.seek(8)
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise InvalidArtifact(
                "header-too-large", f"{path.name} declares a {n}-byte header (limit {MAX_HEADER_BYTES})"
            )
        if 8 + n > size:
            raise InvalidArtifact(
                "truncated", f"{path.name} declares a {n}-byte header but the file is {size} bytes"
            )
        raw = f.read(n)
    header = loads_strict(raw, f"{path.name} header", "header-json")
    if not isinstance(header, dict):
        raise InvalidArtifact("header-json", f"{path.name} header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidArtifact("header-metadata", "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise InvalidArtifact(
            "too-many-tensors", f"{path.name} has {len(header)} tensors (limit {MAX_TENSORS})"
        )
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        (check_name or check_tensor_name)(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise InvalidArtifact("header-entry", f"tensor {name!r} needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise InvalidArtifact("dtype", f"tensor {name!r} has unknown dtype {short(dtype)}")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_NDIM
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)
        ):
            raise InvalidArtifact(
                "shape",
                f"tensor {name!r} has invalid shape {short(shape)} "
                f"(at most {MAX_NDIM} dimensions of at most {MAX_DIM})",
            )
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise InvalidArtifact("offsets", f"tensor {name!r} has invalid data_offsets {short(offsets)}")
        info = TensorInfo(name, dtype, tuple(shape), (offsets[0], offsets[1]))
        if info.nbytes != info.numel * DTYPE_BYTES[dtype]:
            raise InvalidArtifact(
                "offsets",
                f"tensor {name!r}: {info.nbytes} bytes for shape {list(shape)} of {dtype} "
                f"(expected {info.numel * DTYPE_BYTES[dtype]})",
            )
        tensors[name] = info
    end = 0
    for info in sorted(tensors.values(), key=lambda t: t.offsets):
        if info.offsets[0] != end:
            rule = "overlapping-offsets" if info.offsets[0] < end else "offsets-gap"
            raise InvalidArtifact(rule, f"tensor {info.name!r} starts at {info.offsets[0]}, expected {end}")
        end = info.offsets[1]
    if 8 + n + end != size:
        rule = "truncated" if 8 + n + end > size else "trailing-bytes"
        raise InvalidArtifact(rule, f"{path.name} is {size} bytes; its header describes {8 + n + end}")
    return tensors


def read_json_file(path: Path, limit: int, rule: str) -> dict[str, Any]:
    """Read a small JSON object file strictly (size cap, no duplicate keys)."""
    check_not_pickle(path)
    size = path.stat().st_size
    if size > limit:
        raise InvalidArtifact(rule, f"{path.name} is {size} bytes (limit {limit})")
    data = loads_strict(path.read_bytes(), path.name, rule)
    if not isinstance(data, dict):
        raise InvalidArtifact(rule, f"{path.name} must hold a JSON object")
    return data
