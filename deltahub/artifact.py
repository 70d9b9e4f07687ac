"""The adapter artifact: its files, its manifest, and strict validation.

An adapter version is a directory of three files:

    adapter_model.safetensors   the weights (safetensors only; pickle is never loaded)
    adapter_config.json         PEFT's LoRA config, or {"method": ..., ...} for others
    deltahub.json               the manifest (`Manifest`)

A PEFT LoRA directory (no deltahub.json) is a valid input; its manifest is built from
its config at publish time. Validation reads the safetensors header itself rather than
trusting the safetensors library, because that library lets a duplicate key silently win
and we want every rule broken to be reported by name (`InvalidArtifact.rule`).

Nothing here imports torch: the registry validates artifacts without model code.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deltahub import __version__
from deltahub.errors import InvalidArtifact
from deltahub.settings import (
    MAX_CONFIG_BYTES,
    MAX_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_NAME_LENGTH,
    MAX_TENSORS,
)

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "deltahub.json"
README_FILE = "README.md"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE)
KNOWN_FILES = (WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE, README_FILE)

# A classification head trained with an adapter (deltahub train/fuse) is stored beside it
# in adapter_model.safetensors under this prefix; it is not a delta of the base.
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
TENSOR_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


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


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidArtifact("duplicate-key", f"key {key!r} appears more than once")
        seen[key] = value
    return seen


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


def read_safetensors_header(path: Path | str) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without loading any tensor.

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
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except InvalidArtifact:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArtifact("header-json", f"{path.name} header is not JSON: {e}") from None
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
        check_tensor_name(name)
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise InvalidArtifact("header-entry", f"tensor {name!r} needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise InvalidArtifact("dtype", f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise InvalidArtifact("shape", f"tensor {name!r} has invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise InvalidArtifact("offsets", f"tensor {name!r} has invalid data_offsets {offsets!r}")
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
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except InvalidArtifact:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArtifact(rule, f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidArtifact(rule, f"{path.name} must hold a JSON object")
    return data


# --------------------------------------------------------------------------- configs

ConfigChecker = Callable[[dict[str, Any], dict[str, TensorInfo]], None]
_CONFIG_CHECKERS: dict[str, ConfigChecker] = {}


def register_config_checker(method: str, checker: ConfigChecker) -> None:
    """Register the schema/shape check for one method's adapter_config.json."""
    _CONFIG_CHECKERS[method] = checker


def method_of(config: dict[str, Any]) -> str:
    """The deltahub method name of a config: PEFT's `peft_type` lower-cased, or `method`."""
    if "peft_type" in config:
        peft_type = config["peft_type"]
        if not isinstance(peft_type, str):
            raise InvalidArtifact("config-schema", "peft_type must be a string")
        return peft_type.lower()
    method = config.get("method")
    if not isinstance(method, str) or not method:
        raise InvalidArtifact(
            "config-schema", f"{CONFIG_FILE} needs a 'peft_type' (PEFT) or a 'method' (deltahub) field"
        )
    return method


def _need(config: dict[str, Any], key: str, types: tuple[type, ...], what: str) -> Any:
    value = config.get(key)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise InvalidArtifact("config-schema", f"config field {key!r} must be {what}, got {value!r}")
    return value


