"""Hub load test: N concurrent clients x P pushes and P pulls against one local server.

The server is a real `deltahub serve` in its own process on 127.0.0.1; each client is a
thread with its own home, registry and HTTP connection. Phase 1: every client pushes
its own P small synthetic LoRA versions. Phase 2: every client pulls the P versions its
neighbour pushed. Then: no errors, every version on the server (N x P), every pulled
digest equal to its source, and `verify` clean on the server and on every client.

The peer, in the same run on the same artifacts: the same copies between local homes
without the network (`BlobStore.put_file` + `Registry.commit`), so the ratio is the cost
of HTTP, auth and the server.

    python bench/hub_bench.py --clients 16 --ops 25

`--team` measures the storage back-ends instead (section "hub: PostgreSQL + S3"): the
embedded default (one process), and PostgreSQL + S3 (moto's server) behind one and two
`deltahub serve` processes, with the same clients, pushes, pulls and resolves: push and
pull throughput, resolve latency (p50, p99), the servers' CPU time, wall time, and the
load average. PostgreSQL and moto start as the tests start them (tests/hub_services.py).

    python bench/hub_bench.py --team --clients 8 --ops 15

`--commit` times commits of versions whose weights are one large blob (`--commit-mb`,
default 64) on PostgreSQL + S3, before and after the commit checks used the upload's
recorded facts (deltahub/hub/blobfacts.py): "before" is this working tree with the hub's
commit path (api.py, blobs.py, blobstores.py) taken from `--before-rev`. Each side gets a
fresh database, bucket and moto server; one upload, then `--commits` commits of the same
weights under new version numbers: commit wall (median, max), upload wall, and the CPU
time of the server and of moto over the commits, with the load average.

    python bench/hub_bench.py --commit --commit-mb 64 --commits 5 --before-rev 40e3c27
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from deltahub import artifact as af
from deltahub.hub.client import HubClient, pull, push
from deltahub.hub.tokens import TokenStore
from deltahub.registry import Registry


def synthetic_lora(path: Path, seed: int, modules: int, hidden: int, r: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(modules):
        tensors[f"base_model.model.layers.{i}.q_proj.lora_A.weight"] = torch.randn(r, hidden, generator=g)
        tensors[f"base_model.model.layers.{i}.q_proj.lora_B.weight"] = torch.randn(hidden, r, generator=g)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj"]}
    return af.write_dir(path, tensors, config)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int) -> subprocess.Popen:
    code = "from deltahub.cli.main import cli; cli()"
    args = [
        sys.executable,
        "-c",
        code,
        "serve",
        "--home",
        str(home),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def run_phase(n: int, fn) -> tuple[float, list[BaseException]]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            fn(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, errors


# ----------------------------------------------------------------------------- --team


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_team_server(home: Path, port: int, stores: dict[str, str]) -> subprocess.Popen:
    args = [sys.executable, "-c", "from deltahub.cli.main import cli; cli()", "serve", "--home", str(home)]
    args += ["--port", str(port), "--log-level", "warning"]
    if stores:
        args += [
            "--db",
            stores["db"],
            "--blobs",
            stores["blobs"],
            "--s3-endpoint-url",
            stores["s3_endpoint_url"],
        ]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def team_config(
    name: str, servers: int, stores: dict[str, str], homes: list[Path], root: Path, p: int
) -> dict:
    """Push, pull and resolve through `servers` processes over `stores` ({}: embedded)."""
    n = len(homes)
    server_home = root / f"server-{name}"
    if stores:
        from deltahub.hub.pgmeta import PostgresMeta

        meta = PostgresMeta(stores["db"])
        token = meta.handle().tokens.create("write")[0]
        meta.close()
    else:
        Registry(server_home).close()
        token = TokenStore(server_home).create("write")[0]
    ports = [free_port() for _ in range(servers)]
    procs = [start_team_server(server_home, port, stores) for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    cpu0 = sum(cpu_seconds(pr.pid) for pr in procs)
    latencies: list[float] = []
    lat_lock = threading.Lock()
    try:

        def pusher(i: int) -> None:
            reg = Registry(homes[i])
            clients = [HubClient(u, token) for u in urls]
            for k in range(1, p + 1):
                push(f"bench/c{i}@{k}", clients[(i + k) % servers], reg)

        def puller(i: int) -> None:
            reg = Registry(root / f"pull-{name}-{i}")
            clients = [HubClient(u, token) for u in urls]
            j = (i + 1) % n
            for k in range(1, p + 1):
                pull(f"bench/c{j}@{k}", clients[(i + k + 1) % servers], reg)

        def resolver(i: int) -> None:
            clients = [HubClient(u, token) for u in urls]
            mine = []
            for k in range(4 * p):
                t0 = time.perf_counter()
                clients[k % servers].resolve(f"bench/c{(i + k) % n}@latest")
                mine.append(time.perf_counter() - t0)
            with lat_lock:
                latencies.extend(mine)

        push_s, e1 = run_phase(n, pusher)
        load_push = os.getloadavg()[0]
        pull_s, e2 = run_phase(n, puller)
        resolve_s, e3 = run_phase(n, resolver)
        load = os.getloadavg()[0]
        cpu = sum(cpu_seconds(pr.pid) for pr in procs) - cpu0
    finally:
        for pr in procs:
            pr.terminate()
            pr.wait(30)
    latencies.sort()
    q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))] * 1e3  # noqa: E731
    return {
        "name": name,
        "errors": e1 + e2 + e3,
        "push_s": push_s,
        "pull_s": pull_s,
        "resolve_s": resolve_s,
        "resolves": len(latencies),
        "p50": q(0.50),
        "p99": q(0.99),
        "cpu": cpu,
        "load_push": load_push,
        "load": load,
    }


def team_main(args: argparse.Namespace) -> None:
    from tests.hub_services import S3_ENV, fresh_bucket, fresh_database, s3_endpoint

    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    n, p = args.clients, args.ops
    root = Path(tempfile.mkdtemp(prefix="hub-team-bench-"))
    results = []
    try:
        homes = [root / f"client{i}" for i in range(n)]
        print(f"preparing {n} x {p} synthetic adapters ...", flush=True)
        for i, home in enumerate(homes):
            reg = Registry(home)
            for k in range(p):
                src = synthetic_lora(
                    root / "src" / f"{i}-{k}", i * 1000 + k, args.modules, args.hidden, args.rank
                )
                reg.publish(src, f"bench/c{i}")
            reg.close()
        version_bytes = Registry(homes[0]).resolve("bench/c0@1").size
        configs = [("embedded (SQLite + directory), 1 process", 1, False)]
        configs += [("PostgreSQL + S3, 1 process", 1, True), ("PostgreSQL + S3, 2 processes", 2, True)]
        for name, servers, team in configs:
            stores = {}
            if team:
                stores = {"db": fresh_database(), "blobs": fresh_bucket(), "s3_endpoint_url": s3_endpoint()}
            print(f"{name} ...", flush=True)
            w0 = time.perf_counter()
            r = team_config(name.split(",")[0].split(" ")[0] + str(servers), servers, stores, homes, root, p)
            r["label"], r["wall"] = name, time.perf_counter() - w0
            results.append(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ops = n * p
    mb = ops * version_bytes / 1e6
    errors = sum(len(r["errors"]) for r in results)
    lines = [
        "## hub: PostgreSQL + S3",
        "",
        f"Command: `python bench/hub_bench.py --team --clients {n} --ops {p}`",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other "
        "engineers' work at the time (see the load average); servers, clients, PostgreSQL 15 (a throwaway "
        "cluster, fsync off) and moto's S3 server all on 127.0.0.1.",
        "",
        f"{n} concurrent clients x {p} pushes of their own adapter, then x {p} pulls of a neighbour's, then "
        f"x {4 * p} resolves of `@latest`, spread round-robin over the server processes; synthetic LoRA "
        f"versions of {version_bytes / 1e3:.0f} kB (3 blobs). CPU: the server processes' user + system time "
        "over the three phases (not PostgreSQL's or moto's).",
        "",
        "| storage, servers | push ops/s | push MB/s | pull ops/s | pull MB/s | resolve p50 | resolve p99 "
        "| server CPU | wall | load avg (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {ops / r['push_s']:.0f} | {mb / r['push_s']:.1f} | {ops / r['pull_s']:.0f} | "
            f"{mb / r['pull_s']:.1f} | {r['p50']:.1f} ms | {r['p99']:.1f} ms | {r['cpu']:.1f} s | {r['wall']:.1f} s | "
            f"{r['load_push']:.1f} / {r['load']:.1f} |"
        )
    lines += [
        "",
        "Reading it: every S3 row goes through moto, a Python emulation of S3 in one process on the same "
        "2 cores (its CPU is not in the server CPU column); a commit on S3 checks the weights from the facts "
        "recorded at upload and fetches only the small JSON files back. So the rows compare the code paths "
        "on one machine, not what PostgreSQL + a real object store would sustain.",
    ]
    lines += ["", f"Checks: errors {errors}; every pulled version's digest checked by `pull`. "
              f"**{'PASS' if not errors else 'FAIL'}**"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    for r in results:
        if r["errors"]:
            print(r["label"], "first error:", repr(r["errors"][0]))
    if not args.no_write:
        from bench_results import write_section

        write_section(args.results, "hub: PostgreSQL + S3", text)
    sys.exit(0 if not errors else 1)


COMMIT_PATH = ("deltahub/hub/api.py", "deltahub/hub/blobs.py", "deltahub/hub/blobstores.py")


def before_tree(rev: str, root: Path) -> Path:
    """This working tree's deltahub/, with the commit path as it was at `rev`."""
    repo = Path(__file__).resolve().parents[1]
    tree = root / "before"
    shutil.copytree(repo / "deltahub", tree / "deltahub", ignore=shutil.ignore_patterns("__pycache__"))
    for path in COMMIT_PATH:
        old = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, check=True
        ).stdout
        (tree / path).write_bytes(old)
    (tree / "deltahub/hub/blobfacts.py").unlink(missing_ok=True)
    return tree


