"""The team hub on real engines: several `deltahub serve` processes over one PostgreSQL
database and one S3 bucket (moto's server), started by tests/hub_services.py.

Checked here: 16 clients x 25 pushes of one adapter through two server processes give
400 versions with seq 1..400 (no gap, no duplicate) and `latest` on the highest; a server
killed with SIGKILL mid-upload or mid-commit, 20 times, leaves nothing partial visible
and `hub verify` clean; pulls through either server are byte-identical; S3 multipart
uploads land only when their hash matches; `hub copy` moves an embedded hub to
PostgreSQL + S3 and verifies it. Webhooks: tests/test_hub_webhooks.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from deltahub.cli.main import cli
from deltahub.errors import InvalidConfig, NotFound
from deltahub.hub.client import HubClient, TransientError, pull, push
from deltahub.hub.pgschema import MIGRATIONS
from deltahub.registry import Registry
from tests.hub_helpers import backend_stores, export_bytes, lora_dir, published, start_hub
from tests.hub_services import S3_ENV, _wait_port, free_port


@dataclass
class Team:
    """One PostgreSQL database, one bucket, server processes over them, a write token."""

    stores: dict[str, Any]
    token: str
    home: Path
    logs: Path
    procs: dict[int, subprocess.Popen]

    def launch(self) -> str:
        """Start a server process (it is ready after `ready(url)`)."""
        port = free_port()
        s = self.stores
        args = [
            sys.executable, "-c", "from deltahub.cli.main import cli; cli()", "serve", "--home", str(self.home),
            "--port", str(port), "--db", s["db"], "--blobs", s["blobs"], "--s3-endpoint-url",
            s["s3_endpoint_url"], "--log-level", "warning",
        ]  # fmt: skip
        env = {**os.environ, **S3_ENV}
        log = open(self.logs / f"server-{port}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[port] = subprocess.Popen(args, env=env, stdout=log, stderr=log)
        log.close()
        return f"http://127.0.0.1:{port}"

    def ready(self, url: str) -> str:
        port = int(url.rsplit(":", 1)[1])
        _wait_port(port, self.procs[port], 60, "deltahub serve")
        return url

    def start(self) -> str:
        return self.ready(self.launch())

    def kill(self, url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        proc = self.procs.pop(port)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def stop_all(self) -> None:
        for port in list(self.procs):
            proc = self.procs.pop(port)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)

    def verify(self, sweep: bool = False) -> dict[str, Any]:
        """`deltahub hub verify`, told where the stores are by the environment alone."""
        s = self.stores
        env = {
            "DELTAHUB_DB_URL": s["db"],
            "DELTAHUB_BLOB_URL": s["blobs"],
            "DELTAHUB_S3_ENDPOINT_URL": s["s3_endpoint_url"],
        }
        r = CliRunner().invoke(
            cli, ["hub", "verify", "--json", *(["--sweep", "--older-than", "0"] if sweep else [])], env=env
        )
        assert r.exit_code in (0, 1), r.output
        return json.loads(r.output)


@pytest.fixture
def team(tmp_path: Path) -> Iterator[Team]:
    stores = backend_stores("postgres+s3")
    r = CliRunner().invoke(cli, ["hub", "migrate", "--db", stores["db"]])
    assert r.exit_code == 0 and f"schema at version {len(MIGRATIONS)} (was 0)" in r.output, r.output
    r = CliRunner().invoke(
        cli, ["token", "create", "--db", stores["db"], "--scope", "write", "--namespace", "team"]
    )
    assert r.exit_code == 0, r.output
    token = r.output.splitlines()[0]
    logs = tmp_path / "logs"
    logs.mkdir()
    t = Team(stores, token, tmp_path / "server-home", logs, {})
    try:
        yield t
    finally:
        t.stop_all()


def _db_rows(db: str, sql: str, params: list[Any] | None = None) -> list[tuple]:
    import psycopg

    with psycopg.connect(db) as conn:
        return conn.execute(sql, params or []).fetchall()


def test_two_servers_sixteen_clients_four_hundred_pushes(team: Team, tmp_path: Path) -> None:
    urls = [team.start(), team.start()]
    clients, per_client = 16, 25
    regs = [Registry(tmp_path / f"client-{c}") for c in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients)

    def run(c: int) -> None:
        try:
            conns = [HubClient(u, team.token) for u in urls]
            reg = Registry(regs[c].home)  # this thread's own connection
            start.wait(60)
            for i in range(per_client):  # as a client works: publish a version, push it
                n = c * per_client + i + 1
                reg.publish(
                    lora_dir(tmp_path / f"src-{n}", seed=n, r=2, layers=1), "team/shared", version=str(n)
                )
                push(f"team/shared@{n}", conns[(c + i) % 2], reg)  # spread over both servers
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    seqs = [
        s
        for (s,) in _db_rows(
            team.stores["db"], "select seq from versions where full_name = 'team/shared' order by seq"
        )
    ]
    assert seqs == list(range(1, clients * per_client + 1))  # 400/400, no gap, no duplicate
    listed = HubClient(urls[1], team.token).versions("team/shared")
    assert sorted(int(v["version"]) for v in listed) == list(range(1, 401))
    assert HubClient(urls[0], team.token).resolve("team/shared")["version"] == "400"  # latest: the highest
    assert _db_rows(team.stores["db"], "select count(*) from versions where is_latest") == [(1,)]

    # Pulls through either server are byte-identical, and identical to what was pushed.
    for n in random.Random(0).sample(range(1, 401), 4):
        src = regs[(n - 1) // per_client]
        want = export_bytes(src, f"team/shared@{n}", tmp_path / f"want-{n}")
        for k, url in enumerate(urls):
            dst = Registry(tmp_path / f"pull-{n}-{k}")
            pull(f"team/shared@{n}", HubClient(url, team.token), dst)
            assert export_bytes(dst, f"team/shared@{n}", tmp_path / f"got-{n}-{k}") == want
    report = team.verify()
    assert report["ok"] and report["versions"] == 400 and report["leftovers"] == [], report


def _slow_body(data: bytes, chunk: int = 1 << 20, pause: float = 0.01) -> Iterator[bytes]:
    for i in range(0, len(data), chunk):
        time.sleep(pause)
        yield data[i : i + chunk]


def test_kill_nine_mid_upload_leaves_nothing_partial(team: Team, tmp_path: Path) -> None:
    """20 rounds: a push (a 10 MiB multipart upload, then a commit) through server A, which is
    SIGKILLed at a random moment; then through server B nothing partial is visible."""
    b = team.start()
    reader = HubClient(b, team.token)
    rng = random.Random(17)
    committed = 0
    unexpected: list[BaseException] = []
    following = team.launch()  # the next round's server starts while this round runs
    for k in range(20):
        a, following = team.ready(following), team.launch()
        big = rng.randbytes(9 << 20)
        digest = "sha256:" + hashlib.sha256(big).hexdigest()
        local = published(tmp_path / f"l{k}", "team/crash", seed=k, version=str(k + 1))
        v = local.resolve("team/crash")
        uploaded, done = threading.Event(), threading.Event()

        def work(
            a: str = a, big: bytes = big, digest: str = digest, local: Registry = local,
            uploaded: threading.Event = uploaded, done: threading.Event = done,
        ) -> None:  # fmt: skip
            try:
                with httpx.Client(timeout=60) as http:
                    http.put(
                        f"{a}/v1/adapters/team/crash/blobs/{digest}",
                        content=_slow_body(big),
                        headers={"Authorization": f"Bearer {team.token}"},
                    )
                uploaded.set()
                push("team/crash", HubClient(a, team.token), local)
            except (httpx.HTTPError, TransientError):
                pass  # the server died under us: expected
            except BaseException as e:
                unexpected.append(e)
            finally:
                done.set()

        t = threading.Thread(target=work)
        t.start()
        if k % 2 == 0:  # mid-upload of the 9 MiB blob (a multipart upload on S3)
            time.sleep(rng.uniform(0.02, 0.25))
        elif k % 4 == 1:  # during the push: its uploads, its commit, or just after
            uploaded.wait(30)
            time.sleep(rng.uniform(0.0, 1.0))
        else:  # after the push committed: the version must stay whole
            done.wait(30)
        team.kill(a)
        t.join(60)
        assert done.is_set()
        # The big blob is either whole under its digest or absent: never a prefix of it.
        if reader.has_blob(digest):
            got = Registry(tmp_path / f"check-{k}").store
            reader.download_blob(digest, got)
            assert got.path(digest).read_bytes() == big
        # The version is either fully there (every blob present, digest right) or absent.
        try:
            record = reader.resolve(f"team/crash@{v.version}")
        except NotFound:
            continue
        committed += 1
        assert record["digest"] == v.digest and record["files"] == v.files
        assert all(reader.has_blob(d) for d in v.files.values())
    assert not unexpected, unexpected[:3]
    report = team.verify()
    assert report["ok"], report["problems"]
    swept = team.verify(sweep=True)
    assert swept["ok"] and team.verify()["leftovers"] == []
    assert 5 <= committed < 20, committed  # both outcomes occurred


def test_s3_multipart_upload_lands_only_when_its_hash_matches(tmp_path: Path) -> None:
    from deltahub.errors import IntegrityError
    from deltahub.hub.blobstores import S3Blobs

    stores = backend_stores("postgres+s3")
    blobs = S3Blobs(stores["blobs"], endpoint_url=stores["s3_endpoint_url"], part_size=5 << 20)
    data = random.Random(3).randbytes((11 << 20) + 17)  # three parts
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    wrong = "sha256:" + "0" * 64

    import io

    with pytest.raises(IntegrityError, match="hash to"):
        blobs.put_stream(io.BytesIO(data), expected=wrong)
    assert not blobs.has(wrong) and not blobs.has(digest) and blobs.leftovers() == []
    assert blobs.put_stream(io.BytesIO(data), expected=digest) == (digest, len(data))
    assert blobs.has(digest) and blobs.size(digest) == len(data)
    assert b"".join(blobs.chunks(digest)) == data
    assert blobs.leftovers() == []  # the temporary object went after the copy
    assert list(blobs.digests()) == [digest]
    # What a killed upload leaves: swept only once older than a running upload could be.
    now = int(time.time())
    blobs.s3.create_multipart_upload(Bucket=blobs.bucket, Key=f"{blobs.prefix}tmp/{now}-killed-multipart")
    blobs.s3.put_object(Bucket=blobs.bucket, Key=f"{blobs.prefix}tmp/{now}-killed", Body=b"partial")
    assert len(blobs.leftovers()) == 2
    assert blobs.sweep(older_than=3600) == 0 and len(blobs.leftovers()) == 2
    assert blobs.sweep(older_than=0) == 2 and blobs.leftovers() == []
    assert list(blobs.digests()) == [digest]


def test_streamed_and_redirected_downloads_are_identical(tmp_path: Path) -> None:
    pushed = published(tmp_path / "local")
    v = pushed.resolve("team/alpha")
    want = export_bytes(pushed, "team/alpha", tmp_path / "want")
    for redirect in (False, True):
        gen = start_hub(tmp_path / f"hub-{redirect}", "postgres+s3", redirect_downloads=redirect)
        hub = next(gen)
        try:
            push("team/alpha", HubClient(hub.url, hub.tokens["write"]), pushed)
            r = httpx.get(
                f"{hub.url}/v1/blobs/{v.files['adapter_model.safetensors']}",
                headers={"Authorization": f"Bearer {hub.tokens['read']}"},
            )
            assert r.status_code == (302 if redirect else 200)
            if redirect:  # a presigned URL on the store itself, no token needed there
                assert r.headers["location"].startswith(hub.stores["s3_endpoint_url"])
                assert httpx.get(r.headers["location"]).content == (
                    pushed.store.path(v.files["adapter_model.safetensors"]).read_bytes()
                )
            dst = Registry(tmp_path / f"dst-{redirect}")
            pull("team/alpha", HubClient(hub.url, hub.tokens["read"]), dst)
            assert export_bytes(dst, "team/alpha", tmp_path / f"got-{redirect}") == want
        finally:
            gen.close()


def test_hub_copy_moves_an_embedded_hub_to_postgres_and_s3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "embedded"
    reg = published(home, "team/alpha", seed=1, tags=["prod"])
    reg.publish(lora_dir(tmp_path / "s2", seed=2), "team/alpha")
    reg.publish(lora_dir(tmp_path / "s3", seed=3), "beta", description="a bare name")
    runner = CliRunner()
    token = runner.invoke(
        cli, ["token", "create", "--home", str(home), "--scope", "read"]
    ).output.splitlines()[0]
    assert runner.invoke(cli, ["webhook", "add", "http://127.0.0.1:9/x", "--event", "tag.moved", "--home", str(home)]).exit_code == 0  # fmt: skip
    stores = backend_stores("postgres+s3")
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    args = ["hub", "copy", "--home", str(home), "--to", stores["db"], "--to-blobs", stores["blobs"]]
    args += ["--s3-endpoint-url", stores["s3_endpoint_url"]]
    r = runner.invoke(cli, args)
    assert r.exit_code == 0 and "copied 3 versions" in r.output and "verified" in r.output, r.output
    again = runner.invoke(cli, [*args, "--json"])  # idempotent: nothing more to send
    assert again.exit_code == 0 and json.loads(again.output)["bytes"] == 0, again.output

    # The copy serves what the embedded hub held, with the same token.
    from deltahub.hub.server import ServerThread

    with ServerThread(tmp_path / "unused-home", **stores) as srv:
        client = HubClient(srv.url, token)
        assert client.resolve("team/alpha@prod")["version"] == "1"
        assert client.resolve("team/alpha")["version"] == "2"
        assert [h["url"] for h in srv.app.state.hub.meta.handle().hooks()] == ["http://127.0.0.1:9/x"]
        assert [v["full_name"] for v in client.search("bare")] == ["beta"]
        for ref in ("team/alpha@1", "team/alpha@2", "beta@1"):
            dst = Registry(tmp_path / f"pulled-{ref.replace('/', '-')}")
            pull(ref, client, dst)
            assert export_bytes(dst, ref, tmp_path / f"g-{ref.replace('/', '-')}") == export_bytes(
                reg, ref, tmp_path / f"w-{ref.replace('/', '-')}"
            )


def test_schema_migration_is_idempotent_and_required(tmp_path: Path) -> None:
    from deltahub.hub.admin import open_stores
    from deltahub.hub.pgmeta import PostgresMeta
    from tests.hub_services import fresh_database

    db = fresh_database()
    with pytest.raises(InvalidConfig, match="hub migrate"):
        PostgresMeta(db, create=False)
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(CliRunner().invoke(cli, ["hub", "migrate", "--db", db]))
        )
        for _ in range(4)
    ]  # servers starting together migrate once
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r.exit_code == 0 for r in results), [r.output for r in results]
    assert _db_rows(db, "select version from deltahub_schema") == [
        (v,) for v in range(1, len(MIGRATIONS) + 1)
    ]
    assert _db_rows(db, "select count(*) from blob_facts") == [
        (0,)
    ]  # made by `hub migrate`, not on first use
    PostgresMeta(db, create=False).close()
    with pytest.raises(InvalidConfig, match="PostgreSQL metadata"):
        open_stores(None, "s3://bucket/x", tmp_path)
    with pytest.raises(InvalidConfig, match="cannot connect"):
        PostgresMeta("postgresql://nobody@127.0.0.1:1/none")
