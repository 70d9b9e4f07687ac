"""The registry at scale: index-served queries, keyset pages, O(1) numbering, in-place migration.

Speed itself is measured in bench/registry_bench.py; these tests pin the properties that
make it flat: every hot query's plan uses an index, pages cover every row exactly once,
and a registry made by the first schema opens and is migrated in place.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from sqlite_utils import Database

from deltahub.errors import InvalidConfig, InvalidRef
from deltahub.registry import Registry
from deltahub.registry.db import migrations
from tests.test_artifact import make_good

HOT_TABLES = ("versions", "tags", "files", "pins")


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("arts")
    return [make_good(root / f"a{i}") for i in range(2)]


def fill(reg: Registry, arts: list[Path]) -> None:
    """Three adapters, a few versions each, two tasks, an explicit non-integer version."""
    for i, name in enumerate(["team/alpha", "team/beta", "gamma"]):
        for j in range(3):
            reg.publish(
                arts[j % 2],
                name=name,
                task="sentiment" if i < 2 else "topics",
                description=f"movie reviews {name} round {j}",
            )
    reg.publish(arts[0], name="gamma", version="1.5.0", tags=["beta"])


def hot_workload(reg: Registry, arts: list[Path]) -> None:
    """Every read and write a user or the hub does often (not verify and gc)."""
    v = reg.publish(arts[1], name="team/alpha", tags=["prod"])
    for ref in ("team/alpha", "team/alpha@2", "team/alpha@prod", f"team/alpha@{v.digest[:20]}"):
        reg.resolve(ref)
    reg.by_digest(v.digest[:16])
    reg.manifest(v)
    reg.exists("team/alpha")
    for kwargs in ({}, {"task": "sentiment"}, {"method": "lora"}, {"base_model": "x"}, {"name": "gamma"}):
        for all_versions in (False, True):
            page = reg.list(**kwargs, all_versions=all_versions, limit=2)
            if page.next_cursor:
                reg.list(**kwargs, all_versions=all_versions, limit=2, cursor=page.next_cursor)
    page = reg.search("movie reviews", limit=1)
    reg.search("movie reviews", limit=1, cursor=page.next_cursor)
    page = reg.versions("team/alpha", limit=2)
    reg.versions("team/alpha", limit=2, cursor=page.next_cursor)
    reg.tag("team/alpha@1", "stable")
    reg.untag("team/alpha", "stable")
    reg.tag("team/alpha@1", "latest")
    reg.remove("team/alpha@4")
    reg.commit(reg.resolve("team/beta@1").files)


def test_every_hot_query_is_served_by_an_index(arts: list[Path]) -> None:
    reg = Registry()
    fill(reg, arts)
    statements: list[str] = []
    reg.db.conn.set_trace_callback(statements.append)
    hot_workload(reg, arts)
    reg.db.conn.set_trace_callback(None)
    queries = {s for s in statements if re.match(r"\s*(select|insert|update|delete)\b", s, re.I)}
    assert any("latest_fts" in q for q in queries) and any("seq >" in q for q in queries)
    scans = {}
    for sql in queries:
        plan = [row[3] for row in reg.db.conn.execute(f"explain query plan {sql}")]
        bad = [p for p in plan if re.match(rf"SCAN ({'|'.join(HOT_TABLES)})\b", p)]
        if bad:
            scans[sql] = bad
    assert not scans, scans


def test_the_plan_check_catches_a_scan() -> None:
    reg = Registry()
    plan = [
        r[3] for r in reg.db.conn.execute("explain query plan select * from versions where license = 'x'")
    ]
    assert any(p.startswith("SCAN versions") for p in plan)


def test_pages_cover_every_row_once_with_and_without_filters(arts: list[Path]) -> None:
    reg = Registry()
    fill(reg, arts)
    for kwargs in (
        {},
        {"task": "sentiment"},
        {"all_versions": True},
        {"all_versions": True, "task": "topics"},
    ):
        everything = [v.ref for v in reg.list(**kwargs)]
        paged, cursor, pages = [], None, 0
        while True:
            page = reg.list(**kwargs, limit=2, cursor=cursor)
            paged += [v.ref for v in page]
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
            assert len(page) == 2
        assert paged == everything and len(set(paged)) == len(paged) and pages == -(-len(everything) // 2)
    assert [v.ref for v in reg.list()] == ["gamma@1.5.0", "team/alpha@3", "team/beta@3"]
    assert [v.full_name for v in reg.list(task="sentiment")] == ["team/alpha", "team/beta"]
    versions = [v.version for v in reg.versions("gamma")]
    first = reg.versions("gamma", limit=3)
    rest = reg.versions("gamma", limit=3, cursor=first.next_cursor)
    assert [v.version for v in [*first, *rest]] == versions == ["1", "2", "3", "1.5.0"]
    assert rest.next_cursor is None


def test_search_pages_newest_first_over_latest_versions(arts: list[Path]) -> None:
    reg = Registry()
    fill(reg, arts)
    found = reg.search("reviews")
    assert [v.ref for v in found] == ["gamma@1.5.0", "team/beta@3", "team/alpha@3"]
    page = reg.search("reviews", limit=2)
    assert [v.ref for v in page] + [
        v.ref for v in reg.search("reviews", limit=2, cursor=page.next_cursor)
    ] == [v.ref for v in found]
    assert [v.full_name for v in reg.search("topics")] == ["gamma"]
    reg.publish(arts[0], name="team/beta", description="now about news")
    assert [v.full_name for v in reg.search("news")] == ["team/beta"]
    assert "team/beta" not in [v.full_name for v in reg.search("reviews")]  # its latest moved on
    reg.remove("team/beta@4")
    assert [v.full_name for v in reg.search("round 2")][:2] == ["gamma", "team/beta"]


def test_cursors_are_checked(arts: list[Path]) -> None:
    reg = Registry()
    fill(reg, arts)
    page = reg.list(limit=1)
    with pytest.raises(InvalidConfig, match="another listing"):
        reg.list(all_versions=True, cursor=page.next_cursor)
    with pytest.raises(InvalidConfig):
        reg.list(cursor="not a cursor!")
    with pytest.raises(InvalidRef, match="pages through"):
        reg.versions("team/beta", cursor=reg.versions("gamma", limit=1).next_cursor)
    for bad in (0, -1, True, "5"):
        with pytest.raises(InvalidConfig, match="limit"):
            reg.list(limit=bad)  # type: ignore[arg-type]


def test_next_version_ignores_non_integer_versions_and_latest_flag_follows_the_tag(arts: list[Path]) -> None:
    reg = Registry()
    fill(reg, arts)
    assert reg.publish(arts[0], name="gamma").version == "4"
    reg.publish(arts[0], name="gamma", version="10")
    assert reg.publish(arts[1], name="gamma").version == "11"
    reg.tag("gamma@2", "latest")
    assert [v.ref for v in reg.list(name="gamma")] == ["gamma@2"]
    flagged = reg.db.execute(
        "select version from versions where full_name = 'gamma' and is_latest = 1"
    ).fetchall()
    assert flagged == [("2",)] and reg.verify().ok


def old_schema_home(home: Path, source: Registry) -> None:
    """A registry as the first schema (m001) wrote it, holding `source`'s rows and blobs."""
    home.mkdir()
    db = Database(home / "registry.db")
    migrations.apply(db, stop_before="m002_indexes_for_scale")
    assert "vnum" not in db["versions"].columns_dict and db["versions_fts"].exists()
    new_only = {"vnum", "is_latest"}
    for row in source.db["versions"].rows:
        db["versions"].insert({k: v for k, v in row.items() if k not in new_only})
    db["files"].insert_all(source.db["files"].rows)
    db["tags"].insert_all(source.db["tags"].rows)
    db.conn.close()
    subprocess.run(["cp", "-r", str(source.home / "blobs"), str(home)], check=True)


