"""The hub's blob store: one small interface, two implementations.

    a directory (default)   `LocalBlobs`: the registry's content-addressed store in the
                            hub's home (`blobs/sha256/ab/<hex>`; registry/store.py)
    s3://bucket/prefix      `S3Blobs`: any S3-compatible object store through boto3
                            (AWS, MinIO, Ceph, R2, moto: `--s3-endpoint-url`)

Both keep the single-process hub's promise: a blob lands under its digest only once its
bytes hash to it. Locally: hash while writing to tmp/, fsync, rename. On S3: hash while
uploading (one PUT once a small blob is whole and checked; a multipart upload to a
temporary key for a large one, then copied to its digest's key only if the hash
matches, the temporary object deleted either way). A server killed mid-upload leaves at
most a temporary object or an unfinished multipart upload, never a wrong blob under a
digest (`deltahub hub verify` lists and removes those leftovers).

Downloads: local blobs are re-hashed whenever their file changed since the last check
(blobs.py). S3 blobs stream through the server, or with `redirect=True`
(`--redirect-downloads`) a GET answers 302 to a presigned URL the client fetches from
the store itself (HEAD still answers here, with the size and digest).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from deltahub.errors import IntegrityError, InvalidConfig, NotFound
from deltahub.hub.responses import CorruptBlob, log
from deltahub.registry.store import BlobStore, check_digest, sha256_file

CHUNK = 1 << 20
PART = 8 << 20  # multipart part size (S3's minimum is 5 MiB); smaller blobs go in one PUT
PRESIGN_SECONDS = 300

StatKey = tuple[int, int, int, int]


def open_blobs(url: str | None, home: Path, meta: Any, **s3: Any) -> LocalBlobs | S3Blobs:
    """The blob store a URL names: none or a path (local directory), or `s3://bucket/prefix`."""
    if not url:
        return LocalBlobs(home, meta)
    if url.startswith("s3://"):
        return S3Blobs(url, **s3)
    path = url[len("file://") :] if url.startswith("file://") else url
    if "://" in path:
        raise InvalidConfig(f"--blobs {url!r} is neither a directory nor s3://BUCKET/PREFIX")
    return LocalBlobs(Path(path), meta)


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def blob_headers(digest: str, public: bool) -> dict[str, str]:
    return {
        "ETag": f'"{digest.split(":", 1)[1]}"',
        "X-Content-Digest": digest,
        # content-addressed: never changes; `private` unless anyone may read it anyway
        "Cache-Control": f"{'public' if public else 'private'}, max-age=31536000, immutable",
    }


class LocalBlobs:
    """Blobs in a directory (a hub home's `blobs/`), checks recorded in the metadata store."""

    kind = "local"

    def __init__(self, root: Path, meta: Any) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.store = BlobStore(self.root)
        self.meta = meta

    def path(self, digest: str) -> Path:
        return self.store.path(digest)

    def has(self, digest: str) -> bool:
        return self.store.has(digest)

    def size(self, digest: str) -> int:
        try:
            return self.store.path(digest).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not on this hub") from None

    def stat(self, digest: str) -> tuple[int, str | None]:
        """(size, version tag): a local blob has no tag (its checks go by `verified`)."""
        return self.size(digest), None

    def put_stream(self, stream: BinaryIO, expected: str | None = None) -> tuple[str, int]:
        digest, size = self.store.put_stream(stream, expected)
        with contextlib.suppress(OSError):  # a concurrent remove; the next serve re-hashes
            self.meta.handle().record_check(digest, _stat_key(self.store.path(digest).stat()))
        return digest, size

    @contextlib.contextmanager
    def local_files(self, files: dict[str, str]) -> Iterator[dict[str, Path]]:
        yield {f: self.store.path(d) for f, d in files.items()}

    def read_bytes(self, digest: str) -> bytes:
        return self.verified(digest)[0].read_bytes()

    def chunks(self, digest: str) -> Iterator[bytes]:
        with self.store.open(digest) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def digests(self) -> Iterator[str]:
        return self.store.digests()

    def remove(self, digest: str) -> None:
        self.store.remove(digest)

    def leftovers(self) -> list[str]:
        return [p.name for p in self.store.stale_tmp(0)]

    def sweep(self, older_than: float = 0) -> int:
        # a temp file whose writing process still runs stays, whatever its age (store.py)
        return self.store.sweep_tmp(older_than)

    def verified(self, digest: str) -> tuple[Path, os.stat_result]:
        """The path of a stored blob whose bytes hash to `digest`, re-hashed if its file changed.

        `NotFound` if absent; `CorruptBlob` (logged with its path) if the bytes do not match.
        """
        path = self.store.path(digest)
        try:
            before = path.stat()
        except FileNotFoundError:
            raise NotFound(f"blob {digest} is not on this hub") from None
        handle = self.meta.handle()
        if handle.checked_key(digest) == _stat_key(before):
            return path, before
        try:
            actual = sha256_file(path)
            after = path.stat()
        except OSError as e:
            log.error("blob %s at %s cannot be read: %s", digest, path, e)
            raise CorruptBlob(f"blob {digest} is unreadable on this hub; not served") from None
        if actual != digest:
            log.error(
                "blob %s at %s hashes to %s: not served (restore it or run `deltahub verify`)",
                digest,
                path,
                actual,
            )
            raise CorruptBlob(f"blob {digest} is corrupt on this hub (its bytes no longer match); not served")
        if _stat_key(after) == _stat_key(before):  # unchanged while hashing: remember the check
            handle.record_check(digest, _stat_key(after))
        return path, after

    def response(
        self,
        digest: str,
        method: str,
        public: bool,
        headers: dict[str, str] | None = None,
        range_header: str | None = None,
    ) -> Response:
        path, stat = self.verified(digest)
        return FileResponse(
            path,
            stat_result=stat,
            media_type="application/octet-stream",
            headers={**blob_headers(digest, public), **(headers or {})},
        )


class S3Blobs:
    """Blobs in an S3 bucket under `prefix/sha256/ab/<hex>`; uploads land only when verified."""

    kind = "s3"

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        redirect: bool = False,
        part_size: int = PART,
    ) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # pragma: no cover - depends on the install
            raise InvalidConfig("an S3 blob store needs boto3: pip install 'deltahub[team]'") from None
        rest = url[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise InvalidConfig(f"--blobs {url!r}: give s3://BUCKET[/PREFIX]")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = url
        self.redirect = redirect
        self.part_size = max(part_size, 5 << 20)
        self.s3 = boto3.client(
            "s3",
            endpoint_url=endpoint_url or os.environ.get("DELTAHUB_S3_ENDPOINT_URL") or None,
            config=Config(
                s3={"addressing_style": "path"},
                max_pool_connections=64,
                retries={"max_attempts": 5, "mode": "standard"},
                signature_version="s3v4",
            ),
        )
        from botocore.exceptions import ClientError

        self._client_error = ClientError
        try:
            self.s3.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            raise InvalidConfig(f"S3 bucket {self.bucket!r} is not reachable: {e}") from None

    def key(self, digest: str) -> str:
        hexd = check_digest(digest).split(":", 1)[1]
        return f"{self.prefix}sha256/{hexd[:2]}/{hexd}"

    def _missing(self, e: Exception) -> bool:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def _head(self, digest: str) -> dict[str, Any] | None:
        try:
            return self.s3.head_object(Bucket=self.bucket, Key=self.key(digest))
        except self._client_error as e:
            if self._missing(e):
                return None
            raise

    def has(self, digest: str) -> bool:
        return self._head(digest) is not None

    def size(self, digest: str) -> int:
        return self.stat(digest)[0]

    def stat(self, digest: str) -> tuple[int, str | None]:
        """(size, ETag) of the stored object: a rewrite of the object changes its ETag."""
        head = self._head(digest)
        if head is None:
            raise NotFound(f"blob {digest} is not on this hub")
        return int(head["ContentLength"]), head.get("ETag")

    def put_stream(self, stream: BinaryIO, expected: str | None = None) -> tuple[str, int]:
        """Upload a stream, hashing as it goes; it lands under its digest only if that matches."""
        h = hashlib.sha256()
        size = 0
        buf = bytearray()
        # the start time in the name: its age, whatever an S3 implementation reports
        tmp_key = f"{self.prefix}tmp/{int(time.time())}-{uuid.uuid4().hex}"
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        completed = False
        try:
            while chunk := stream.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                buf += chunk
                if len(buf) >= self.part_size:
                    if upload_id is None:
                        upload_id = self.s3.create_multipart_upload(Bucket=self.bucket, Key=tmp_key)[
                            "UploadId"
                        ]
                    body = bytes(buf[: self.part_size])
                    del buf[: self.part_size]
                    part = self.s3.upload_part(
                        Bucket=self.bucket,
                        Key=tmp_key,
                        UploadId=upload_id,
                        PartNumber=len(parts) + 1,
                        Body=body,
                    )
                    parts.append({"ETag": part["ETag"], "PartNumber": len(parts) + 1})
            digest = "sha256:" + h.hexdigest()
            if expected is not None and digest != expected:
                raise IntegrityError(f"received bytes hash to {digest}, expected {expected}")
            final = self.key(digest)
            if upload_id is None:  # whole and checked in memory: one atomic PUT to its final key
                if self._head(digest) is None:
                    self.s3.put_object(Bucket=self.bucket, Key=final, Body=bytes(buf))
                return digest, size
            if buf:
                part = self.s3.upload_part(
                    Bucket=self.bucket,
                    Key=tmp_key,
                    UploadId=upload_id,
                    PartNumber=len(parts) + 1,
                    Body=bytes(buf),
                )
                parts.append({"ETag": part["ETag"], "PartNumber": len(parts) + 1})
            self.s3.complete_multipart_upload(
                Bucket=self.bucket, Key=tmp_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            completed = True
            if self._head(digest) is None:
                # managed copy: a server-side multipart copy for objects over 5 GB
                self.s3.copy({"Bucket": self.bucket, "Key": tmp_key}, self.bucket, final)
            return digest, size
        finally:
            if upload_id is not None and not completed:
                with contextlib.suppress(Exception):
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=tmp_key, UploadId=upload_id)
            if completed:
                with contextlib.suppress(Exception):
                    self.s3.delete_object(Bucket=self.bucket, Key=tmp_key)

    def chunks(self, digest: str) -> Iterator[bytes]:
        body = self._get(digest)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def _get(self, digest: str, **kw: Any) -> dict[str, Any]:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self.key(digest), **kw)
        except self._client_error as e:
            if self._missing(e):
                raise NotFound(f"blob {digest} is not on this hub") from None
            raise

    def read_bytes(self, digest: str) -> bytes:
        data = b"".join(self.chunks(digest))
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            log.error(
                "blob %s in s3://%s/%s does not hash to its digest", digest, self.bucket, self.key(digest)
            )
            raise CorruptBlob(f"blob {digest} is corrupt on this hub (its bytes no longer match); not served")
        return data

    @contextlib.contextmanager
    def local_files(self, files: dict[str, str]) -> Iterator[dict[str, Path]]:
        """The blobs as local files (verified), for checks that read files; removed after."""
        tmp = Path(tempfile.mkdtemp(prefix="deltahub-s3-"))
        try:
            out = {}
            for fname, digest in files.items():
                path = tmp / fname
                h = hashlib.sha256()
                with open(path, "wb") as f:
                    for chunk in self.chunks(digest):
                        h.update(chunk)
                        f.write(chunk)
                if "sha256:" + h.hexdigest() != digest:
                    raise CorruptBlob(f"blob {digest} is corrupt on this hub (its bytes no longer match)")
                out[fname] = path
            yield out
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def digests(self) -> Iterator[str]:
        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "sha256/"
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield "sha256:" + obj["Key"].rsplit("/", 1)[-1]

    def remove(self, digest: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self.key(digest))

    def leftovers(self) -> list[str]:
        """Temporary objects and unfinished multipart uploads (a server killed mid-upload)."""
        found = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "tmp/"
        ):
            found += [o["Key"] for o in page.get("Contents", [])]
        uploads = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix + "tmp/")
        found += [f"{u['Key']} (multipart {u['UploadId']})" for u in uploads.get("Uploads", [])]
        return found

    def sweep(self, older_than: float = 0) -> int:
        """Remove temporary objects and abort multipart uploads older than `older_than` seconds.

        Another server's upload in flight looks the same as a dead one here: keep
        `older_than` above the longest upload (the CLI's default is an hour).
        """
        cutoff = time.time() - older_than
        n = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "tmp/"
        ):
            for o in page.get("Contents", []):
                if _started(o["Key"], o["LastModified"].timestamp()) > cutoff:
                    continue
                self.s3.delete_object(Bucket=self.bucket, Key=o["Key"])
                n += 1
        uploads = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix + "tmp/")
        for u in uploads.get("Uploads", []):
            if _started(u["Key"], u["Initiated"].timestamp()) > cutoff:
                continue
            self.s3.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
            n += 1
        return n

    def presigned_url(self, digest: str) -> str:
        return self.s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(digest)}, ExpiresIn=PRESIGN_SECONDS
        )

    def response(
        self,
        digest: str,
        method: str,
        public: bool,
        headers: dict[str, str] | None = None,
        range_header: str | None = None,
        if_match: str | None = None,
    ) -> Response:
        """`if_match`: the ETag the blob was checked at; a GET streams only that object
        (S3 answers 412 if it was replaced since, which is a corrupt blob here)."""
        base = {**blob_headers(digest, public), **(headers or {})}
        if method == "HEAD":
            size = self.size(digest)
            return Response(
                status_code=200,
                headers={**base, "Content-Length": str(size), "Accept-Ranges": "bytes"},
                media_type="application/octet-stream",
            )
        if self.redirect:
            if not self.has(digest):
                raise NotFound(f"blob {digest} is not on this hub")
            return RedirectResponse(self.presigned_url(digest), status_code=302, headers=base)
        return self._stream(digest, base, range_header, if_match)

    def _stream(
        self, digest: str, base: dict[str, str], headers_range: str | None, if_match: str | None = None
    ) -> Response:
        kw = {"Range": headers_range} if headers_range else {}
        if if_match:
            kw["IfMatch"] = if_match
        try:
            obj = self._get(digest, **kw)
        except self._client_error as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise CorruptBlob(
                    f"blob {digest} is corrupt on this hub (replaced after its check); not served"
                ) from None
            raise
        body = obj["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        out = {**base, "Content-Length": str(obj["ContentLength"]), "Accept-Ranges": "bytes"}
        status = 200
        if headers_range and obj.get("ContentRange"):
            out["Content-Range"] = obj["ContentRange"]
            status = 206
        return StreamingResponse(
            chunks(), status_code=status, headers=out, media_type="application/octet-stream"
        )


def _started(key: str, reported: float) -> float:
    """When the upload behind a temp key began: from its name (`tmp/<unix time>-<uuid>`),
    else the time the store reports."""
    stem = key.rsplit("/", 1)[-1].split("-", 1)[0]
    return float(stem) if stem.isdigit() else reported
