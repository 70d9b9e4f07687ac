"""Concurrency and crash consistency of the registry, with real processes."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from deltahub.registry import Registry
from tests.test_artifact import make_good

WORKER = Path(__file__).with_name("registry_worker.py")
ROOT = Path(__file__).resolve().parent.parent


def worker(home: Path, count: int, pairs: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(home), str(count), *pairs],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_16_processes_x_50_publishes_over_3_names(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Registry(home).close()
    dirs = [make_good(tmp_path / f"art{i}") for i in range(3)]
    pairs = [f"{d}:name{i}" for i, d in enumerate(dirs)]
    procs = [worker(home, 50, pairs[i % 3 :] + pairs[: i % 3]) for i in range(16)]
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        outcomes += out.splitlines()
    assert len(outcomes) == 16 * 50
    errors = [line for line in outcomes if not line.startswith("ok ")]
    assert errors == []  # the write lock serializes publishers; none should fail
    registry = Registry(home)
    per_name = Counter(line.split()[1] for line in outcomes)
    for name, count in per_name.items():
        versions = [v.version for v in registry.versions(name)]
        assert versions == [str(i) for i in range(1, count + 1)]  # no lost, duplicated or gapped versions
        reported = sorted(int(line.split()[2]) for line in outcomes if line.split()[1] == name)
        assert reported == list(range(1, count + 1))
        assert registry.resolve(name).version == str(count)
    report = registry.verify()
    assert report.ok, report.problems
    assert report.versions == 800


def test_publisher_killed_at_random_moments_leaves_a_consistent_registry(tmp_path: Path) -> None:
    home = tmp_path / "home"
    Registry(home).close()
    art = make_good(tmp_path / "art")
    rng = random.Random(1234)
    kills = 0
    for _ in range(30):
        p = worker(home, 1000, [f"{art}:victim"])
        # Kill somewhere in publishing, whatever the machine's load: once the worker has
        # reported its first version, within the next few publishes (each takes ~5-20 ms).
        ready, _, _ = select.select([p.stdout], [], [], 120)
        assert ready and p.stdout.readline().startswith("ok "), (
            p.stderr.read() if p.poll() is not None else ""
        )
        time.sleep(rng.uniform(0.0, 0.05))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
        registry = Registry(home)  # always opens
        report = registry.verify()
        assert report.ok, report.problems
        versions = registry.list(all_versions=True)
        assert [v.version for v in versions] == [str(i) for i in range(1, len(versions) + 1)]
        for v in versions:  # every visible version is complete and readable
            art_v = registry.open(v)
            assert art_v.manifest is not None and art_v.manifest.version == v.version
        registry.close()
    assert kills >= 25
    assert len(Registry(home).list(all_versions=True)) > 0  # the test did kill mid-stream, not before start


@pytest.mark.parametrize("threads", [8])
def test_threads_sharing_a_home_each_with_own_registry(tmp_path: Path, threads: int) -> None:
    import threading

    home = tmp_path / "home"
    art = make_good(tmp_path / "art")
    errors: list[BaseException] = []

    def run() -> None:
        try:
            r = Registry(home)
            for _ in range(5):
                r.publish(art, name="t")
            r.close()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert [v.version for v in Registry(home).versions("t")] == [str(i) for i in range(1, 41)]
