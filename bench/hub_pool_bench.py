"""Per-request latency of a PostgreSQL-backed hub at low concurrency (the connection pool).

One `deltahub serve --db postgresql://...` process (blobs in its home), one adapter
pushed to it, then `--clients` threads (1, then 2) each send `--requests` requests one
after another, alternating `resolve name@latest` and `versions name` with a read token
(so each request also checks the token in PostgreSQL). Reported per concurrency: latency
p50 / p90 / mean in ms, the server's CPU time per request (user + system, /proc), wall
time, and the 1-minute load average before and after (the machine may be shared).

PostgreSQL starts as the tests start it (tests/hub_services.py). To compare two trees
(e.g. before and after a change), run this file from each: it imports and serves the
tree it lives in.

    python bench/hub_pool_bench.py --requests 400
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deltahub import artifact as af  # noqa: E402
from deltahub.hub.client import HubClient, push  # noqa: E402
from deltahub.registry import Registry  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_lora(path: Path) -> Path:
    import torch

    g = torch.Generator().manual_seed(0)
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 32, generator=g),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(32, 4, generator=g),
    }
    return af.write_dir(
        path, tensors, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    )


def start_server(home: Path, db: str, port: int) -> subprocess.Popen:
    args = [sys.executable, "-c", "from deltahub.cli.main import cli; cli()", "serve", "--home", str(home)]
    args += ["--port", str(port), "--db", db, "--log-level", "warning"]
    proc = subprocess.Popen(args, cwd=ROOT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def measure(url: str, token: str, clients: int, requests: int, pid: int) -> dict[str, float]:
    lat: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        c = HubClient(url, token)
        mine = []
        for k in range(requests):
            t0 = time.perf_counter()
            c.resolve("bench/a@latest") if k % 2 == 0 else c.versions("bench/a")
            mine.append(time.perf_counter() - t0)
        with lock:
            lat.extend(mine)

    load0 = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    lat.sort()
    return {
        "clients": clients,
        "n": len(lat),
        "p50": lat[len(lat) // 2] * 1e3,
        "p90": lat[int(0.9 * len(lat))] * 1e3,
        "mean": statistics.fmean(lat) * 1e3,
        "cpu_ms_per_req": cpu / len(lat) * 1e3,
        "wall": wall,
        "load0": load0,
        "load1": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="requests per client thread")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2, help="measure each concurrency this many times")
    args = ap.parse_args()

    from deltahub.hub.pgmeta import PostgresMeta
    from tests.hub_services import fresh_database

    db = fresh_database()
    meta = PostgresMeta(db)
    write = meta.handle().tokens.create("write")[0]
    read = meta.handle().tokens.create("read")[0]
    meta.close()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = Registry(root / "local")
        local.publish(tiny_lora(root / "src"), "bench/a")
        port = free_port()
        proc = start_server(root / "server", db, port)
        url = f"http://127.0.0.1:{port}"
        try:
            push("bench/a", HubClient(url, write), local)
            measure(url, read, 1, 50, proc.pid)  # warm up
            print(f"tree: {ROOT}  python {sys.version.split()[0]}  cores {os.cpu_count()}")
            print(
                "clients  requests  p50 ms  p90 ms  mean ms  server CPU ms/req  wall s  load avg before/after"
            )
            for _ in range(args.rounds):
                for c in args.clients:
                    r = measure(url, read, c, args.requests, proc.pid)
                    print(
                        f"{r['clients']:>7}  {r['n']:>8}  {r['p50']:6.2f}  {r['p90']:6.2f}  {r['mean']:7.2f}"
                        f"  {r['cpu_ms_per_req']:17.2f}  {r['wall']:6.1f}  {r['load0']:.2f}/{r['load1']:.2f}"
                    )
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
