"""Facts about stored blobs, learned while they upload, so a commit reads no tensor data.

A commit checks a version's files (safetensors header, config and manifest schemas, the
NaN/Inf scan). With the blobs on S3 that used to mean downloading every blob again. Now
each upload streams through a `StreamScan` (tensorscan.py) beside the hash, and once the
blob has landed under its digest the hub records, per digest, in a `blob_facts` table of
its metadata store (hub.db, or the PostgreSQL database: every server process sees it):

    size        bytes
    etag        the S3 object's ETag when the facts were taken (None for a local blob)
    head        the file's leading bytes that the header check reads (8-byte length +
                header, at most ~1 MiB; `tensorscan.head_length`)
    tensors     [[name, dtype, shape], ...] from the header, or None (not safetensors)
    finite      true / false / None (no verdict), and `bad`: [name, dtype, count]

At commit (`commit_view`) the weights file becomes a local stand-in: its real leading
bytes, then a hole up to its real size (a sparse file), so `read_safetensors_header`
runs unchanged and raises the same typed errors; JSON files are small and fetched whole
(hash-checked). Facts are trusted only while the object's size and ETag are those they
were taken with (one HEAD); otherwise, or when there are none (a blob uploaded by an
older server, or copied in by `hub copy`), the blob is streamed once through the same
scan and hash, and the facts recorded for next time.

The table is this module's own (created on first use, on either engine), keyed by a
content digest: facts of one digest are the same whoever records them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltahub import artifact as af
from deltahub.hub.responses import CorruptBlob, log
from deltahub.tensorscan import ScanResult, StreamScan, check_finite

MAX_JSON_FETCH = 4 << 20  # a JSON file over this fails its size check without being read

_SQLITE_DDL = (
    "create table if not exists blob_facts (digest text primary key, size integer not null,"
    " etag text, head blob not null, tensors text, finite integer, bad text, recorded real not null)"
)
_PG_DDL = (
    "create table if not exists blob_facts (digest text primary key, size bigint not null,"
    " etag text, head bytea not null, tensors text, finite boolean, bad text,"
    " recorded double precision not null)"
)
_COLUMNS = "digest, size, etag, head, tensors, finite, bad, recorded"


@dataclass(frozen=True)
class Facts:
    digest: str
    scan: ScanResult
    etag: str | None


# ----------------------------------------------------------------------------- storage


def _is_pg(handle: Any) -> bool:
    return not hasattr(handle, "db")  # the embedded handle holds hub.db as `db`


@contextlib.contextmanager
def _pg_conn(handle: Any) -> Iterator[Any]:
    session = getattr(handle, "session", None)  # a pooled store lends one per block
    if session is None:
        yield handle.conn
        return
    with session() as conn:
        yield conn


def _run(handle: Any, sql: str, params: list[Any]) -> Any:
    """Run one statement, creating the table on first use; the first row it returns."""
    if _is_pg(handle):
        import psycopg

        sql = sql.replace("?", "%s")
        with _pg_conn(handle) as conn:
            try:
                cur = conn.execute(sql, params)
            except psycopg.errors.UndefinedTable:
                # two processes may create it at once: the loser's error is harmless
                with contextlib.suppress(psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                    conn.execute(_PG_DDL)
                cur = conn.execute(sql, params)
            return cur.fetchone() if cur.description else None
    import sqlite3

    conn = handle.db.conn
    try:
        with conn:
            cur = conn.execute(sql, params)
            return cur.fetchone() if cur.description else None
    except sqlite3.OperationalError as e:
        if "no such table" not in str(e):
            raise
    with conn:
        conn.execute(_SQLITE_DDL)
        cur = conn.execute(sql, params)
        return cur.fetchone() if cur.description else None


def _db_errors(handle: Any) -> tuple[type[Exception], ...]:
    if _is_pg(handle):
        import psycopg

        return (psycopg.Error,)
    import sqlite3

    return (sqlite3.Error,)


def get(handle: Any, digest: str) -> Facts | None:
    """The recorded facts of a blob; None if there are none, or the table cannot be read
    (a database role without CREATE: commits then scan, as before facts)."""
    try:
        row = _run(handle, f"select {_COLUMNS} from blob_facts where digest = ?", [digest])
    except _db_errors(handle):
        log.warning("blob facts unreadable; checking blob %s by reading it", digest, exc_info=True)
        return None
    if row is None:
        return None
    if isinstance(row, dict):
        row = [row[c.strip()] for c in _COLUMNS.split(",")]
    _, size, etag, head, tensors, finite, bad, _ = row
    scan = ScanResult(
        size=int(size),
        head=bytes(head),
        tensors=json.loads(tensors) if tensors is not None else None,
        finite=None if finite is None else bool(finite),
        bad=tuple(json.loads(bad)) if bad else None,  # type: ignore[arg-type]
    )
    return Facts(digest, scan, etag)


def put(handle: Any, digest: str, scan: ScanResult, etag: str | None) -> None:
    """Record (or refresh) the facts of a blob that is stored under `digest`."""
    finite = None if scan.finite is None else (scan.finite if _is_pg(handle) else int(scan.finite))
    params = [
        digest,
        scan.size,
        etag,
        scan.head,
        json.dumps(scan.tensors) if scan.tensors is not None else None,
        finite,
        json.dumps(list(scan.bad)) if scan.bad else None,
        time.time(),
    ]
    marks = ", ".join("?" * len(params))
    if _is_pg(handle):
        sets = ", ".join(
            f"{c} = excluded.{c}" for c in ("size", "etag", "head", "tensors", "finite", "bad", "recorded")
        )
        _run(
            handle,
            f"insert into blob_facts ({_COLUMNS}) values ({marks}) on conflict (digest) do update set {sets}",
            params,
        )
    else:
        _run(handle, f"insert or replace into blob_facts ({_COLUMNS}) values ({marks})", params)


def forget(handle: Any, digest: str) -> None:
    """Drop a blob's facts (the next commit that needs them scans the blob again)."""
    _run(handle, "delete from blob_facts where digest = ?", [digest])


