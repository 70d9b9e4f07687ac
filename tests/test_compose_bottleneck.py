"""Bottleneck adapters: identity at init, placement per variant, artifacts, routing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltahub import AdaptedModel, Registry, Stack, load_base
from deltahub.errors import InvalidArtifact, InvalidConfig, Unsupported
from tests.compose_helpers import ids, out_of, randomize, tiny

TOL = 1e-5
# layer 0's (attention output, FFN output, module whose input is the FFN's stream x,
# the FFN sub-layer's post-LayerNorm or None, the FFN module's own input module)
POINTS = {
    "bert": (
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.output.dense",
        "encoder.layer.0.intermediate",
        "encoder.layer.0.output.LayerNorm",
        "encoder.layer.0.intermediate",
    ),
    "llama": (
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp",
        "model.layers.0.post_attention_layernorm",
        None,
        "model.layers.0.mlp",
    ),
    "gpt2": (
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp",
        "transformer.h.0.ln_2",
        None,
        "transformer.h.0.mlp",
    ),
}


def run(model, x, **kw):
    with torch.no_grad():
        return out_of(model(input_ids=x, **kw))


@pytest.mark.parametrize("kind", ["bert", "roberta", "gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_fresh_adapter_is_identity(kind, variant):
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    x = ids()
    plain = run(model, x)
    model.add_adapter("b", {"method": "bottleneck", "variant": variant, "bottleneck_size": 8})
    model.activate("b")
    assert torch.equal(run(model, x), plain)
    sites = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}[variant]
    assert len(model.get_adapter("b").paths) == sites * 2  # two layers
    randomize(model.get_adapter("b"), std=0.5)
    assert (run(model, x) - plain).abs().max().item() > 1e-3


def _io(model, path, x):
    """(input, output) of module `path` in one forward pass."""
    seen = {}

    def hook(module, args, output):
        seen["x"], seen["y"] = args[0].detach().clone(), output.detach().clone()

    handle = model.base.get_submodule(path).register_forward_hook(hook)
    try:
        run(model, x)
    finally:
        handle.remove()
    return seen["x"], seen["y"]


def _expected_ffn(kind, variant, layer, s, y0, stream, ln, own_input, legacy=False):
    """The FFN site's output by AdapterHub's equations (SPEC.md 1.3), or version 1's."""
    with torch.no_grad():
        if variant == "houlsby" or (variant == "pfeiffer" and legacy):
            z = y0  # the sub-layer output h
        elif variant == "pfeiffer":
            z = y0 + stream if ln is None else ln(y0 + stream)  # LN(x + h) / x + h
        else:
            z = own_input if legacy else stream  # version 1 read the FFN module's own input
        return y0 + s * layer.f(z)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_placement(kind, variant):
    attn, ffn, stream_mod, ln_path, ffn_in = POINTS[kind]
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    x = ids()
    model.add_adapter("b", {"method": "bottleneck", "variant": variant, "bottleneck_size": 8, "scaling": 0.5})
    adapter = model.get_adapter("b")
    assert adapter.config["placement_version"] == 2
    randomize(adapter, std=0.3)
    # the attention output changes exactly when an adapter sits there (Houlsby only)
    attn_x0, attn_y0 = _io(model, attn, x)
    model.activate("b")
    attn_x1, attn_y1 = _io(model, attn, x)
    assert torch.equal(attn_x0, attn_x1)  # layer 0's attention input is upstream of any adapter
    layer = adapter.delta_at(attn)
    if variant == "houlsby":
        # y = y0 + s * up(act(down(y0)))
        assert (attn_y1 - (attn_y0 + 0.5 * layer.f(attn_y0))).abs().max().item() <= TOL
    else:
        assert layer is None and torch.equal(attn_y1, attn_y0)
    ffn_layer = adapter.delta_at(ffn)
    stream, _ = _io(model, stream_mod, x)
    own, _ = _io(model, ffn_in, x)
    xin, ffn_y1 = _io(model, ffn, x)
    model.deactivate()
    with torch.no_grad():
        y0 = model.base.get_submodule(ffn)(xin)
    ln = model.base.get_submodule(ln_path) if ln_path else None
    want = _expected_ffn(kind, variant, ffn_layer, 0.5, y0, stream, ln, own)
    assert (ffn_y1 - want).abs().max().item() <= TOL
    assert (ffn_y1 - y0).abs().max().item() > 1e-3
    if variant != "houlsby":  # the read point matters: the other reading is far off
        other = _expected_ffn(kind, variant, ffn_layer, 0.5, y0, stream, ln, own, legacy=True)
        if kind != "bert" or variant == "pfeiffer":
            assert (ffn_y1 - other).abs().max().item() > 1e-2


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("variant", ["pfeiffer", "parallel"])
def test_placement_version_1_artifacts_keep_their_math(kind, variant, tmp_path):
    """An artifact without `placement_version` (published before AdapterHub's placements)
    computes what it computed when trained: pfeiffer reads h, parallel the FFN's own input."""
    _, ffn, stream_mod, ln_path, ffn_in = POINTS[kind]
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    model.add_adapter("b", {"method": "bottleneck", "variant": variant, "bottleneck_size": 8})
    randomize(model.get_adapter("b"), std=0.3)
    model.save_adapter("b", tmp_path / "new")
    from deltahub import artifact as af

    config = {
        k: v
        for k, v in model.adapter_config("b").items()
        if k not in ("placement_version", "original_ln_before")
    }
    af.write_dir(tmp_path / "old", model.adapter_state_dict("b"), config)
    model.load_path(tmp_path / "old", "old")
    assert model.adapter_config("old")["placement_version"] == 1
    x = ids()
    model.activate("old")
    stream, _ = _io(model, stream_mod, x)
    own, _ = _io(model, ffn_in, x)
    xin, got = _io(model, ffn, x)
    model.deactivate()
    with torch.no_grad():
        y0 = model.base.get_submodule(ffn)(xin)
    ln = model.base.get_submodule(ln_path) if ln_path else None
    layer = model.get_adapter("old").delta_at(ffn)
    want = _expected_ffn(kind, variant, layer, 1.0, y0, stream, ln, own, legacy=True)
    assert (got - want).abs().max().item() <= TOL
    # re-saved, it stays version 1; and the registry accepts it
    model.save_adapter("old", tmp_path / "resaved")
    assert af.load_dir(tmp_path / "resaved").config["placement_version"] == 1
    Registry().publish(tmp_path / "old", "old")


