"""Content-addressed blob store: `blobs/sha256/<2 hex>/<64 hex>`.

A blob becomes visible only whole: bytes are hashed while they are copied into
`tmp/`, fsynced, renamed into place with `os.replace`, and the directory is fsynced.
Two writers of the same bytes race harmlessly: both renames carry the same content.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from deltahub.errors import IntegrityError, NotFound

CHUNK = 1 << 20
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise IntegrityError(f"{digest!r} is not a digest of the form sha256:<64 hex digits>")
    return digest


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        hexd = check_digest(digest).split(":", 1)[1]
        return self.blobs / hexd[:2] / hexd

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def open(self, digest: str) -> BinaryIO:
        try:
            return open(self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not in the store (run `deltahub verify`)") from None

    def put_stream(self, stream: BinaryIO, expected: str | None = None) -> tuple[str, int]:
        """Copy a stream into the store; return (digest, size).

        With `expected`, a mismatch raises `IntegrityError` and nothing is stored.
        """
        h = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, prefix=f"blob-{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = "sha256:" + h.hexdigest()
            if expected is not None and digest != expected:
                raise IntegrityError(f"received bytes hash to {digest}, expected {expected}")
            final = self.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_name, final)
            fsync_dir(final.parent)
            return digest, size
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)

    def put_file(self, path: Path | str) -> tuple[str, int]:
        with open(path, "rb") as f:
            return self.put_stream(f)

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        import io

        return self.put_stream(io.BytesIO(data))

    def digests(self) -> Iterator[str]:
        for sub in sorted(self.blobs.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    if re.fullmatch(r"[0-9a-f]{64}", f.name):
                        yield "sha256:" + f.name

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def stale_tmp(self, older_than: float) -> list[Path]:
        """Temp files older than `older_than` seconds, or whose writing process is gone."""
        cutoff = time.time() - older_than
        stale = []
        for p in self.tmp.iterdir():
            try:
                old = p.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if old or not writer_alive(p.name):
                stale.append(p)
        return stale

    def sweep_tmp(self, older_than: float) -> int:
        """Remove what `stale_tmp` finds; return how many went."""
        stale = self.stale_tmp(older_than)
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


def writer_alive(tmp_name: str) -> bool:
    """Whether the process that named a temp file `blob-<pid>-...` may still be writing it.

    Names without a pid (older releases) count as alive: only their age can retire them.
    """
    m = re.fullmatch(r"blob-(\d+)-.*", tmp_name)
    if not m:
        return True
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
