"""AdapterHub (`adapters` 1.3.0) adapters in and out, against outputs `adapters` itself computed.

Fixtures: tests/fixtures/adapterhub (made by make_fixtures.py in a venv with `adapters` and
transformers 4.57; SPEC.md has the math). Every case is published into deltahub, loaded on
the fixture's base and run on its inputs: max abs difference <= 1e-5 (fp32) from the
`adapters` output, or refused at publish with the rule named. The tests marked
`needs_adapters` also load deltahub's exports with `adapters`' own `load_adapter`; they run
where `adapters` is importable (.ci/run's second venv) and are skipped elsewhere.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deltahub import AdaptedModel, Average, Registry, load_base
from deltahub.errors import InvalidArtifact, Unsupported
from tests import adapterhub_helpers as ah
from tests.compose_helpers import ids, randomize, tiny

try:
    import adapters  # noqa: F401

    HAVE_ADAPTERS = True
except ImportError:
    HAVE_ADAPTERS = False
needs_adapters = pytest.mark.skipif(
    not HAVE_ADAPTERS, reason="AdapterHub's `adapters` is not installed (.ci/run checks this in its own venv)"
)


# --------------------------------------------------------------------------- import


@pytest.mark.parametrize("case", ah.EXACT)
def test_fixture_imports_exactly(case: str) -> None:
    _, outputs = ah.io(case)
    got = ah.deltahub_output(Registry(), case)
    assert ah.max_abs(got, outputs["base"]) > 0.1  # the adapter does change the output
    assert ah.max_abs(got, outputs["adapted"]) <= ah.TOL


@pytest.mark.parametrize("case", sorted(ah.REFUSED))
def test_unrepresentable_cases_are_refused_at_publish(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rule, words = ah.REFUSED[case]

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was opened for unpickling")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    with pytest.raises(InvalidArtifact) as e:
        Registry().publish(ah.adapter_dir(case), "x")
    assert e.value.rule == rule and words in str(e.value)
    assert not Registry().list()  # nothing was published


def test_pickle_refusal_never_opens_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_open = builtins.open

    def guarded_open(file: object, *args: object, **kwargs: object) -> object:
        assert not str(file).endswith(".bin"), f"{file} was opened"
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(InvalidArtifact, match=r"use_safetensors=True") as e:
        Registry().publish(ah.adapter_dir("bert-bin-refusal"), "x")
    assert "save_adapter" in str(e.value)


def test_loading_a_path_converts_too() -> None:
    model = AdaptedModel(load_base(ah.base_model("llama"), device="cpu"))
    model.load_path(ah.adapter_dir("llama-ia3"), "ia3")
    _, outputs = ah.io("llama-ia3")
    assert ah.max_abs(ah.run(model, "llama-ia3", "ia3"), outputs["adapted"]) <= ah.TOL


def _copy(case: str, tmp_path: Path) -> tuple[Path, dict]:
    d = tmp_path / case
    shutil.copytree(ah.adapter_dir(case), d)
    return d, json.loads((d / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    "option,value,words",
    [
        ("ln_before", True, "ln_before"),
        ("use_gating", True, "use_gating"),
        ("original_ln_after", False, "original_ln_after"),
        ("residual_before_ln", "post_add", "residual_before_ln"),
        ("scaling", "learned", "scaling"),
        ("non_linearity", "leakyrelu", "non_linearity"),
        ("reduction_factor", {"0": 4, "1": 8, "default": 4}, "reduction_factor"),
        ("inv_adapter", "nice", "inv_adapter"),
        ("brand_new_option", 1, "brand_new_option"),
    ],
)
def test_bottleneck_options_we_cannot_run_are_named(
    tmp_path: Path, option: str, value: object, words: str
) -> None:
    d, cfg = _copy("bert-pfeiffer", tmp_path)
    cfg["config"][option] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArtifact, match=words) as e:
        Registry().publish(d, "x")
    assert e.value.rule == "adapterhub-unsupported"


def test_legacy_config_without_version_gets_adapters_gelu_rename(tmp_path: Path) -> None:
    """adapters renames gelu -> gelu_new for configs without "version"; so does the import."""
    d, cfg = _copy("roberta-pfeiffer", tmp_path)  # non_linearity gelu
    del cfg["version"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert Registry().open(Registry().publish(d, "x")).config["non_linearity"] == "gelu_new"


def test_lora_and_fusion_options_are_named(tmp_path: Path) -> None:
    d, cfg = _copy("bert-lora", tmp_path)
    cfg["config"]["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArtifact, match="use_dora"):
        Registry().publish(d, "x")
    fusion = tmp_path / "bert-fusion"
    shutil.copytree(ah.FIX / "bert-fusion", fusion)
    cfg = json.loads((fusion / "fusion" / "adapter_fusion_config.json").read_text())
    cfg["config"]["temperature"] = True
    (fusion / "fusion" / "adapter_fusion_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArtifact, match="temperature=true"):
        Registry().publish(fusion / "fusion", "f")
    assert not Registry().list()  # refused before any constituent was published


def test_fusion_pins_its_constituents() -> None:
    registry = Registry()
    v = registry.publish(ah.FIX / "bert-fusion" / "fusion", "fz")
    roles = {p["role"] if isinstance(p, dict) else p.role for p in v.parents}
    assert roles == {"constituent"} and len(v.parents) == 2
    assert {registry.resolve("fz-a").method, registry.resolve("fz-b").method} == {"bottleneck"}


def test_average_is_not_adapterhubs() -> None:
    """AdapterHub 1.3's Average divides by N twice (SPEC.md 4.2); ours is the plain weighted
    average: Average(a, a) is a, and ours differs from the fixture's Average(a, b)."""
    registry = Registry()
    for i, name in enumerate(("a", "b")):
        registry.publish(ah.adapter_dir("bert-average", i), name)
    model = AdaptedModel(load_base(ah.base_model("bert"), device="cpu"), registry=registry)
    model.load("a")
    model.load("b")
    alone = ah.run(model, "bert-average", "a")
    same = ah.run(model, "bert-average", Average("a", "a"))
    assert ah.max_abs(same, alone) <= ah.TOL
    _, outputs = ah.io("bert-average")
    assert ah.max_abs(ah.run(model, "bert-average", Average("a", "b")), outputs["adapted"]) > 0.1