def commit_side(tree: Path, weights: Path, files: dict[str, Path], commits: int) -> dict:
    """Upload once, then `commits` commits of the same weights; timings and CPU."""
    import hashlib
    import json

    import httpx

    from tests.hub_services import S3_ENV, fresh_bucket, fresh_database

    env = {**os.environ, **S3_ENV}
    moto_port = free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    moto = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(moto_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    server = None
    try:
        endpoint = f"http://127.0.0.1:{moto_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", moto_port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("moto did not start") from None
                time.sleep(0.1)
        import tests.hub_services as hs

        hs._state["s3"] = endpoint  # this side's own moto (its pid is ours to measure)
        db, blobs = fresh_database(), fresh_bucket()
        port = free_port()
        args = [sys.executable, "-c", "from deltahub.cli.main import cli; cli()", "serve", "--home",
                str(tree / "home"), "--port", str(port), "--log-level", "warning", "--db", db, "--blobs", blobs,
                "--s3-endpoint-url", endpoint]  # fmt: skip
        server = subprocess.Popen(args, cwd=tree, env=env)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start") from None
                time.sleep(0.1)
        token = subprocess.run(
            [sys.executable, "-c", "import sys; from deltahub.hub.pgmeta import PostgresMeta; "
             "print(PostgresMeta(sys.argv[1]).handle().tokens.create('write')[0])", db],
            cwd=tree, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        auth = {"Authorization": f"Bearer {token}"}
        name = "bench/big"
        client = httpx.Client(base_url=url, headers=auth, timeout=600)

        def put(data: bytes) -> tuple[str, float]:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            t0 = time.perf_counter()
            r = client.put(f"/v1/adapters/{name}/blobs/{digest}", content=data)
            r.raise_for_status()
            return digest, time.perf_counter() - t0

        later = (af.MANIFEST_FILE, af.WEIGHTS_FILE)
        digests = {f: put(p.read_bytes())[0] for f, p in files.items() if f not in later}
        data = weights.read_bytes()
        cpu0 = cpu_seconds(server.pid)
        digests[af.WEIGHTS_FILE], upload_s = put(data)
        upload_cpu = cpu_seconds(server.pid) - cpu0
        manifest = json.loads(files[af.MANIFEST_FILE].read_bytes())
        walls = []
        load0 = os.getloadavg()[0]
        cpu0, moto0 = cpu_seconds(server.pid), cpu_seconds(moto.pid)
        for k in range(1, commits + 1):
            manifest["name"], manifest["version"] = name, str(k)
            m_digest, _ = put(json.dumps(manifest).encode())
            t0 = time.perf_counter()
            r = client.post(
                f"/v1/adapters/{name}/versions", json={"files": {**digests, af.MANIFEST_FILE: m_digest}}
            )
            walls.append(time.perf_counter() - t0)
            if r.status_code != 201:
                raise RuntimeError(f"commit {k}: {r.status_code} {r.text[:300]}")
        cpu, moto_cpu = cpu_seconds(server.pid) - cpu0, cpu_seconds(moto.pid) - moto0
        client.close()
        walls.sort()
        return {
            "median": walls[len(walls) // 2],
            "max": walls[-1],
            "upload": upload_s,
            "upload_cpu": upload_cpu,
            "cpu": cpu / commits,
            "moto_cpu": moto_cpu / commits,
            "load": (load0, os.getloadavg()[0]),
        }
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        moto.terminate()
        moto.wait(30)


def commit_main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="hub-commit-bench-"))
    try:
        # modules x (A: r x hidden + B: hidden x r) float32
        hidden, r = 4096, 256
        modules = max(1, round(args.commit_mb * 2**20 / (2 * hidden * r * 4)))
        src = synthetic_lora(root / "src", 0, modules, hidden, r)
        reg = Registry(root / "client")
        v = reg.publish(src, "bench/big")
        files = {f: reg.store.path(d) for f, d in v.files.items()}
        weights = files[af.WEIGHTS_FILE]
        mb = weights.stat().st_size / 2**20
        sides = {}
        for label, tree in (
            ("before", before_tree(args.before_rev, root)),
            ("after", Path(__file__).resolve().parents[1]),
        ):
            print(f"{label}: {args.commits} commits of a {mb:.0f} MiB blob ...", flush=True)
            sides[label] = commit_side(tree, weights, files, args.commits)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    lines = [
        "## hub: commit of a large blob on S3",
        "",
        f"Command: `python bench/hub_bench.py --commit --commit-mb {args.commit_mb} --commits {args.commits} "
        f"--before-rev {args.before_rev}`",
        f"Machine: {os.cpu_count()} CPU cores, shared with other work (see the load average); one `deltahub serve`, "
        "PostgreSQL (throwaway cluster) and moto's S3 server on 127.0.0.1.",
        "",
        f"A LoRA version whose weights are one {mb:.0f} MiB blob, uploaded once, then {args.commits} commits "
        "of it under new version numbers. Before: the commit downloaded every blob to check it; after: it "
        "uses what the upload's streaming scan recorded and fetches the JSON files only.",
        "",
        "| commit path | commit wall (median / max) | server CPU per commit | moto CPU per commit "
        "| upload wall | server CPU upload | load avg (1 min, start / end) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in sides.items():
        lines.append(
            f"| {label} | {r['median'] * 1e3:.0f} / {r['max'] * 1e3:.0f} ms | {r['cpu'] * 1e3:.0f} ms | "
            f"{r['moto_cpu'] * 1e3:.0f} ms | {r['upload']:.2f} s | {r['upload_cpu']:.2f} s | "
            f"{r['load'][0]:.1f} / {r['load'][1]:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from bench_results import write_section

        write_section(args.results, "hub: commit of a large blob on S3", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--ops", type=int, default=25, help="pushes (and pulls) per client")
    ap.add_argument("--modules", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--team", action="store_true", help="compare the storage back-ends (see above)")
    ap.add_argument("--commit", action="store_true", help="time commits of a large blob on S3 (see above)")
    ap.add_argument("--commit-mb", type=int, default=64)
    ap.add_argument("--commits", type=int, default=5)
    ap.add_argument("--before-rev", default="40e3c27", help="the revision whose commit path is 'before'")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.commit:
        commit_main(args)
        return
    if args.team:
        team_main(args)
        return
    n, p = args.clients, args.ops

    root = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    try:
        server_home = root / "server"
        Registry(server_home).close()
        token = TokenStore(server_home).create("write")[0]
        homes = [root / f"client{i}" for i in range(n)]
        print(f"preparing {n} x {p} synthetic adapters ...", flush=True)
        digests: dict[str, str] = {}
        for i, home in enumerate(homes):
            reg = Registry(home)
            for k in range(p):
                src = synthetic_lora(
                    root / "src" / f"{i}-{k}",
                    seed=i * 1000 + k,
                    modules=args.modules,
                    hidden=args.hidden,
                    r=args.rank,
                )
                v = reg.publish(src, f"bench/c{i}")
                digests[v.ref] = v.digest
            reg.close()
        shutil.rmtree(root / "src")
        version_bytes = Registry(homes[0]).resolve("bench/c0@1").size
        total_mb = n * p * version_bytes / 1e6

        port = free_port()
        server = start_server(server_home, port)
        url = f"http://127.0.0.1:{port}"
        try:

            def pusher(i: int) -> None:
                reg = Registry(homes[i])
                with HubClient(url, token) as client:
                    for k in range(1, p + 1):
                        push(f"bench/c{i}@{k}", client, reg)

            def puller(i: int) -> None:
                reg = Registry(homes[i])
                j = (i + 1) % n
                with HubClient(url, token) as client:
                    for k in range(1, p + 1):
                        v = pull(f"bench/c{j}@{k}", client, reg)
                        if v.digest != digests[v.ref]:
                            raise AssertionError(f"{v.ref}: pulled {v.digest}, pushed {digests[v.ref]}")

            print(f"phase 1: {n} clients x {p} pushes ...", flush=True)
            push_s, push_err = run_phase(n, pusher)
            print(f"phase 2: {n} clients x {p} pulls ...", flush=True)
            pull_s, pull_err = run_phase(n, puller)
        finally:
            server.terminate()
            server.wait(30)

        # The peer: the same 2 x N x P copies between homes, without HTTP.
        local_homes = [root / f"local{i}" for i in range(n)]

        def copy(src_home: Path, dst_home: Path, name: str) -> None:
            src, dst = Registry(src_home), Registry(dst_home)
            for k in range(1, p + 1):
                v = src.resolve(f"{name}@{k}")
                files = {f: dst.store.put_file(src.store.path(d))[0] for f, d in v.files.items()}
                dst.commit(files)

        local_push_s, e1 = run_phase(n, lambda i: copy(homes[i], local_homes[i], f"bench/c{i}"))
        local_pull_s, e2 = run_phase(
            n, lambda i: copy(homes[(i + 1) % n], local_homes[i], f"bench/c{(i + 1) % n}")
        )

        errors = push_err + pull_err + e1 + e2
        server_reg = Registry(server_home)
        on_server = len(server_reg.list(all_versions=True))
        server_verify = server_reg.verify()
        client_problems = sum(len(Registry(h).verify().problems) for h in homes)
        leftovers = sum(len(list((h / "tmp").iterdir())) for h in [server_home, *homes])
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ok = not errors and on_server == n * p and server_verify.ok and client_problems == 0 and leftovers == 0
    ops = n * p
    lines = [
        "## hub",
        "",
        f"Command: `python bench/hub_bench.py --clients {n} --ops {p}`",
        f"Machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other "
        "engineers' work at the time; server (`deltahub serve`, uvicorn, one process) and clients on 127.0.0.1.",
        "",
        f"{n} concurrent clients (threads, one home and connection each) x {p} pushes, then x {p} pulls; "
        f"synthetic LoRA versions of {version_bytes / 1e3:.0f} kB (3 blobs each). Peer: the same copies "
        "between local homes without HTTP (`put_file` + `commit`).",
        "",
        "| phase | ops | time | ops/s | MB/s | local peer ops/s | hub / peer |",
        "|---|---|---|---|---|---|---|",
        f"| push | {ops} | {push_s:.1f} s | {ops / push_s:.0f} | {total_mb / push_s:.1f} | "
        f"{ops / local_push_s:.0f} | {local_push_s / push_s:.2f} |",
        f"| pull | {ops} | {pull_s:.1f} s | {ops / pull_s:.0f} | {total_mb / pull_s:.1f} | "
        f"{ops / local_pull_s:.0f} | {local_pull_s / pull_s:.2f} |",
        "",
        f"Checks: errors {len(errors)}; versions on the server {on_server} of {ops}; server verify "
        f"{'clean' if server_verify.ok else server_verify.problems[:3]}; client verify problems {client_problems}; "
        f"pulled digests equal to pushed: {'yes' if not pull_err else 'no'}; files left in tmp/ {leftovers}. "
        f"**{'PASS' if ok else 'FAIL'}**",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if errors:
        print("first error:", repr(errors[0]))
    if not args.no_write:
        from bench_results import write_section

        write_section(args.results, "hub", text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