def test_stack_of_serial_adapters_is_sequential():
    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, {"method": "bottleneck", "variant": "pfeiffer", "bottleneck_size": 4})
        randomize(model.get_adapter(name), seed=seed, std=0.3)
    ffn = "model.layers.0.mlp"
    x = ids()
    model.activate(Stack("a", "b"))
    stream, _ = _io(model, "model.layers.0.post_attention_layernorm", x)
    xin, got = _io(model, ffn, x)
    model.deactivate()
    fa, fb = model.get_adapter("a").delta_at(ffn), model.get_adapter("b").delta_at(ffn)
    with torch.no_grad():
        y0 = model.base.get_submodule(ffn)(xin)
        y1 = y0 + fa.f(stream + y0)  # each reads the stream after the residual add so far
        want = y1 + fb.f(stream + y1)
    assert (got - want).abs().max().item() <= TOL


def test_publish_load_roundtrip_and_routing(tmp_path):
    base = tiny("bert")
    model = AdaptedModel(load_base(base, device="cpu"))
    model.add_adapter(
        "par", {"method": "bottleneck", "variant": "parallel", "reduction_factor": 8, "scaling": 0.1}
    )
    randomize(model.get_adapter("par"), std=0.3)
    model.activate("par")
    x = ids()
    want = run(model, x)
    model.save_adapter("par", tmp_path / "par")
    registry = Registry()
    registry.publish(tmp_path / "par", "par")
    fresh = AdaptedModel(load_base(tiny("bert"), device="cpu"), registry=registry)
    assert fresh.load("par@1") == "par"
    fresh.activate("par")
    assert (run(fresh, x) - want).abs().max().item() <= TOL
    fresh.deactivate()
    plain = run(fresh, x)
    # per-row: the BERT parallel adapter reads a captured FFN input, sliced per group
    mixed = run(fresh, x, adapter_names=[None, "par", None])
    assert (mixed[1] - want[1]).abs().max().item() <= TOL
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])


def test_schema_is_checked_at_publish(tmp_path):
    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    model.add_adapter("b", {"method": "bottleneck", "variant": "houlsby", "bottleneck_size": 8})
    config = dict(model.adapter_config("b"))
    from deltahub import artifact as af

    tensors = model.adapter_state_dict("b")
    bad = dict(tensors)
    key = next(k for k in bad if k.endswith("adapter_up.weight"))
    bad[key] = torch.zeros(64, 7)
    af.write_dir(tmp_path / "bad", bad, config)
    with pytest.raises(InvalidArtifact, match="shape-mismatch"):
        Registry().publish(tmp_path / "bad", "bad")
    af.write_dir(tmp_path / "variant", tensors, {**config, "variant": "sideways"})
    with pytest.raises(InvalidArtifact, match="sideways"):
        Registry().publish(tmp_path / "variant", "bad")
    with pytest.raises(InvalidConfig, match="non_linearity"):
        model.add_adapter("c", {"method": "bottleneck", "variant": "pfeiffer", "non_linearity": "cube"})


def test_unknown_architecture_is_unsupported():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type(
                "C", (), {"model_type": "mystery", "hidden_size": 8, "to_dict": lambda self: {}}
            )()
            self.proj = nn.Linear(8, 8)

    model = AdaptedModel(load_base(Tiny(), device="cpu"))
    with pytest.raises(Unsupported, match="mystery"):
        model.add_adapter("b", {"method": "bottleneck", "variant": "pfeiffer", "bottleneck_size": 2})


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_pfeiffer_per_row_routing_slices_the_captured_stream(kind):
    """Pfeiffer reads LN(x + h) with x captured upstream: routed rows get their own x."""
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    model.add_adapter("p", {"method": "bottleneck", "variant": "pfeiffer", "bottleneck_size": 8})
    randomize(model.get_adapter("p"), std=0.3)
    x = ids()
    plain = run(model, x)
    model.activate("p")
    want = run(model, x)
    model.deactivate()
    mixed = run(model, x, adapter_names=[None, "p", None])
    assert (mixed[1] - want[1]).abs().max().item() <= TOL
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[2], plain[2])
    mixed = run(model, x, adapter_names=["p", None, "p"])  # rows 0 and 2: an index, not a slice
    assert (mixed[0] - want[0]).abs().max().item() <= TOL and (mixed[2] - want[2]).abs().max().item() <= TOL