# --------------------------------------------------------------------------- export


def _export_cases() -> list[str]:
    return [c for c in ah.EXACT if ah.CASES[c]["kind"] == "single"]


@pytest.mark.parametrize("case", _export_cases())
def test_export_then_import_is_exact(case: str, tmp_path: Path) -> None:
    from deltahub.interop.adapterhub_export import export_adapterhub

    registry = Registry()
    ah.publish_case(registry, case, "orig")
    out = export_adapterhub(registry, "orig", tmp_path / "out")
    wrapper = json.loads((out / "adapter_config.json").read_text())
    assert wrapper["version"] == "adapters.1.3.0" and wrapper["name"] == "orig"
    assert wrapper["model_type"] == ah.CASES[case]["arch"]
    from deltahub.interop.rawtensors import read

    assert all(f".{wrapper['name']}." in k for k in read(out / "adapter.safetensors"))
    registry.publish(out, "back")
    model = AdaptedModel(load_base(ah.base_model(ah.CASES[case]["arch"]), device="cpu"), registry=registry)
    model.load("back")
    got = ah.run(model, case, "back")
    _, outputs = ah.io(case)
    assert ah.max_abs(got, outputs["adapted"]) <= ah.TOL


def test_export_cli(tmp_path: Path) -> None:
    from deltahub.cli.main import cli

    Registry().publish(ah.adapter_dir("gpt2-pfeiffer"), "p")
    result = CliRunner().invoke(cli, ["export", "p", str(tmp_path / "out"), "--format", "adapterhub"])
    assert result.exit_code == 0, result.output
    assert "use_safetensors=True" in result.output
    assert (tmp_path / "out" / "adapter.safetensors").exists()


def test_export_refuses_what_adapterhub_cannot_compute(tmp_path: Path) -> None:
    from deltahub.interop.adapterhub_export import export_adapterhub

    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    model.add_adapter("lo", {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["o_proj"]})
    model.save_adapter("lo", tmp_path / "lo")
    Registry().publish(tmp_path / "lo", "lo")
    with pytest.raises(Unsupported, match="o_proj"):
        export_adapterhub(Registry(), "lo", tmp_path / "x", model_type="llama")


def _native(kind: str, config: dict, tmp_path: Path) -> AdaptedModel:
    """A deltahub-made adapter (random weights) on a tiny base, published as `n`, active."""
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    model.add_adapter("n", config)
    randomize(model.get_adapter("n"), std=0.3)
    model.save_adapter("n", tmp_path / "n")
    Registry().publish(tmp_path / "n", "n")
    model.activate("n")
    return model