def module_of(tensor_name: str, marker: str) -> str | None:
    """`a.b.lora_A.weight` -> `a.b` for marker `lora_A`; None if the marker is absent."""
    parts = tensor_name.split(".")
    if marker not in parts:
        return None
    return ".".join(parts[: parts.index(marker)])


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup (`get_pattern_key`): the value of the first
    key k with re.match(rf"(.*\\.)?({k})$", module), else `default`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(config: dict[str, Any], module: str, r: int) -> float:
    """PEFT's scaling s of one LoRA module: alpha / r, or alpha / sqrt(r) with rsLoRA
    (Kalajdzievski 2023), alpha taken per module from alpha_pattern."""
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_lora_config(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """PEFT LoRA: field types, and every lora_A/lora_B pair consistent with `r`."""
    r = _need(config, "r", (int,), "a positive integer")
    if r <= 0:
        raise InvalidArtifact("config-schema", f"config field 'r' must be positive, got {r}")
    _need(config, "lora_alpha", (int, float), "a number")
    tm = config.get("target_modules")
    if tm is not None and not (
        isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))
    ):
        raise InvalidArtifact("config-schema", f"target_modules must be a string or a list, got {tm!r}")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if key in config and not isinstance(config[key], bool):
            raise InvalidArtifact("config-schema", f"config field {key!r} must be true or false")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise InvalidArtifact("config-schema", f"config field {key!r} must be an object")
    rank_pattern = config.get("rank_pattern") or {}
    a_shapes: dict[str, tuple[int, ...]] = {}
    b_shapes: dict[str, tuple[int, ...]] = {}
    for name, info in tensors.items():
        for marker, shapes in (("lora_A", a_shapes), ("lora_B", b_shapes)):
            module = module_of(name, marker)
            if module is not None and name.endswith(".weight"):
                if len(info.shape) < 2:
                    raise InvalidArtifact(
                        "shape-mismatch", f"{name} has shape {list(info.shape)}, expected 2-D"
                    )
                shapes[module] = info.shape
    if not a_shapes:
        raise InvalidArtifact("config-shape", "a LoRA artifact needs at least one lora_A weight")
    if set(a_shapes) != set(b_shapes):
        missing = sorted(set(a_shapes) ^ set(b_shapes))[0]
        raise InvalidArtifact("shape-mismatch", f"module {missing} lacks its lora_A or lora_B weight")
    for module, a in a_shapes.items():
        b = b_shapes[module]
        expected = pattern_value(rank_pattern, module, r)
        if a[0] != expected or b[1] != expected:
            raise InvalidArtifact(
                "shape-mismatch",
                f"module {module}: lora_A {list(a)} and lora_B {list(b)} do not have rank r={expected}",
            )


