"""deltahub.json, the manifest: who an adapter is, what it was made from, how well it does.

A `Manifest` is a typed dataclass validated on construction; `Parent` pins one ancestor
(merged from, fused from, trained from) by digest. Torch-free.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from deltahub import __version__
from deltahub.errors import InvalidArtifact
from deltahub.fileformat import MAX_JSON_DEPTH, depth, short


@dataclass(frozen=True)
class Parent:
    """A pinned ancestor: what this version was merged, fused or trained from."""

    ref: str
    digest: str
    role: str = "parent"

    def __post_init__(self) -> None:
        if not isinstance(self.digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", self.digest):
            raise InvalidArtifact(
                "manifest-schema", f"parent digest {short(self.digest)} is not sha256:<64 hex>"
            )
        for key in ("ref", "role"):
            if not isinstance(getattr(self, key), str):
                raise InvalidArtifact(
                    "manifest-schema", f"parent {key} must be a string, got {short(getattr(self, key))}"
                )


_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95})?")


def portable_base_id(value: str | None) -> str | None:
    """`value` when it names a model anyone can fetch (a hub id, `org/name` or `name`), None
    when it is a local path (absolute, relative, home-relative, or with more than one
    `/`): a path means nothing on another machine and would show a user's directories to
    every hub user. A Hugging Face cache path gives back its repository id."""
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)(?:[/\\]|$)", value)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if value.startswith((".", "/", "~", "\\")) or re.match(r"[A-Za-z]:[\\/]", value):
        return None
    return value if _HUB_ID_RE.fullmatch(value) else None


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
            raise bad(f"name must be a non-empty string, got {short(self.name)}")
        if not isinstance(self.method, str) or not self.method:
            raise bad(f"method must be a non-empty string, got {short(self.method)}")
        for key in ("version", "base_model", "base_fingerprint", "task", "license"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise bad(f"{key} must be a string or null, got {short(value)}")
        for key in ("description", "created", "tool_version"):
            if not isinstance(getattr(self, key), str):
                raise bad(f"{key} must be a string, got {short(getattr(self, key))}")
        if not isinstance(self.format, int) or isinstance(self.format, bool):
            raise bad(f"format must be an integer, got {short(self.format)}")
        if not isinstance(self.metrics, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in self.metrics.items()
        ):
            raise bad(f"metrics must map names to numbers, got {short(self.metrics)}")
        for k, v in self.metrics.items():
            if not math.isfinite(v):  # NaN is not JSON: every reader of the manifest would fail
                raise bad(f"metric {short(k)} is {v}; metrics must be finite numbers")
        if not isinstance(self.extra, dict):
            raise bad("extra must be an object")
        if not isinstance(self.parents, list):
            raise bad(f"parents must be a list, got {short(self.parents)}")
        try:  # extra holds anything JSON can: finite numbers, bounded nesting
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as e:
            raise bad(f"extra must hold plain JSON with finite numbers ({short(str(e), 200)})") from None
        if depth(self.extra) > MAX_JSON_DEPTH:
            raise bad(f"extra nests more than {MAX_JSON_DEPTH} levels")
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
