"""Registry hardening (issue 14): every test here fails on the registry before it.

Tampered blobs never load, a failed publish takes back its blobs, a full disk is one
line, crash leftovers are swept, gc never breaks a publisher, names have no newline.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltahub import artifact as af
from deltahub.cli.main import cli
from deltahub.errors import AlreadyExists, IntegrityError, InvalidRef, StorageFull
from deltahub.registry import Registry, parse_ref
from deltahub.registry import store as store_module
from deltahub.registry.refs import check_name, check_tag, check_version
from deltahub.registry.store import check_digest
from tests.test_artifact import make_good

WORKER = Path(__file__).with_name("registry_worker.py")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def art(tmp_path: Path) -> Path:
    return make_good(tmp_path / "art")


def other_art(tmp_path: Path, k: int = 1) -> Path:
    """An artifact with different weight bytes (a blob no other version has), one per `k` < 256."""
    path = make_good(tmp_path / "other")
    data = bytearray((path / af.WEIGHTS_FILE).read_bytes())
    data[-4] ^= k  # the low mantissa byte of the last float32: still finite
    (path / af.WEIGHTS_FILE).write_bytes(bytes(data))
    return path


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


# item 5 ------------------------------------------------------------------------------------


def test_a_tampered_blob_never_loads_and_a_tampered_manifest_never_shows(art: Path) -> None:
    reg = Registry()
    v = reg.publish(art, name="t")
    assert reg.open(v).method == "lora"
    flip_last_byte(reg.store.path(v.files[af.WEIGHTS_FILE]))
    with pytest.raises(IntegrityError, match="corrupt"):
        reg.open("t")
    manifest = reg.store.path(v.files[af.MANIFEST_FILE])
    manifest.write_bytes(manifest.read_bytes().replace(b'"t"', b'"u"'))
    with pytest.raises(IntegrityError, match="manifest"):
        reg.manifest("t")
    result = CliRunner().invoke(cli, ["show", "t"])
    assert result.exit_code == IntegrityError.exit_code and "Traceback" not in result.output


def test_a_blob_is_hashed_once_per_process_until_it_changes(
    art: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry()
    v = reg.publish(art, name="once")
    hashed: list[str] = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    for _ in range(3):
        reg.open("once")
    assert sorted(hashed) == sorted({d.split(":")[1] for d in v.files.values()})  # each blob once
    weights = reg.store.path(v.files[af.WEIGHTS_FILE])
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    reg.open("once")
    assert hashed.count(weights.name) == 2  # a changed (size, mtime) is hashed again


# item 9 ------------------------------------------------------------------------------------


def test_a_full_disk_is_one_typed_line(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module.os, "fsync", no_space)
    with pytest.raises(StorageFull, match="no space left"):
        reg.publish(art, name="full")
    assert list(reg.store.tmp.iterdir()) == []
    result = CliRunner().invoke(cli, ["publish", str(art), "--name", "full"])
    assert result.exit_code == StorageFull.exit_code
    assert result.output.startswith("Error: no space left") and len(result.output.strip().splitlines()) == 1


def test_a_full_database_is_one_typed_line_and_takes_back_the_blobs(art: Path, tmp_path: Path) -> None:
    reg = Registry()
    reg.publish(art, name="first")
    before = set(reg.store.digests())
    pages = reg.db.execute("PRAGMA page_count").fetchone()[0]
    reg.db.execute(f"PRAGMA max_page_count = {pages}")  # the database cannot grow: SQLITE_FULL
    with pytest.raises(StorageFull, match="no space left"):
        for i in range(50):  # the first publishes may fit in free pages
            reg.publish(other_art(tmp_path / str(i)), name=f"second{i}", description="x" * 4000)
    reg.db.execute(f"PRAGMA max_page_count = {pages * 100}")
    assert reg.verify().ok
    referenced = {d for (d,) in reg.db.execute("select blob from files")}
    assert set(reg.store.digests()) - before <= referenced  # nothing the failed publish wrote stays


# item 10 -----------------------------------------------------------------------------------


def test_a_failed_publish_removes_the_blobs_it_wrote(art: Path, tmp_path: Path) -> None:
    reg = Registry()
    reg.publish(art, name="x", version="1")
    before = set(reg.store.digests())
    with pytest.raises(AlreadyExists):
        reg.publish(other_art(tmp_path), name="x", version="1")
    assert set(reg.store.digests()) == before
    with pytest.raises(AlreadyExists):
        reg.publish(art, name="x", version="1")  # its blobs were there before: they stay
    assert set(reg.store.digests()) == before and reg.verify().ok


# item 11 -----------------------------------------------------------------------------------


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_opening_sweeps_temp_files_whose_writer_is_gone(tmp_path: Path) -> None:
    Registry(tmp_path / "home").close()
    tmp = tmp_path / "home" / "tmp"
    dead = tmp / f"blob-{dead_pid()}-abc"
    alive = tmp / f"blob-{os.getpid()}-def"
    legacy = tmp / "blob-xyz"  # no pid: only age retires it
    for p in (dead, alive, legacy):
        p.write_bytes(b"half a blob")
    Registry(tmp_path / "home").close()
    assert not dead.exists() and alive.exists() and legacy.exists()


# item 12 -----------------------------------------------------------------------------------


def test_gc_with_no_grace_beside_publisher_processes_breaks_none(tmp_path: Path) -> None:
    home = tmp_path / "home"
    reg = Registry(home)
    # Fresh weights for every publish: each one writes a blob nothing references yet.
    dirs = [[other_art(tmp_path / f"a{i}-{j}", 1 + 15 * i + j) for j in range(15)] for i in range(3)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(home), "15", *(f"{d}:n{i}" for d in ds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i, ds in enumerate(dirs)
    ]
    runs, deadline = 0, time.monotonic() + 120
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        reg.gc(grace_seconds=0)  # as aggressive as gc gets, for as long as they publish
        runs += 1
    outputs = [p.communicate(timeout=120) for p in procs]
    lines = [line for out, _ in outputs for line in out.splitlines()]
    assert runs > 0 and all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert len(lines) == 45 and all(line.startswith("ok ") for line in lines), lines
    assert reg.verify().ok


# item 17 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "check, value",
    [
        (check_name, "team/y\n"),
        (check_name, "y\n"),
        (check_version, "3\n"),
        (check_tag, "prod\n"),
        (parse_ref, "team/y@1\n"),
        (parse_ref, "team/y@sha256:abcdef\n"),
    ],
)
def test_a_trailing_newline_is_refused(check, value: str) -> None:
    with pytest.raises(InvalidRef):
        check(value)


def test_a_digest_with_a_trailing_newline_is_refused(art: Path) -> None:
    with pytest.raises(IntegrityError):
        check_digest("sha256:" + "a" * 64 + "\n")
    with pytest.raises(InvalidRef):
        Registry().publish(art, name="team/y\n")