def test_a_registry_made_by_the_first_schema_is_migrated_in_place(arts: list[Path], tmp_path: Path) -> None:
    source = Registry(tmp_path / "source")
    fill(source, arts)
    home = tmp_path / "old"
    old_schema_home(home, source)
    reg = Registry(home)
    assert not migrations.pending(reg.db) and not reg.db["versions_fts"].exists()
    assert reg.verify().ok, reg.verify().problems
    assert [v.ref for v in reg.list()] == [v.ref for v in source.list()]
    assert [v.ref for v in reg.list(all_versions=True)] == [v.ref for v in source.list(all_versions=True)]
    assert [v.ref for v in reg.search("reviews")] == [v.ref for v in source.search("reviews")]
    assert reg.resolve("gamma@beta").version == "1.5.0"
    digest = reg.resolve("team/alpha@2").digest
    assert reg.resolve(f"team/alpha@{digest[:14]}").version == "2"
    assert reg.publish(arts[1], name="gamma").version == "4"  # numbering continues past 3, not 1.5.0
    reg.close()
    assert Registry(home).resolve("gamma").version == "4"  # reopening applies nothing twice


def test_gc_walks_the_store_without_holding_the_write_lock(arts: list[Path]) -> None:
    reg = Registry()
    reg.publish(arts[0], name="g")
    garbage, _ = reg.store.put_bytes(b"unreferenced")
    walk = reg.store.digests
    writes: list[bool] = []

    def digests_while_another_process_writes():  # what a publisher does during the walk
        other = sqlite3.connect(reg.home / "registry.db", timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            writes.append(True)
        except sqlite3.OperationalError:
            writes.append(False)
        finally:
            other.close()
        yield from walk()

    reg.store.digests = digests_while_another_process_writes  # type: ignore[method-assign]
    report = reg.gc(grace_seconds=0)
    assert writes == [True] and report.removed == [garbage]


def test_gc_keeps_a_candidate_that_a_commit_referenced_after_the_walk(
    arts: list[Path], tmp_path: Path
) -> None:
    source = Registry(tmp_path / "source")
    v = source.publish(arts[0], name="late")
    reg = Registry()
    for digest in v.files.values():
        with source.store.open(digest) as f:
            reg.store.put_stream(f, expected=digest)
    walk = reg.store.digests

    def walk_then_commit():
        yield from list(walk())  # the walk saw these blobs unreferenced ...
        reg.commit(v.files)  # ... then a push committed them before the deletes

    reg.store.digests = walk_then_commit  # type: ignore[method-assign]
    assert reg.gc(grace_seconds=0).removed == []
    assert reg.verify().ok


def test_a_publish_survives_gc_removing_its_blobs_before_the_commit(arts: list[Path]) -> None:
    reg = Registry()
    put = reg.store.put_file
    calls = []

    def put_then_gc_strikes(src, *args):  # gc --grace 0 between the copy and the transaction
        digest, size = put(src, *args)
        calls.append(digest)
        if len(calls) <= 2:
            reg.store.path(digest).unlink()
        return digest, size

    reg.store.put_file = put_then_gc_strikes  # type: ignore[method-assign]
    v = reg.publish(arts[0], name="raced")
    assert reg.verify().ok and reg.open(v).method == "lora"


def test_gc_sweeps_temp_files_whose_writer_is_gone_whatever_their_age() -> None:
    reg = Registry()
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = reg.store.tmp / f"blob-{int(done.stdout)}-x1"
    alive = reg.store.tmp / f"blob-{__import__('os').getpid()}-x2"
    for p in (dead, alive):
        p.write_bytes(b"partial")
    assert reg.gc().tmp_removed == 1
    assert not dead.exists() and alive.exists()


FIRST_SCHEMA_COMMIT = "55144c1"  # main before the registry's m002: its code writes the first schema
ROOT = Path(__file__).resolve().parent.parent
OLD_PUBLISH = """
import sys
from pathlib import Path
from deltahub.registry import Registry
from tests.test_artifact import make_good
art = make_good(Path(sys.argv[1]) / "art")
reg = Registry(Path(sys.argv[1]) / "home")
for i in range(3):
    reg.publish(art, name="team/x", description="old reviews", tags=["prod"] if i == 0 else [])
reg.publish(art, name="y", version="1.5.0")
"""


def test_a_registry_written_by_the_old_code_opens_and_migrates(tmp_path: Path) -> None:
    tree = tmp_path / "old"
    tree.mkdir()
    archive = subprocess.run(
        [
            "git",
            "-C",
            str(ROOT),
            "archive",
            FIRST_SCHEMA_COMMIT,
            "deltahub",
            "tests/__init__.py",
            "tests/test_artifact.py",
        ],
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.skip(f"the old code is not in this checkout's history ({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    env = {**__import__("os").environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-c", OLD_PUBLISH, str(tmp_path)], cwd=tree, env=env, check=True)
    reg = Registry(tmp_path / "home")
    assert [v.ref for v in reg.list()] == ["team/x@3", "y@1.5.0"]
    assert reg.resolve("team/x@prod").version == "1" and reg.verify().ok
    assert [v.ref for v in reg.search("old reviews")] == ["team/x@3"]
    assert reg.publish(tmp_path / "art", name="team/x").version == "4"
