"""The vLLM resolver plugin: refs in, digest-pinned LoRARequests out, refusals with reasons.

Against vLLM's real classes when `vllm` is importable; otherwise against a test double of
`vllm.lora.resolver` and `vllm.lora.request` injected into `sys.modules`, following vLLM's
published signatures (v0.11 - v0.26: `LoRAResolver.resolve_lora(base_model_name, lora_name)`
async, `_LoRAResolverRegistry.register_resolver / get_resolver / get_supported_resolvers`,
`LoRARequest(lora_name, lora_int_id, lora_path="", base_model_name=None, ...)` with its
`id must be > 0` and non-empty path checks, equal by `lora_name`).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import importlib.util
import json
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deltahub import artifact as af
from deltahub.errors import AuthError
from deltahub.registry import Registry
from deltahub.serving import vllm_resolver as vr
from tests.hub_helpers import Hub, lora_dir, start_hub

REAL_VLLM = importlib.util.find_spec("vllm") is not None


def _double() -> dict[str, types.ModuleType]:
    """Modules `vllm`, `vllm.lora`, `vllm.lora.resolver`, `vllm.lora.request` (see the docstring)."""

    @dataclass
    class LoRARequest:
        lora_name: str
        lora_int_id: int
        lora_path: str = ""
        base_model_name: str | None = None
        tensorizer_config_dict: dict | None = None
        load_inplace: bool = False

        def __post_init__(self) -> None:
            if self.lora_int_id < 1:
                raise ValueError(f"id must be > 0, got {self.lora_int_id}")
            assert self.lora_path, "lora_path cannot be empty"

        def __eq__(self, other: object) -> bool:
            return isinstance(other, self.__class__) and self.lora_name == other.lora_name

        def __hash__(self) -> int:
            return hash(self.lora_name)

    class LoRAResolver(abc.ABC):
        @abc.abstractmethod
        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            pass

    @dataclass
    class _LoRAResolverRegistry:
        resolvers: dict[str, LoRAResolver] = field(default_factory=dict)

        def get_supported_resolvers(self) -> Any:
            return self.resolvers.keys()

        def register_resolver(self, resolver_name: str, resolver: LoRAResolver) -> None:
            self.resolvers[resolver_name] = resolver

        def get_resolver(self, resolver_name: str) -> LoRAResolver:
            if resolver_name not in self.resolvers:
                raise KeyError(f"LoRA resolver '{resolver_name}' not found.")
            return self.resolvers[resolver_name]

    vllm, lora = types.ModuleType("vllm"), types.ModuleType("vllm.lora")
    resolver, request = types.ModuleType("vllm.lora.resolver"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest  # type: ignore[attr-defined]
    resolver.LoRAResolver = LoRAResolver  # type: ignore[attr-defined]
    resolver.LoRAResolverRegistry = _LoRAResolverRegistry()  # type: ignore[attr-defined]
    vllm.lora, lora.resolver, lora.request = lora, resolver, request  # type: ignore[attr-defined]
    return {"vllm": vllm, "vllm.lora": lora, "vllm.lora.resolver": resolver, "vllm.lora.request": request}


@pytest.fixture
def vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """vLLM's resolver module (real, or the double), with deltahub's resolver registered."""
    if not REAL_VLLM:
        for name, module in _double().items():
            monkeypatch.setitem(sys.modules, name, module)
    vr.resolver_class.cache_clear()
    vr.register()
    yield sys.modules["vllm.lora.resolver"]
    vr.resolver_class.cache_clear()


def _resolve(vllm: types.ModuleType, name: str, base: str = "tiny-llama") -> Any:
    resolver = vllm.LoRAResolverRegistry.get_resolver(vr.RESOLVER_NAME)
    return asyncio.run(resolver.resolve_lora(base, name))


def _variant(path: Path, seed: int, **config: Any) -> Path:
    lora_dir(path, seed)
    cfg = json.loads((path / af.CONFIG_FILE).read_text())
    (path / af.CONFIG_FILE).write_text(json.dumps({**cfg, **config}))
    return path


@pytest.fixture
def versions(deltahub_home: Path, tmp_path: Path) -> Registry:
    """team/sentiment@1 and @2 (different weights); the tag prod names @1."""
    reg = Registry()
    reg.publish(lora_dir(tmp_path / "v1", seed=1), "team/sentiment", tags=["prod"])
    reg.publish(lora_dir(tmp_path / "v2", seed=2), "team/sentiment")
    return reg


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_entry_point_is_in_the_installed_metadata() -> None:
    # The package is installed (editable here, fresh in CI), so its metadata carries it.
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert eps["deltahub"].value == "deltahub.serving.vllm_resolver:register"
    assert eps["deltahub"].load() is vr.register


def test_importing_the_plugin_does_not_import_vllm() -> None:
    code = "import sys, deltahub.serving.vllm_resolver, deltahub.serving; assert 'vllm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_register_puts_a_lora_resolver_in_vllms_registry(vllm: types.ModuleType) -> None:
    assert vr.RESOLVER_NAME in vllm.LoRAResolverRegistry.get_supported_resolvers()
    assert isinstance(vllm.LoRAResolverRegistry.get_resolver(vr.RESOLVER_NAME), vllm.LoRAResolver)


def test_two_versions_get_distinct_names_ids_and_directories(
    vllm: types.ModuleType, versions: Registry
) -> None:
    v1, v2 = versions.resolve("team/sentiment@1"), versions.resolve("team/sentiment@2")
    r1 = _resolve(vllm, "team/sentiment@prod")
    r2 = _resolve(vllm, "team/sentiment@2")
    request_cls = sys.modules["vllm.lora.request"].LoRARequest
    assert isinstance(r1, request_cls) and isinstance(r2, request_cls)
    assert r1.lora_name == f"team/sentiment@{v1.digest}"
    assert r2.lora_name == f"team/sentiment@{v2.digest}"
    assert r1 != r2  # vLLM keys its caches by lora_name
    # Stable, positive, int32: the digest's first 31 bits.
    assert r1.lora_int_id == (int(v1.digest[7:15], 16) & 0x7FFFFFFF or 1)
    assert r1.lora_int_id != r2.lora_int_id and 0 < r2.lora_int_id < 2**31
    for req, v in ((r1, v1), (r2, v2)):
        path = Path(req.lora_path)
        assert path.name == v.digest.split(":")[1]
        assert {f: _sha(path / f) for f in v.files} == v.files  # verified bytes, digest-keyed
        assert af.load_dir(path).config["peft_type"] == "LORA"
    if not REAL_VLLM or hasattr(r1, "base_model_name"):
        assert r1.base_model_name == "tiny-llama"
    # By digest: the same request as by tag; moving the tag moves what a new resolve gets.
    assert _resolve(vllm, f"team/sentiment@{v1.digest}").lora_path == r1.lora_path
    versions.tag("team/sentiment@2", "prod")
    assert _resolve(vllm, "team/sentiment@prod").lora_name == r2.lora_name


def test_unknown_names_go_to_the_next_resolver(vllm: types.ModuleType, versions: Registry) -> None:
    assert _resolve(vllm, "team/nothing@1") is None
    assert _resolve(vllm, "team/sentiment@9") is None
    assert _resolve(vllm, "not a ref!") is None


def test_refusals_name_the_rule(vllm: types.ModuleType, tmp_path: Path) -> None:
    reg = Registry()
    reg.publish(lora_dir(tmp_path / "ok", seed=3), "team/ok")
    with pytest.raises(vr.ServingRefused, match=r"base-mismatch: .*'tiny-llama'.*'other/model'"):
        _resolve(vllm, "team/ok", base="other/model")
    bias = _variant(tmp_path / "bias", 4, bias="lora_only")
    # lora_only saves the targeted modules' biases; write one so the artifact says so.
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(bias / af.WEIGHTS_FILE))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"] = torch.zeros(64)
    save_file(tensors, str(bias / af.WEIGHTS_FILE))
    reg.publish(bias, "team/bias")
    with pytest.raises(vr.ServingRefused, match=r"bias: "):
        _resolve(vllm, "team/bias")


def test_dora_is_refused_with_the_conversion_named(vllm: types.ModuleType, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = _variant(tmp_path / "dora", 5, use_dora=True)
    tensors = load_file(str(path / af.WEIGHTS_FILE))
    for key in [k for k in tensors if k.endswith("lora_B.weight")]:
        module = key.removesuffix(".lora_B.weight")
        tensors[f"{module}.lora_magnitude_vector"] = torch.ones(tensors[key].shape[0])
    save_file(tensors, str(path / af.WEIGHTS_FILE))
    Registry().publish(path, "team/dora")
    with pytest.raises(vr.ServingRefused, match=r"dora: .*DoRA.*fix: export --target vllm --convert"):
        _resolve(vllm, "team/dora")


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    yield from start_hub(tmp_path)


def test_a_ref_on_a_hub_is_pulled_verified(
    vllm: types.ModuleType, hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltahub.hub.client import HubClient, push

    src = Registry(tmp_path / "publisher")
    src.publish(lora_dir(tmp_path / "h1", seed=6), "team/remote", tags=["prod"])
    push("team/remote", HubClient(hub.url, hub.tokens["write"]), src, tags=["prod"])
    v = src.resolve("team/remote@prod")
    monkeypatch.setenv("DELTAHUB_REMOTE", hub.url)
    monkeypatch.setenv("DELTAHUB_TOKEN", hub.tokens["read"])
    req = _resolve(vllm, "team/remote@prod")
    assert req.lora_name == f"team/remote@{v.digest}"
    assert {f: _sha(Path(req.lora_path) / f) for f in v.files} == v.files
    assert Registry().resolve("team/remote@1").digest == v.digest  # pulled into $DELTAHUB_HOME
    monkeypatch.setenv("DELTAHUB_TOKEN", "dh_not_a_token")
    with pytest.raises(AuthError):
        _resolve(vllm, "team/remote@prod")  # a tag is asked of the hub each time
    # A pinned digest already here needs no hub.
    assert _resolve(vllm, f"team/remote@{v.digest}").lora_path == req.lora_path


def test_the_base_is_checked_by_fingerprint_when_the_served_config_is_here(
    vllm: types.ModuleType, tmp_path: Path
) -> None:
    from deltahub.compose import load_base
    from tests.compose_helpers import tiny

    tiny("llama").save_pretrained(tmp_path / "llama")
    tiny("llama", num_hidden_layers=3).save_pretrained(tmp_path / "deeper")
    fp = load_base(str(tmp_path / "llama")).deltahub_fingerprint
    Registry().publish(
        lora_dir(tmp_path / "a", seed=7), "team/fp", base_model="tiny-llama", base_fingerprint=fp
    )
    # Served from a path under another name: the fingerprint (config + parameter shapes) matches.
    assert _resolve(vllm, "team/fp", base=str(tmp_path / "llama")) is not None
    with pytest.raises(vr.ServingRefused, match=r"base-mismatch: .*fingerprint"):
        _resolve(vllm, "team/fp", base=str(tmp_path / "deeper"))


def test_concurrent_resolves_of_one_version_share_one_directory(
    vllm: types.ModuleType, versions: Registry
) -> None:
    async def many() -> list[Any]:
        resolver = vllm.LoRAResolverRegistry.get_resolver(vr.RESOLVER_NAME)
        return await asyncio.gather(
            *(resolver.resolve_lora("tiny-llama", "team/sentiment@1") for _ in range(6))
        )

    paths = {r.lora_path for r in asyncio.run(many())}
    assert len(paths) == 1
    root = Path(next(iter(paths))).parent
    assert [p.name for p in root.iterdir()] == [Path(next(iter(paths))).name]  # no temporaries left
