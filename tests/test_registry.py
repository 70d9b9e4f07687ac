"""The local registry: publish, resolve, list, search, tag, export, rm, verify, gc."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from deltahub import artifact as af
from deltahub.errors import AlreadyExists, InvalidRef, NotFound
from deltahub.registry import Registry, parse_ref
from tests.helpers import peft_lora_dir, tiny_llama


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peft_lora_dir(tmp_path_factory.mktemp("lora") / "a", seed=1)


@pytest.fixture(scope="module")
def lora_dir_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peft_lora_dir(tmp_path_factory.mktemp("lora") / "b", seed=2)


def test_peft_round_trip_publish_list_show_export_loads_in_peft(lora_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    registry = Registry()
    v = registry.publish(lora_dir, name="team/sentiment", task="classification", metrics={"acc": 0.9})
    assert v.ref == "team/sentiment@1"
    assert v.method == "lora"
    assert [x.ref for x in registry.list()] == ["team/sentiment@1"]
    shown = registry.show("team/sentiment")
    assert shown.digest == v.digest and shown.metrics == {"acc": 0.9} and "latest" in shown.tags

    out = registry.export("team/sentiment@1", tmp_path / "export")
    for name in (af.WEIGHTS_FILE, af.CONFIG_FILE):
        assert (out / name).read_bytes() == (lora_dir / name).read_bytes()
    manifest = json.loads((out / af.MANIFEST_FILE).read_text())
    assert manifest["name"] == "team/sentiment" and manifest["version"] == "1"

    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(tiny_llama(), str(lora_dir)).eval()(input_ids=ids).logits
        got = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()(input_ids=ids).logits
        bare = tiny_llama()(input_ids=ids).logits
    assert (expected - bare).abs().max() > 1e-3  # the adapter does something
    assert torch.equal(expected, got)


def test_versions_are_immutable_and_numbered(lora_dir: Path, lora_dir_b: Path) -> None:
    registry = Registry()
    assert registry.publish(lora_dir, name="a").version == "1"
    assert registry.publish(lora_dir_b, name="a").version == "2"
    assert registry.publish(lora_dir, name="a", version="1.5.0").version == "1.5.0"
    assert registry.publish(lora_dir, name="a").version == "3"
    with pytest.raises(AlreadyExists, match="a@2 already exists"):
        registry.publish(lora_dir, name="a", version="2")
    assert [v.version for v in registry.versions("a")] == ["1", "2", "1.5.0", "3"]
    assert registry.resolve("a").version == "3"  # latest follows the newest publish


def test_resolve_by_version_tag_and_digest(lora_dir: Path, lora_dir_b: Path) -> None:
    registry = Registry()
    v1 = registry.publish(lora_dir, name="ns/x", tags=["prod"])
    v2 = registry.publish(lora_dir_b, name="ns/x")
    assert registry.resolve("ns/x@1").digest == v1.digest
    assert registry.resolve("ns/x@prod").digest == v1.digest
    assert registry.resolve("ns/x@latest").digest == v2.digest
    assert registry.resolve(f"ns/x@{v2.digest[:15]}").version == "2"
    assert registry.by_digest(v1.digest).ref == "ns/x@1"
    registry.tag("ns/x@2", "prod")
    assert registry.resolve("ns/x@prod").version == "2"
    with pytest.raises(NotFound, match="no tag 'beta'"):
        registry.resolve("ns/x@beta")
    with pytest.raises(NotFound, match="no adapter named 'ns/y'"):
        registry.resolve("ns/y")
    with pytest.raises(NotFound, match="no version"):
        registry.resolve("ns/x@sha256:000000")


@pytest.mark.parametrize(
    "text", ["", "@1", "a@", "a/b/c", "../x", "a@sha256:xyz", "a@-1", "a b", "a@sha256:12", ".hidden"]
)
def test_malformed_refs_are_refused(text: str) -> None:
    with pytest.raises(InvalidRef):
        parse_ref(text)


def test_parse_ref_kinds() -> None:
    assert parse_ref("x").selector == "latest"
    assert parse_ref("ns/x@3").kind == "version"
    assert parse_ref("x@prod").kind == "tag"
    assert parse_ref("x@sha256:abcdef").kind == "digest"
    assert parse_ref("ns/x@3").full_name == "ns/x"


def test_list_filters_and_search(lora_dir: Path) -> None:
    registry = Registry()
    registry.publish(
        lora_dir, name="sent", task="sentiment", description="movie review polarity", base_model="llama-tiny"
    )
    registry.publish(
        lora_dir, name="topic", task="topics", description="news topic classifier", base_model="other"
    )
    registry.publish(lora_dir, name="sent")  # a second version inherits description, task, base
    assert registry.resolve("sent@2").description == "movie review polarity"
    assert [v.full_name for v in registry.list(base_model="llama-tiny")] == ["sent"]
    assert [v.full_name for v in registry.list(task="topics")] == ["topic"]
    assert registry.list(method="bottleneck") == []
    assert len(registry.list(all_versions=True)) == 3
    assert [v.full_name for v in registry.search("polarity")] == ["sent"]
    assert [v.full_name for v in registry.search("classif")] == ["topic"]  # prefix match
    assert registry.search('"; drop table versions; --') == []  # FTS syntax cannot be injected
    assert len(registry.list(all_versions=True)) == 3


def test_remove_moves_latest_back_and_gc_reclaims_blobs(lora_dir: Path, lora_dir_b: Path) -> None:
    registry = Registry()
    registry.publish(lora_dir, name="r")
    v2 = registry.publish(lora_dir_b, name="r")
    registry.remove("r@2")
    assert registry.resolve("r").version == "1"
    with pytest.raises(NotFound):
        registry.resolve("r@2")
    only_v2 = set(v2.files.values()) - set(registry.resolve("r@1").files.values())
    assert only_v2 and all(registry.store.has(d) for d in only_v2)
    assert registry.gc().removed == []  # within the grace period nothing goes
    report = registry.gc(grace_seconds=0)
    assert set(report.removed) == only_v2 and report.bytes_freed > 0
    assert registry.verify().ok
    registry.remove("r@1")
    assert registry.list(all_versions=True) == []


def test_gc_grace_protects_fresh_blobs_of_an_unfinished_publish(lora_dir: Path) -> None:
    registry = Registry()
    digest, _ = registry.store.put_file(lora_dir / af.WEIGHTS_FILE)  # blobs written, version not committed
    assert registry.gc(grace_seconds=60).removed == []
    old = time.time() - 120
    os.utime(registry.store.path(digest), (old, old))
    assert registry.gc(grace_seconds=60).removed == [digest]


def test_verify_detects_corrupt_and_missing_blobs(lora_dir: Path) -> None:
    registry = Registry()
    v = registry.publish(lora_dir, name="v")
    assert registry.verify().ok
    weights = registry.store.path(v.files[af.WEIGHTS_FILE])
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    report = registry.verify()
    assert not report.ok and "corrupt" in report.problems[0]
    registry.store.path(v.files[af.CONFIG_FILE]).unlink()
    assert any("missing" in p for p in registry.verify().problems)


def test_export_refuses_non_empty_target_and_corrupt_blob(lora_dir: Path, tmp_path: Path) -> None:
    registry = Registry()
    v = registry.publish(lora_dir, name="e")
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "x").write_text("keep me")
    with pytest.raises(AlreadyExists):
        registry.export("e", target)
    assert (target / "x").read_text() == "keep me"
    registry.store.path(v.files[af.WEIGHTS_FILE]).write_bytes(b"garbage")
    from deltahub.errors import IntegrityError

    with pytest.raises(IntegrityError):
        registry.export("e", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_publish_fills_manifest_from_peft_config_and_flags(lora_dir: Path) -> None:
    registry = Registry()
    v = registry.publish(
        lora_dir,
        name="m",
        task="qa",
        description="d",
        license="apache-2.0",
        base_model="org/base",
        base_fingerprint="sha256:" + "a" * 64,
        metrics={"f1": 0.5},
    )
    m = registry.manifest(v)
    assert (m.name, m.version, m.method, m.task, m.license) == ("m", "1", "lora", "qa", "apache-2.0")
    assert m.base_model == "org/base" and m.metrics == {"f1": 0.5}
    child = registry.publish(lora_dir, name="child", parents=[{"ref": v.ref, "digest": v.digest}])
    assert child.parents == [{"ref": "m@1", "digest": v.digest, "role": "parent"}]
    with pytest.raises(NotFound):
        registry.publish(lora_dir, name="orphan", parents=[{"ref": "x", "digest": "sha256:" + "f" * 64}])


def test_commit_is_idempotent_and_refuses_conflicts(lora_dir: Path, lora_dir_b: Path, tmp_path: Path) -> None:
    source = Registry(tmp_path / "source")
    v = source.publish(lora_dir, name="c")
    other = source.publish(lora_dir_b, name="other")
    target = Registry(tmp_path / "target")
    for digest in v.files.values():
        with source.store.open(digest) as f:
            target.store.put_stream(f, expected=digest)
    first = target.commit(v.files)
    again = target.commit(v.files, tags=["stable"])
    assert first.digest == again.digest == v.digest
    assert "stable" in target.resolve("c@1").tags
    with pytest.raises(NotFound, match="blobs not in the store"):
        target.commit(other.files)


def test_committing_an_older_version_does_not_move_latest(
    lora_dir: Path, lora_dir_b: Path, tmp_path: Path
) -> None:
    source = Registry(tmp_path / "source")
    v1 = source.publish(lora_dir, name="p")
    v2 = source.publish(lora_dir_b, name="p")
    target = Registry(tmp_path / "target")
    for v in (v2, v1):  # pull the newer first, then the older
        for digest in v.files.values():
            with source.store.open(digest) as f:
                target.store.put_stream(f, expected=digest)
        target.commit(v.files)
    assert target.resolve("p").version == "2"
    assert target.resolve("p@1").digest == v1.digest