NATIVE = {
    "gpt2-pfeiffer": ("gpt2", {"method": "bottleneck", "variant": "pfeiffer", "bottleneck_size": 8}),
    "llama-houlsby": ("llama", {"method": "bottleneck", "variant": "houlsby", "reduction_factor": 8}),
    "bert-parallel": (
        "bert",
        {"method": "bottleneck", "variant": "parallel", "bottleneck_size": 6, "scaling": 2.5},
    ),
    "gpt2-lora": ("gpt2", {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"]}),
    "qwen2-lora": (
        "qwen2",
        {"method": "lora", "r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    ),
}


@needs_adapters
@pytest.mark.parametrize("case", sorted(NATIVE))
def test_adapters_load_adapter_reproduces_deltahub_exports(case: str, tmp_path: Path) -> None:
    """deltahub-made adapters, exported, loaded by AdapterHub's own `load_adapter`."""
    import adapters as ahlib

    from deltahub.interop.adapterhub_export import export_adapterhub

    kind, config = NATIVE[case]
    model = _native(kind, config, tmp_path)
    out = export_adapterhub(Registry(), "n", tmp_path / "out", model_type=kind)
    x = ids()
    with torch.no_grad():
        ours = model.base.base_model(input_ids=x).last_hidden_state
        plain = tiny(kind).base_model(input_ids=x).last_hidden_state
    assert float((ours - plain).abs().max()) > 0.1  # the adapter does change the output
    bare = tiny(kind).base_model  # same seed: the same base weights
    bare.load_state_dict(model.base.base_model.state_dict())
    ahlib.init(bare)
    bare.load_adapter(str(out), use_safetensors=True)
    bare.set_active_adapters("n")
    with torch.no_grad():
        theirs = bare(input_ids=x).last_hidden_state
    assert float((ours - theirs).abs().max()) <= ah.TOL


@needs_adapters
@pytest.mark.parametrize("case", _export_cases())
def test_adapters_load_adapter_reproduces_fixture_exports(case: str, tmp_path: Path) -> None:
    """Round trip through both libraries: AdapterHub save -> deltahub -> export -> `load_adapter`."""
    import adapters as ahlib

    from deltahub.interop.adapterhub_export import export_adapterhub

    Registry().publish(ah.adapter_dir(case), "orig")
    out = export_adapterhub(Registry(), "orig", tmp_path / "out")
    bare = ah.base_model(ah.CASES[case]["arch"])
    ahlib.init(bare)
    bare.load_adapter(str(out), use_safetensors=True)
    bare.set_active_adapters("orig")
    inputs, outputs = ah.io(case)
    with torch.no_grad():
        theirs = bare(**inputs).last_hidden_state
    assert ah.max_abs(theirs, outputs["adapted"]) <= ah.TOL


@needs_adapters
def test_last_token_head_imports_and_exports_exactly(tmp_path: Path) -> None:
    """A GPT-2 AdapterModel's one-layer classification head (last non-padding token) becomes
    deltahub's task head, and exports back as a head `adapters` loads."""
    import transformers as tf
    from adapters import GPT2AdapterModel, SeqBnConfig

    from deltahub.interop.adapterhub_export import export_adapterhub
    from deltahub.training.head import TaskHead

    cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32, pad_token_id=0)
    torch.manual_seed(0)
    src = GPT2AdapterModel(cfg).eval()
    src.add_adapter("t", config=SeqBnConfig(reduction_factor=4))
    src.add_classification_head("t", num_labels=3, layers=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if ".t." in n or "heads.t" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    src.set_active_adapters("t")
    x = torch.randint(1, 64, (2, 7), generator=g)
    mask = torch.ones_like(x)
    x[1, 5:], mask[1, 5:] = 0, 0
    with torch.no_grad():
        want = src(input_ids=x, attention_mask=mask).logits
    src.save_adapter(str(tmp_path / "saved"), "t", use_safetensors=True)
    registry = Registry()
    version = registry.publish(tmp_path / "saved", "t")
    base = tf.GPT2Model(cfg).eval()
    base.load_state_dict(src.transformer.state_dict(), strict=False)
    model = AdaptedModel(load_base(base, device="cpu"), registry=registry)
    model.load("t")
    model.activate("t")
    head = TaskHead.from_artifact(registry.open(version), 32)
    with torch.no_grad():
        got = head(model(input_ids=x, attention_mask=mask).last_hidden_state, mask)
    assert float((got - want).abs().max()) <= ah.TOL and float(want.abs().max()) > 0.1
    out = export_adapterhub(registry, "t", tmp_path / "out")
    torch.manual_seed(5)
    twin = GPT2AdapterModel(cfg).eval()
    twin.transformer.load_state_dict(src.transformer.state_dict(), strict=False)
    twin.load_adapter(str(out), use_safetensors=True)
    twin.set_active_adapters("t")
    with torch.no_grad():
        again = twin(input_ids=x, attention_mask=mask).logits
    assert float((again - want).abs().max()) <= ah.TOL
