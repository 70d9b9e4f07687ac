"""The HF-compatible routes answer what `huggingface_hub` asks (the client vLLM's HF
resolver and LoRAX's hub source use): hf_hub_download, snapshot_download, model_info,
list_repo_files, and the metadata headers, with the revision pinned to the version's digest.

The real client against a real server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from deltahub.hub.client import HubClient, push
from deltahub.registry import Registry, Version
from tests.hub_helpers import Hub, lora_dir, start_hub


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)  # conftest sets it for the suite
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    yield from start_hub(tmp_path)


@pytest.fixture
def two(hub: Hub, tmp_path: Path) -> tuple[Version, Version]:
    """team/sentiment@1 and @2 on the hub; the tag prod names @1, latest is @2."""
    reg = Registry(tmp_path / "publisher")
    reg.publish(lora_dir(tmp_path / "a", seed=1), "team/sentiment", tags=["prod"])
    reg.publish(lora_dir(tmp_path / "b", seed=2), "team/sentiment")
    client = HubClient(hub.url, hub.tokens["write"])
    push("team/sentiment@1", client, reg, tags=["prod"])
    push("team/sentiment@2", client, reg)
    return reg.resolve("team/sentiment@1"), reg.resolve("team/sentiment@2")


def _hex(v: Version) -> str:
    return v.digest.split(":", 1)[1]


def test_model_info_and_list_repo_files(hub: Hub, two: tuple[Version, Version]) -> None:
    from huggingface_hub import HfApi

    v1, v2 = two
    api = HfApi(endpoint=hub.url, token=hub.tokens["read"])
    assert api.model_info("team/sentiment").sha == _hex(v2)[:40]  # no revision: latest
    info = api.model_info("team/sentiment", revision="prod")
    assert info.sha == _hex(v1)[:40] and info.id == "team/sentiment"
    assert sorted(s.rfilename for s in info.siblings) == sorted(v1.files)
    # The revision may be the digest: full, `sha256:`-prefixed, or the 40-hex commit.
    for rev in (_hex(v1), v1.digest, _hex(v1)[:40]):
        assert api.model_info("team/sentiment", revision=rev).sha == _hex(v1)[:40]
    assert sorted(api.list_repo_files("team/sentiment", revision=v1.digest)) == sorted(v1.files)
    assert sorted(api.list_repo_files("team/sentiment")) == sorted(v2.files)
    tree = {f.path: f for f in api.list_repo_tree("team/sentiment", revision="prod")}
    blob = Registry(hub.home).store.path(v1.files["adapter_model.safetensors"])
    entry = tree["adapter_model.safetensors"]
    assert entry.size == blob.stat().st_size
    assert entry.lfs is not None and entry.lfs.sha256 == _hex_of_file(blob)


def _hex_of_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_metadata_headers(hub: Hub, two: tuple[Version, Version]) -> None:
    import httpx
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    v1, _ = two
    url = hf_hub_url("team/sentiment", "adapter_model.safetensors", revision="prod", endpoint=hub.url)
    meta = get_hf_file_metadata(url, token=hub.tokens["read"])
    blob = Registry(hub.home).store.path(v1.files["adapter_model.safetensors"])
    assert meta.commit_hash == _hex(v1)[:40]
    assert meta.etag == _hex_of_file(blob)
    assert meta.size == blob.stat().st_size
    head = httpx.head(url, headers={"Authorization": f"Bearer {hub.tokens['read']}"})
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == _hex(v1)[:40]
    assert head.headers["X-Linked-Etag"] == f'"{_hex_of_file(blob)}"'
    assert int(head.headers["X-Linked-Size"]) == blob.stat().st_size


def test_hf_hub_download_and_snapshot_download_by_digest(
    hub: Hub, two: tuple[Version, Version], tmp_path: Path
) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    v1, v2 = two
    token = hub.tokens["read"]
    path = hf_hub_download(
        "team/sentiment", "adapter_config.json", revision=v1.digest, endpoint=hub.url, token=token
    )
    assert "sha256:" + _hex_of_file(Path(path)) == v1.files["adapter_config.json"]
    for v, rev in ((v1, "prod"), (v2, None), (v1, _hex(v1))):
        snap = Path(snapshot_download("team/sentiment", revision=rev, endpoint=hub.url, token=token))
        assert snap.name == _hex(v)[:40]
        assert {f: "sha256:" + _hex_of_file(snap / f) for f in v.files} == v.files


def test_a_missing_revision_and_file_raise_the_clients_errors(hub: Hub, two: tuple[Version, Version]) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=hub.url, token=hub.tokens["read"])
    with pytest.raises(RevisionNotFoundError):
        api.model_info("team/sentiment", revision="sha256:" + "0" * 64)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("team/nothing")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("team/sentiment", "nope.json", endpoint=hub.url, token=hub.tokens["read"])
