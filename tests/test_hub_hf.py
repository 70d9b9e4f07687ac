"""The Hugging Face side: the real huggingface_hub client and PEFT against our server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from deltahub.cards import CARD_MARKER
from deltahub.errors import InvalidRef
from deltahub.hub.client import HubClient, push
from deltahub.hub.hf import build_hf_folder, parse_hf_url, pull_from_hf, push_to_hf
from deltahub.registry import Registry
from tests.hub_helpers import BACKENDS, Hub, export_bytes, lora_dir, start_hub


@pytest.fixture(params=[*BACKENDS, "postgres+s3, redirect"])
def hub(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    import huggingface_hub.constants as hfc

    # conftest sets HF_HUB_OFFLINE for the whole suite; these tests talk to 127.0.0.1 only.
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # the third: S3 downloads answered with a 302 to a presigned URL (--redirect-downloads)
    backend, _, redirect = request.param.partition(", ")
    yield from start_hub(tmp_path, backend, **({"redirect_downloads": True} if redirect else {}))


@pytest.fixture
def adapter(hub: Hub, tmp_path: Path) -> tuple[Registry, Path]:
    """team/alpha@1 (tag stable) published from a PEFT directory and pushed to the hub."""
    from tests.helpers import peft_lora_dir

    src = peft_lora_dir(tmp_path / "peft-src", seed=5)
    reg = Registry(tmp_path / "local")
    reg.publish(src, "team/alpha", tags=["stable"], description="sentiment", license="apache-2.0")
    push("team/alpha", HubClient(hub.url, hub.tokens["write"]), reg, tags=["stable"])
    return reg, src


def _logits(adapter_dir: str | Path, **kw: Any) -> torch.Tensor:
    from peft import PeftModel

    from tests.helpers import tiny_llama

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), str(adapter_dir), **kw).eval()(ids).logits


def test_snapshot_download_from_our_server_then_peft_loads(
    hub: Hub, adapter: tuple[Registry, Path], tmp_path: Path
) -> None:
    from huggingface_hub import snapshot_download

    reg, src = adapter
    v = reg.resolve("team/alpha")
    want = _logits(src)
    for revision in ("main", "1", "stable", v.digest, v.digest[7:47]):
        folder = snapshot_download(
            "team/alpha",
            revision=revision,
            endpoint=hub.url,
            token=hub.tokens["read"],
            cache_dir=tmp_path / "c",
        )
        assert Path(folder).name == v.digest[7:47]  # the Hub "commit" is the digest's prefix
        files = {p.name: p.read_bytes() for p in Path(folder).iterdir()}
        assert files == {f: reg.store.path(d).read_bytes() for f, d in v.files.items()}
    assert torch.equal(_logits(folder), want)


def test_peft_from_pretrained_with_hf_endpoint(
    hub: Hub, adapter: tuple[Registry, Path], tmp_path: Path
) -> None:
    """As a user does it: HF_ENDPOINT set before Python starts, then plain PeftModel."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "logits.safetensors"
    code = (
        "import sys; from safetensors.torch import save_file; "
        f"sys.path.insert(0, {str(root)!r}); from tests.test_hub_hf import _logits; "
        f"save_file({{'x': _logits('team/alpha', revision='stable', token={hub.tokens['read']!r})}}, {str(out)!r})"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
        "TRANSFORMERS_OFFLINE": "0",
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _, src = adapter
    assert torch.equal(load_file(str(out))["x"], _logits(src))


def test_hf_errors_map_to_the_hub_clients_exceptions(hub: Hub, adapter: Any, tmp_path: Path) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    kw = {"endpoint": hub.url, "token": hub.tokens["read"], "cache_dir": tmp_path / "c"}
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("team/nothing", **kw)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("team/alpha", revision="7", **kw)


def test_pull_hf_from_our_server_keeps_the_digest(
    hub: Hub, adapter: tuple[Registry, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg, _ = adapter
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.tokens["read"])
    b = Registry(tmp_path / "b")
    v = pull_from_hf("hf://team/alpha@stable", registry=b)
    assert v.digest == reg.resolve("team/alpha").digest
    assert export_bytes(b, "team/alpha", tmp_path / "x") == export_bytes(reg, "team/alpha", tmp_path / "y")
    # Under another name it is a new publish (new manifest), with the same weights.
    w = pull_from_hf("hf://team/alpha@1", name="mine/copy", registry=b)
    assert w.ref == "mine/copy@1" and w.digest != v.digest
    assert w.files["adapter_model.safetensors"] == v.files["adapter_model.safetensors"]
    assert b.manifest(w).extra["source"] == "hf://team/alpha@1"
    assert b.verify().ok


def test_push_to_hf_builds_a_peft_loadable_folder_and_one_tagged_commit(
    adapter: tuple[Registry, Path], tmp_path: Path
) -> None:
    reg, peft_src = adapter
    # A version published from PEFT's save_pretrained keeps the README.md PEFT wrote.
    kept = build_hf_folder("team/alpha", tmp_path / "kept", reg)
    assert (kept / "README.md").read_bytes() == (peft_src / "README.md").read_bytes()
    # One without a README gets a generated model card.
    src = lora_dir(tmp_path / "plain", seed=2)
    reg.publish(src, "team/beta", license="apache-2.0", base_model="tiny-llama", metrics={"acc": 0.75})
    folder = build_hf_folder("team/beta", tmp_path / "folder", reg)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors", "deltahub.json"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: tiny-llama\nlicense: apache-2.0\n")
    assert "| metric acc | 0.75 |" in card and CARD_MARKER in card  # publish wrote the version's card
    assert torch.equal(_logits(folder), _logits(src))

    class RecordingApi:
        """Stands in for HfApi at the last step only: the Hub is unreachable from tests."""

        def __init__(self) -> None:
            self.calls: list[tuple[str, str, Any]] = []

        def create_repo(self, repo_id: str, **kw: Any) -> None:
            self.calls.append(("create_repo", repo_id, kw))

        def create_commit(self, repo_id: str, operations: list, **kw: Any) -> Any:
            uploaded = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
            self.calls.append(("create_commit", repo_id, uploaded))
            return type("Commit", (), {"oid": "c" * 40, "commit_url": "http://hub/commit"})()

        def create_tag(self, repo_id: str, **kw: Any) -> None:
            self.calls.append(("create_tag", repo_id, kw))

    api = RecordingApi()
    result = push_to_hf("team/beta", "hf://org/repo", reg, api=api)
    assert result["tag"] == "v1" and result["repo_id"] == "org/repo"
    kinds = [c[0] for c in api.calls]
    assert kinds == ["create_repo", "create_commit", "create_tag"]  # one commit, then its tag
    uploaded = api.calls[1][2]
    assert uploaded == {p.name: p.read_bytes() for p in folder.iterdir()}
    assert api.calls[2][2]["revision"] == "c" * 40 and api.calls[2][2]["tag"] == "v1"


def test_parse_hf_url() -> None:
    assert parse_hf_url("hf://org/repo") == ("org/repo", None)
    assert parse_hf_url("hf://org/repo@v2") == ("org/repo", "v2")
    for bad in ("org/repo", "hf://org/../x", "hf://org/repo@", "hf://a/b/c"):
        with pytest.raises(InvalidRef):
            parse_hf_url(bad)
