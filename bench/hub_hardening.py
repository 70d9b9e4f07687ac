"""Figures for the hub's hardening (issue 14): what an attacker's requests cost the hub now.

Each probe runs against a `ServerThread` on 127.0.0.1 with default limits:

    backoff     N requests with a wrong token on one connection: how many 401 before 429
    idle        I idle + I half-header connections: how long until the hub closed them all
    put         an unauthenticated PUT declaring 5 GiB: bytes the client got to send, time
    verify      one 64 MiB blob: first GET (re-hash) vs the next (checked (ino,size,mtime,ctime))

    python bench/hub_hardening.py [--requests 2000] [--idle 500]
"""

from __future__ import annotations

import argparse
import hashlib
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx

from deltahub.hub.server import ServerThread
from deltahub.hub.tokens import TokenStore


def backoff(srv: ServerThread, n: int) -> None:
    counts: dict[int, int] = {}
    t = time.perf_counter()
    with httpx.Client(timeout=30) as http:
        for _ in range(n):
            r = http.get(f"{srv.url}/v1/adapters", headers={"Authorization": "Bearer dh_" + "x" * 43})
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
    dt = time.perf_counter() - t
    print(
        f"backoff: {n} wrong-token requests in {dt:.1f} s: {counts} (401s let through: {counts.get(401, 0)})"
    )


def idle(srv: ServerThread, n: int, limit_s: float = 60.0) -> None:
    socks = []
    for i in range(2 * n):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        if i % 2:
            s.sendall(b"GET /v1/adapters HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        s.setblocking(False)
        socks.append(s)
    t = time.perf_counter()
    open_ = set(range(len(socks)))
    while open_ and time.perf_counter() - t < limit_s:
        for i in list(open_):
            try:
                if socks[i].recv(4096) == b"":
                    open_.discard(i)
            except BlockingIOError:
                pass
            except ConnectionResetError:
                open_.discard(i)
        time.sleep(0.05)
    dt = time.perf_counter() - t
    print(
        f"idle: {n} idle + {n} half-header connections; {len(socks) - len(open_)} closed by the hub after {dt:.1f} s"
    )
    for s in socks:
        s.close()


def put(srv: ServerThread) -> None:
    digest = "sha256:" + "ab" * 32
    head = (
        f"PUT /v1/adapters/team/alpha/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {5 << 30}\r\n\r\n"
    ).encode()
    chunk = b"\0" * (1 << 20)
    sent = 0
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(head)
        try:
            while sent < 5 << 30 and time.perf_counter() - t < 60:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
    dt = time.perf_counter() - t
    print(
        f"put: unauthenticated 5 GiB PUT: client sent {sent / 2**20:.0f} MiB before the hub closed, {dt:.2f} s"
    )


def verify(srv: ServerThread, home: Path, token: str) -> None:
    from deltahub.registry.store import BlobStore

    data = hashlib.sha256(b"seed").digest() * (2 << 20)  # 64 MiB
    digest, _ = BlobStore(home).put_bytes(data)
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {token}"}) as http:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            r = http.get(f"{srv.url}/v1/blobs/{digest}")
            assert r.status_code == 200 and len(r.content) == len(data)
            times.append(time.perf_counter() - t)
    print(
        f"verify: 64 MiB GET first (hashes) {times[0] * 1000:.0f} ms, then {times[1] * 1000:.0f}, {times[2] * 1000:.0f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--idle", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "srv"
        with ServerThread(home) as srv:
            token = TokenStore(home).create("admin")[0]
            verify(srv, home, token)
            put(srv)
            idle(srv, args.idle)
            backoff(srv, args.requests)


if __name__ == "__main__":
    main()
