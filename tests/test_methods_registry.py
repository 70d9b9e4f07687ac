"""The method registry: lazy schema and runtime lookups, and the old import paths."""

from __future__ import annotations

import importlib
import sys

import pytest

from deltahub import artifact as af
from deltahub.errors import InvalidArtifact, Unsupported
from deltahub.methods import get_method, get_schema, known_methods, register_method, schema_methods
from deltahub.methods import registry as method_registry


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    known_methods()
    monkeypatch.setattr(method_registry, "_METHODS", dict(method_registry._METHODS))


def test_builtin_methods_are_all_registered() -> None:
    assert set(schema_methods()) >= {
        "bitfit",
        "bottleneck",
        "fusion",
        "ia3",
        "lora",
        "prefix_tuning",
        "prompt_tuning",
        "ssf",
    }
    # training names have a runtime and no schema of their own
    assert {"prompt", "prefix", "ptuning-v2"} <= set(known_methods()) - set(schema_methods())
    assert get_method("ptuning-v2").__name__ == "PTuningV2"
    assert get_method("fusion").__module__ == "deltahub.fusion.layer"


def test_lookups_fail_by_name(scratch_registry: None) -> None:
    with pytest.raises(InvalidArtifact) as e:
        get_schema("mystery")
    assert e.value.rule == "unknown-method" and "lora" in str(e.value)
    with pytest.raises(Unsupported, match="no runtime for adapter method 'mystery'"):
        get_method("mystery")
    register_method("schema-only", schema=lambda config, tensors: None)
    get_schema("schema-only")
    with pytest.raises(Unsupported):
        get_method("schema-only")
    with pytest.raises(ValueError, match="module:attribute"):
        register_method("x", runtime="no.colon.here")


def test_references_resolve_once_and_lazily(scratch_registry: None) -> None:
    register_method("lazy", schema="json:loads", runtime="collections:OrderedDict")
    assert isinstance(method_registry._METHODS["lazy"].schema, str)  # nothing imported yet
    assert get_schema("lazy") is importlib.import_module("json").loads
    assert method_registry._METHODS["lazy"].schema is get_schema("lazy")
    # registering again replaces only what is given
    register_method("lazy", runtime=dict)
    assert get_method("lazy") is dict and get_schema("lazy") is importlib.import_module("json").loads


def test_register_config_checker_still_validates(scratch_registry: None) -> None:
    seen = []
    af.register_config_checker("checked", lambda config, tensors: seen.append(config["method"]))
    assert af.validate({"method": "checked"}, {}) == "checked"
    assert seen == ["checked"]


OLD_PATHS = [
    ("deltahub.compose.methods.lora", "LoraAdapter", "deltahub.methods.lora.runtime"),
    ("deltahub.compose.methods.bottleneck", "BottleneckAdapter", "deltahub.methods.bottleneck.runtime"),
    ("deltahub.compose.methods.ia3", "IA3Adapter", "deltahub.methods.ia3.runtime"),
    ("deltahub.compose.methods.bitfit", "BitFitAdapter", "deltahub.methods.bitfit.runtime"),
    ("deltahub.compose.methods.ssf", "SSFAdapter", "deltahub.methods.ssf.runtime"),
    ("deltahub.compose.methods.prompt", "PrefixTuning", "deltahub.methods.prompt.runtime"),
    ("deltahub.compose.methods.common", "AdapterModule", "deltahub.methods.common"),
    ("deltahub.compose.methods.affine", "fold_output", "deltahub.methods.affine"),
    ("deltahub.method_schemas", "BottleneckConfig", "deltahub.methods.bottleneck.schema"),
    ("deltahub.method_schemas", "FusionConfig", "deltahub.methods.fusion.schema"),
    ("deltahub.method_schemas", "FUSION_PARTS", "deltahub.methods.fusion.schema"),
]


@pytest.mark.parametrize(("old", "name", "new"), OLD_PATHS, ids=[f"{o}.{n}" for o, n, _ in OLD_PATHS])
def test_old_import_paths_warn_and_give_the_same_objects(
    old: str, name: str, new: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, old, raising=False)
    monkeypatch.delitem(sys.modules, "deltahub.compose.methods", raising=False)
    with pytest.warns(DeprecationWarning, match="moved to"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_old_helpers_keep_working(monkeypatch: pytest.MonkeyPatch, scratch_registry: None) -> None:
    monkeypatch.delitem(sys.modules, "deltahub.compose.methods", raising=False)
    with pytest.warns(DeprecationWarning):
        old = importlib.import_module("deltahub.compose.methods")
    old.register_method("old-style", dict)  # (name, runtime class), as before
    assert get_method("old-style") is dict and old.get_method("lora") is get_method("lora")
    assert af.TASK_HEAD_PREFIX == importlib.import_module("deltahub.method_schemas").HEAD_PREFIX
    with pytest.warns(DeprecationWarning):
        assert af.check_lora_config is importlib.import_module("deltahub.methods.lora.schema").check_config


def test_a_schema_that_trips_on_a_value_still_answers_with_a_rule(scratch_registry: None) -> None:
    def careless(config: dict, tensors: dict) -> None:
        config["size"] * 2 + 1  # a str size raises TypeError

    register_method("careless", schema=careless)
    with pytest.raises(InvalidArtifact) as e:
        af.validate({"method": "careless", "size": "big"}, {})
    assert e.value.rule == "config-schema" and "TypeError" in str(e.value)
