"""Bottleneck adapters: identity at init, placement per variant, artifacts, routing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltahub import AdaptedModel, Registry, Stack, load_base
from deltahub.errors import InvalidArtifact, InvalidConfig, Unsupported
from tests.compose_helpers import ids, out_of, randomize, tiny

TOL = 1e-5
# (attention output module, FFN output module, FFN input module) of layer 0
POINTS = {
    "bert": (
        "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.output.dense",
        "encoder.layer.0.intermediate",
    ),
    "llama": ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp", "model.layers.0.mlp"),
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


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_placement(kind, variant):
    attn, ffn, ffn_in = POINTS[kind]
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    x = ids()
    model.add_adapter("b", {"method": "bottleneck", "variant": variant, "bottleneck_size": 8, "scaling": 0.5})
    adapter = model.get_adapter("b")
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
    # the FFN output: serial adapters read the FFN output, parallel ones the FFN input
    ffn_layer = adapter.delta_at(ffn)
    feed_in, _ = _io(model, ffn_in, x)
    xin, ffn_y1 = _io(model, ffn, x)
    model.deactivate()
    with torch.no_grad():
        y0 = model.base.get_submodule(ffn)(xin)
        want = y0 + 0.5 * (ffn_layer.f(feed_in) if variant == "parallel" else ffn_layer.f(y0))
    assert (ffn_y1 - want).abs().max().item() <= TOL
    assert (ffn_y1 - y0).abs().max().item() > 1e-3


def test_stack_of_serial_adapters_is_sequential():
    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    for name, seed in (("a", 1), ("b", 2)):
        model.add_adapter(name, {"method": "bottleneck", "variant": "pfeiffer", "bottleneck_size": 4})
        randomize(model.get_adapter(name), seed=seed, std=0.3)
    ffn = "model.layers.0.mlp"
    x = ids()
    model.activate(Stack("a", "b"))
    xin, got = _io(model, ffn, x)
    model.deactivate()
    fa, fb = model.get_adapter("a").delta_at(ffn), model.get_adapter("b").delta_at(ffn)
    with torch.no_grad():
        y0 = model.base.get_submodule(ffn)(xin)
        y1 = y0 + fa.f(y0)
        want = y1 + fb.f(y1)
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
