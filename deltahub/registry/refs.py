"""References: `[namespace/]name[@version|@tag|@sha256:<digest prefix>]`.

A bare `name` means `name@latest`. Versions are integers by default (1, 2, ...) or an
explicit string such as `1.2.0`; tags are names that start with a letter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deltahub.errors import InvalidRef

_PART = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
# Matched with `fullmatch`: `$` would also match before a trailing newline ("team/y\n").
NAME_RE = re.compile(rf"(?:(?P<ns>{_PART})/)?(?P<name>{_PART})")
VERSION_RE = re.compile(r"[0-9][A-Za-z0-9_.+\-]{0,63}")
TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")
DIGEST_PREFIX_RE = re.compile(r"sha256:[0-9a-f]{6,64}")


@dataclass(frozen=True)
class Ref:
    """A parsed reference. `selector` is a version, a tag or a digest prefix."""

    namespace: str | None
    name: str
    selector: str = "latest"

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def kind(self) -> str:
        if self.selector.startswith("sha256:"):
            return "digest"
        if VERSION_RE.fullmatch(self.selector):
            return "version"
        return "tag"

    def __str__(self) -> str:
        return f"{self.full_name}@{self.selector}"


def check_name(full_name: str) -> tuple[str | None, str]:
    m = NAME_RE.fullmatch(full_name or "")
    if not m or ".." in full_name:
        raise InvalidRef(
            f"{full_name!r} is not an adapter name: use [namespace/]name with letters, digits, "
            "'_', '.', '-' (starting with a letter or digit)"
        )
    return m.group("ns"), m.group("name")


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidRef(f"version {version!r} must start with a digit (e.g. 3 or 1.2.0)")
    return version


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag):
        raise InvalidRef(f"tag {tag!r} must start with a letter (letters, digits, '_', '.', '-')")
    return tag


def parse_ref(text: str) -> Ref:
    if not isinstance(text, str) or not text:
        raise InvalidRef("an empty reference: use [namespace/]name[@version|@tag|@sha256:digest]")
    name_part, _, selector = text.partition("@")
    ns, name = check_name(name_part)
    if "@" in text and not selector:
        raise InvalidRef(f"{text!r} ends in '@': add a version, tag or sha256:digest")
    selector = selector or "latest"
    if selector.startswith("sha256:"):
        if not DIGEST_PREFIX_RE.fullmatch(selector):
            raise InvalidRef(f"{selector!r}: a digest selector is sha256: and 6 to 64 lowercase hex digits")
    elif not (VERSION_RE.fullmatch(selector) or TAG_RE.fullmatch(selector)):
        raise InvalidRef(
            f"{selector!r} is neither a version (starts with a digit) nor a tag (starts with a letter)"
        )
    return Ref(ns, name, selector)
