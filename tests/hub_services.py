"""Real engines for the team-hub tests: a throwaway PostgreSQL cluster and moto's S3 server.

Both start on 127.0.0.1 and a free port, once per test process, and stop (by pid) when
it exits. PostgreSQL: `DELTAHUB_TEST_PG_URL` names an existing server to use instead;
otherwise Debian's binaries (`.ci/services.sh` installs them) run `initdb` + `pg_ctl` in
a temp dir (as the `postgres` user when we are root: initdb refuses root). S3: moto's
server (`moto[server]`, in the `test` extra). Where either is missing, the tests that
need it skip with the reason (`pytest -rs` prints it); nothing passes silently.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

PG_ENV = "DELTAHUB_TEST_PG_URL"
_state: dict[str, object] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {seconds:.0f} s")


def pg_bindir() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return str(Path(found).resolve().parent)
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    return dirs[-1] if dirs and Path(dirs[-1], "initdb").exists() else None


def _start_cluster() -> str:
    bindir = pg_bindir()
    if bindir is None:
        raise RuntimeError(
            "PostgreSQL is not installed (run `.ci/services.sh` as root, or set " + PG_ENV + ")"
        )
    tmp = Path(tempfile.mkdtemp(prefix="deltahub-pg-"))
    as_pg: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise RuntimeError("running as root without `runuser` to start PostgreSQL as postgres")
        shutil.chown(tmp, user="postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = tmp / "data"
    run = lambda *a: subprocess.run([*as_pg, *a], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {tmp} -c fsync=off -c max_connections=400"
    run(f"{bindir}/pg_ctl", "-D", str(data), "-l", str(tmp / "log"), "-w", "-t", "60", "-o", opts, "start")

    def stop() -> None:
        pidfile = data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGINT)  # fast shutdown, by the postmaster's own pid
            for _ in range(200):
                os.kill(pid, 0)
                time.sleep(0.05)
        except (OSError, ValueError):
            pass
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def pg_server_url() -> str:
    """The URL of a PostgreSQL server for this test process (started once); skips if none."""
    if "pg" not in _state:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _state["pg"] = RuntimeError("psycopg is not installed (pip install -e '.[test]')")
        else:
            try:
                _state["pg"] = os.environ.get(PG_ENV) or _start_cluster()
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                detail = getattr(e, "stderr", b"") or b""
                _state["pg"] = RuntimeError(
                    f"cannot start PostgreSQL: {e} {detail.decode(errors='replace')[-300:]}"
                )
    value = _state["pg"]
    if isinstance(value, Exception):
        pytest.skip(f"PostgreSQL unavailable: {value}")
    return str(value)


def fresh_database() -> str:
    """A new, empty database on that server; returns its URL."""
    import psycopg

    base = pg_server_url()
    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    return base.rsplit("/", 1)[0] + "/" + name


def s3_endpoint() -> str:
    """moto's S3 server on 127.0.0.1 for this test process (started once); skips if absent."""
    if "s3" not in _state:
        exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
        try:
            import boto3  # noqa: F401
        except ImportError:
            _state["s3"] = RuntimeError("boto3 is not installed (pip install -e '.[test]')")
        else:
            if not Path(exe).exists():
                _state["s3"] = RuntimeError("moto_server is not installed (pip install 'moto[server]')")
            else:
                port = free_port()
                proc = subprocess.Popen(
                    [exe, "-H", "127.0.0.1", "-p", str(port)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )

                def stop() -> None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()

                atexit.register(stop)
                try:
                    _wait_port(port, proc, 60, "moto_server")
                    _state["s3"] = f"http://127.0.0.1:{port}"
                except RuntimeError as e:
                    _state["s3"] = e
    value = _state["s3"]
    if isinstance(value, Exception):
        pytest.skip(f"S3 (moto) unavailable: {value}")
    return str(value)


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def fresh_bucket() -> str:
    """A new bucket on the moto server; returns its `s3://` URL (with a prefix)."""
    import boto3

    endpoint = s3_endpoint()
    for k, v in S3_ENV.items():
        os.environ.setdefault(k, v)
    name = "b-" + uuid.uuid4().hex[:16]
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/hub"