register_config_checker("lora", check_lora_config)


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Parent:
    """A pinned ancestor: what this version was merged, fused or trained from."""

    ref: str
    digest: str
    role: str = "parent"

    def __post_init__(self) -> None:
        if not isinstance(self.digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", self.digest):
            raise InvalidArtifact("manifest-schema", f"parent digest {self.digest!r} is not sha256:<64 hex>")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Manifest:
    """deltahub.json: who an adapter is, what it was made from, and how well it does."""

    name: str
    method: str
    version: str | None = None
    base_model: str | None = None
    base_fingerprint: str | None = None
    task: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    description: str = ""
    license: str | None = None
    parents: list[Parent] = field(default_factory=list)
    created: str = field(default_factory=utc_now)
    tool_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = 1

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidArtifact:
            return InvalidArtifact("manifest-schema", msg)

        if not isinstance(self.name, str) or not self.name:
            raise bad(f"name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.method, str) or not self.method:
            raise bad(f"method must be a non-empty string, got {self.method!r}")
        for key in ("version", "base_model", "base_fingerprint", "task", "license"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise bad(f"{key} must be a string or null, got {value!r}")
        if not isinstance(self.description, str):
            raise bad("description must be a string")
        if not isinstance(self.metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in self.metrics.items()
        ):
            raise bad(f"metrics must map names to numbers, got {self.metrics!r}")
        if not isinstance(self.extra, dict):
            raise bad("extra must be an object")
        self.parents = [p if isinstance(p, Parent) else Parent(**p) for p in self.parents]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InvalidArtifact("manifest-schema", f"unknown manifest fields {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise InvalidArtifact("manifest-schema", str(e)) from None


# --------------------------------------------------------------------------- artifact


@dataclass
class Artifact:
    """A validated artifact: where its files are, its parsed config, manifest and header.

    `files` maps the artifact file name to where its bytes live (a directory entry, or a
    registry blob). `manifest` is None for a PEFT directory that has no deltahub.json.
    """

    files: dict[str, Path]
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    manifest: Manifest | None = None

    @property
    def method(self) -> str:
        return method_of(self.config)

    @property
    def weights_path(self) -> Path:
        return self.files[WEIGHTS_FILE]


def validate(config: dict[str, Any], tensors: dict[str, TensorInfo]) -> str:
    """Check a config against its schema and the tensor shapes; return the method."""
    method = method_of(config)
    checker = _CONFIG_CHECKERS.get(method)
    if checker is None:
        _ensure_method_checkers()
        checker = _CONFIG_CHECKERS.get(method)
    if checker is None:
        raise InvalidArtifact(
            "unknown-method", f"method {method!r} is not known (known: {sorted(_CONFIG_CHECKERS)})"
        )
    checker(config, tensors)
    return method


def _ensure_method_checkers() -> None:
    # Methods other than LoRA register their checkers in a torch-free module.
    from deltahub import method_schemas  # noqa: F401


def load_files(files: dict[str, Path]) -> Artifact:
    """Validate an artifact given as {artifact file name: path of its bytes}."""
    for name in REQUIRED_FILES:
        if name not in files:
            raise InvalidArtifact("missing-file", f"the artifact has no {name}")
    for name, path in files.items():
        if name not in KNOWN_FILES:
            raise InvalidArtifact(
                "unknown-file", f"{name!r} is not an artifact file ({', '.join(KNOWN_FILES)})"
            )
        if name != WEIGHTS_FILE:
            check_not_pickle(path)
    tensors = read_safetensors_header(files[WEIGHTS_FILE])
    config = read_json_file(files[CONFIG_FILE], MAX_CONFIG_BYTES, "config-json")
    method = validate(config, tensors)
    manifest = None
    if MANIFEST_FILE in files:
        manifest = Manifest.from_dict(
            read_json_file(files[MANIFEST_FILE], MAX_MANIFEST_BYTES, "manifest-json")
        )
        if manifest.method != method:
            raise InvalidArtifact(
                "manifest-schema", f"manifest says method {manifest.method!r}, config says {method!r}"
            )
    return Artifact(files=dict(files), config=config, tensors=tensors, manifest=manifest)


def load_dir(path: Path | str) -> Artifact:
    """Validate an artifact directory (ours or PEFT's) and return it.

    Pickle files anywhere in the directory are refused; other unknown files (a PEFT
    directory's tokenizer files, say) are ignored and not published.
    """
    path = Path(path)
    if not path.is_dir():
        raise InvalidArtifact("not-a-directory", f"{path} is not a directory")
    files: dict[str, Path] = {}
    for entry in sorted(path.iterdir()):
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            check_not_pickle(entry)
        if entry.name in KNOWN_FILES:
            if not entry.is_file() or entry.is_symlink():
                raise InvalidArtifact("not-a-file", f"{entry} must be a regular file, not a link or folder")
            files[entry.name] = entry
    return load_files(files)


def write_dir(
    path: Path | str,
    tensors: dict[str, Any],
    config: dict[str, Any],
    manifest: Manifest | None = None,
) -> Path:
    """Write an artifact directory from torch tensors (contiguous, CPU) and JSON objects."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in tensors:
        check_tensor_name(name)
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
        str(path / WEIGHTS_FILE),
    )
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if manifest is not None:
        (path / MANIFEST_FILE).write_bytes(manifest.to_json())
    return path


def artifact_digest(file_digests: dict[str, str]) -> str:
    """The digest of a version: sha256 of the canonical JSON of {file name: blob digest}.

    It covers the manifest too, so it pins one exact published version; the same files
    always give the same digest.
    """
    import hashlib

    canonical = json.dumps(
        {"files": dict(sorted(file_digests.items()))}, sort_keys=True, separators=(",", ":")
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