# ----------------------------------------------------------------------------- uploads


class ScanningReader:
    """A `read()` that passes a reader's bytes through, feeding a `StreamScan` on the way."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.scan = StreamScan()

    def read(self, n: int = -1) -> bytes:
        chunk = self.reader.read(n)
        if chunk:
            self.scan.update(chunk)
        return chunk


def record_upload(store: Any, handle: Any, digest: str, reader: ScanningReader) -> None:
    """After `digest` landed from `reader`'s bytes: record what its scan saw.

    Facts only spare a commit a download: failing to record them fails nothing (logged).
    """
    try:
        _, etag = store.stat(digest)
        put(handle, digest, reader.scan.finish(), etag)
    except Exception:  # the blob is stored; a commit without facts scans it itself
        log.warning("facts of blob %s not recorded", digest, exc_info=True)


# ----------------------------------------------------------------------------- commits


def _scan_stream(store: Any, handle: Any, digest: str, etag: str | None) -> Facts:
    """Stream a stored blob once through the hash and the scan; record its facts."""
    h, scan = hashlib.sha256(), StreamScan()
    for chunk in store.chunks(digest):
        h.update(chunk)
        scan.update(chunk)
    if "sha256:" + h.hexdigest() != digest:
        raise CorruptBlob(f"blob {digest} is corrupt on this hub (its bytes no longer match)")
    result = scan.finish()
    try:
        put(handle, digest, result, etag)
    except _db_errors(handle):
        log.warning("facts of blob %s not recorded", digest, exc_info=True)
    return Facts(digest, result, etag)


def facts_for(store: Any, handle: Any, digest: str, stat: tuple[int, str | None] | None = None) -> Facts:
    """Facts of a stored blob that still describe it (scanned now if none do); `stat`:
    its (size, ETag) if the caller just asked the store."""
    size, etag = stat or store.stat(digest)
    facts = get(handle, digest)
    if facts is not None and facts.scan.size == size and facts.etag == etag:
        return facts
    return _scan_stream(store, handle, digest, etag)


def _stand_in(path: Path, head: bytes, size: int) -> None:
    """A sparse file: the real leading bytes, then a hole to the real size."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


@contextlib.contextmanager
def commit_view(
    store: Any, handle: Any, files: dict[str, str], stats: dict[str, Any] | None = None
) -> Iterator[tuple[dict[str, Path], Facts | None]]:
    """Local paths for a commit's checks, and the weights' facts (None: not known yet).

    A local store's blobs are files already. From S3 the JSON files (and a README) come
    whole and hash-checked; the weights as a stand-in from their facts (see above).
    `stats`: {digest: (size, ETag)} the caller already has (saves a HEAD per blob).
    """
    stats = stats or {}
    weights = files.get(af.WEIGHTS_FILE)
    if store.kind == "local":
        facts = get(handle, weights) if weights else None
        yield {f: store.path(d) for f, d in files.items()}, facts
        return
    tmp = Path(tempfile.mkdtemp(prefix="deltahub-commit-"))
    try:
        paths, facts = {}, None
        for fname, digest in files.items():
            path = paths[fname] = tmp / fname
            if fname == af.WEIGHTS_FILE:
                facts = facts_for(store, handle, digest, stats.get(digest))
                _stand_in(path, facts.scan.head, facts.scan.size)
                continue
            size = (stats.get(digest) or store.stat(digest))[0]
            if fname.endswith(".json") and size > MAX_JSON_FETCH:
                _stand_in(path, b"", size)  # fails its size check unread
            else:
                path.write_bytes(store.read_bytes(digest))
        yield paths, facts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_weights_finite(
    store: Any, files: dict[str, str], paths: dict[str, Path], facts: Facts | None, tensors: dict[str, Any]
) -> None:
    """Refuse NaN or infinity in the weights (`tensor-non-finite`), after the header check.

    From the facts where they hold a verdict; otherwise by scanning the file (local) or
    a download of it (S3, only if the upload's scan reached no verdict).
    """
    if facts is not None and facts.scan.finite is not None:
        error = facts.scan.error()
        if error is not None:
            raise error
        return
    digest = files[af.WEIGHTS_FILE]
    if store.kind == "local":
        check_finite(paths[af.WEIGHTS_FILE], tensors)
        return
    tmp = Path(tempfile.mkdtemp(prefix="deltahub-scan-"))
    try:
        path = tmp / af.WEIGHTS_FILE
        with open(path, "wb") as f:
            for chunk in store.chunks(digest):
                f.write(chunk)
        check_finite(path, tensors)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
