"""Content-addressed blob store: `blobs/sha256/<2 hex>/<64 hex>`.

A blob becomes visible only whole: bytes are hashed while they are copied into
`tmp/`, fsynced, renamed into place with `os.replace`, and the directory is fsynced.
Two writers of the same bytes race harmlessly: both renames carry the same content.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from deltahub.errors import DeltahubError, IntegrityError, NotFound, ReadOnly, StorageFull

CHUNK = 1 << 20
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")  # fullmatch: no trailing newline


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise IntegrityError(f"{digest!r} is not a digest of the form sha256:<64 hex digits>")
    return digest


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def storage_error(e: OSError, root: Path) -> DeltahubError | None:
    """The one-line error for a full or read-only disk (None for anything else)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on the disk of {root}: free some (`deltahub gc`) and try again")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ReadOnly(f"{root} is read-only here: reading works, writing needs a writable DELTAHUB_HOME")
    return None


# Blobs whose bytes this process has hashed, keyed by what a rewrite would change.
_verified: set[tuple[int, int, int, int, str]] = set()
_verified_lock = threading.Lock()


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
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only home that lacks them: reads find nothing
            if storage_error(e, self.root) is None:
                raise

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

    def verified_path(self, digest: str) -> Path:
        """The blob's path, after checking once per process that its bytes hash to `digest`.

        The check is cached by (device, inode, size, mtime): a blob rewritten in place or
        replaced is hashed again; an untouched one costs a `stat`.
        """
        path = self.path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IntegrityError(f"blob {digest} is missing from the store (run `deltahub verify`)") from None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest)
        if key in _verified:
            return path
        actual = sha256_file(path)
        if actual != digest:
            raise IntegrityError(
                f"blob {digest} is corrupt: its bytes hash to {actual} (run `deltahub verify`)"
            )
        with _verified_lock:
            _verified.add(key)
        return path

    def put_stream(
        self, stream: BinaryIO, expected: str | None = None, created: list[str] | None = None
    ) -> tuple[str, int]:
        """Copy a stream into the store; return (digest, size).

        With `expected`, a mismatch raises `IntegrityError` and nothing is stored. A full
        or read-only disk raises `StorageFull` or `ReadOnly`. The digest is appended to
        `created` when this call made the blob (it was not in the store before), so a
        failed operation can take back what it added.
        """
        try:
            return self._put_stream(stream, expected, created)
        except OSError as e:
            mapped = storage_error(e, self.root)
            if mapped is None:
                raise
            raise mapped from None

    def _put_stream(
        self, stream: BinaryIO, expected: str | None, created: list[str] | None
    ) -> tuple[str, int]:
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
            existed = final.exists()
            os.replace(tmp_name, final)
            fsync_dir(final.parent)
            if created is not None and not existed:
                created.append(digest)
            return digest, size
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)

    def put_file(self, path: Path | str, created: list[str] | None = None) -> tuple[str, int]:
        with open(path, "rb") as f:
            return self.put_stream(f, created=created)

    def put_bytes(self, data: bytes, created: list[str] | None = None) -> tuple[str, int]:
        import io

        return self.put_stream(io.BytesIO(data), created=created)

    def digests(self) -> Iterator[str]:
        for sub in sorted(self.blobs.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    if re.fullmatch(r"[0-9a-f]{64}", f.name):
                        yield "sha256:" + f.name

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def stale_tmp(self, older_than: float) -> list[Path]:
        """Temp files nobody will finish: their writing process is gone (whatever their age).

        A file whose writer still runs stays however short `older_than` is (unless it is
        over a day old: a recycled pid); one without a pid in its name goes by age alone.
        """
        now = time.time()
        stale = []
        for p in self.tmp.iterdir():
            alive = writer_alive(p.name)
            if alive is False:
                stale.append(p)
                continue
            try:
                mtime = p.stat().st_mtime
            except FileNotFoundError:
                continue
            if mtime < now - (max(older_than, RECYCLED_PID_S) if alive else older_than):
                stale.append(p)
        return stale

    def sweep_tmp(self, older_than: float) -> int:
        """Remove what `stale_tmp` finds; return how many went."""
        stale = self.stale_tmp(older_than)
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)


RECYCLED_PID_S = 86400.0


def writer_alive(tmp_name: str) -> bool | None:
    """Whether the process that named a temp file `blob-<pid>-...` still runs (None: no pid)."""
    m = re.fullmatch(r"blob-(\d+)-.*", tmp_name)
    if not m:
        return None
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
