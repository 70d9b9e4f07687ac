"""LoRA in the runtime, checked against PEFT itself and against dense matrices."""

from __future__ import annotations

import copy

import pytest
import torch

from deltahub import AdaptedModel, Average, Stack, Sum, load_base
from deltahub.errors import IncompatibleBase, Unsupported
from tests.compose_helpers import TARGETS, ids, out_of, peft_dir, randomize, tiny

TOL = 1e-5


def run(model, x, **kw):
    with torch.no_grad():
        return out_of(model(input_ids=x, **kw))


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_peft_saved_lora_loads_with_same_outputs(tmp_path, kind, variant):
    base = tiny(kind)
    opts = {"rslora": {"use_rslora": True}, "dora": {"use_dora": True}}.get(variant, {})
    path, peft_model = peft_dir(tmp_path / "a", base, TARGETS[kind], r=4, **opts)
    x = ids()
    ref = run(peft_model, x)
    model = AdaptedModel(load_base(base, device="cpu"))
    model.load_path(path, "a")
    plain = run(model, x)
    model.activate("a")
    got = run(model, x)
    assert (got - ref).abs().max().item() <= TOL
    assert (got - plain).abs().max().item() > 1e-2  # the adapter really changes outputs
    model.deactivate()
    assert torch.equal(run(model, x), plain)


def test_rank_and_alpha_patterns_follow_peft(tmp_path):
    base = tiny("llama")
    path, peft_model = peft_dir(
        tmp_path / "a",
        base,
        ["q_proj", "v_proj"],
        r=4,
        rank_pattern={"layers.0.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    model = AdaptedModel(load_base(base, device="cpu"))
    model.load_path(path, "a")
    model.activate("a")
    x = ids()
    assert (run(model, x) - run(peft_model, x)).abs().max().item() <= TOL
    layer = model.get_adapter("a").delta_at("model.layers.0.self_attn.q_proj")
    assert layer.r == 2


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dora", [False, True])
def test_deltahub_export_loads_in_peft(tmp_path, kind, dora):
    from peft import PeftModel

    base = tiny(kind)
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    model.add_adapter(
        "mine", {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_dora": dora}
    )
    randomize(model.get_adapter("mine"), seed=3, std=0.1)
    model.activate("mine")
    x = ids()
    ours = run(model, x)
    out = model.save_adapter("mine", tmp_path / "export")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    theirs = run(peft_model, x)
    assert (ours - theirs).abs().max().item() <= TOL
    assert (ours - run(base, x)).abs().max().item() > 1e-2


def test_all_linear_matches_peft_target_set():
    from peft import LoraConfig, get_peft_model

    for kind in ("llama", "gpt2", "bert-cls"):
        base = tiny(kind)
        peft_model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=2, target_modules="all-linear", task_type="SEQ_CLS" if kind == "bert-cls" else None),
        )
        theirs = {
            n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
        }
        model = AdaptedModel(load_base(base, device="cpu"))
        model.add_adapter("a", {"method": "lora", "r": 2, "target_modules": "all-linear"})
        assert set(model.get_adapter("a").paths) == theirs


def _two_adapters(tmp_path):
    base = tiny("llama")
    pa, _ = peft_dir(tmp_path / "a", base, ["q_proj", "v_proj"], seed=1, r=4)
    pb, _ = peft_dir(
        tmp_path / "b", base, ["v_proj", "down_proj"], seed=2, r=2, use_rslora=True, lora_alpha=3
    )
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    model.load_path(pa, "a")
    model.load_path(pb, "b")
    return base, model


def _dense(base, model, terms):
    """A copy of the base with W + sum_i w_i s_i B_i A_i folded in by hand."""
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, w in terms:
            adapter = model.get_adapter(name)
            for path, layer in zip(adapter.paths, adapter.layers, strict=True):
                weight = dense.get_submodule(path).weight
                weight += w * layer.scaling * (layer.lora_B @ layer.lora_A)
    return dense


def test_sum_equals_dense_weighted_delta(tmp_path):
    base, model = _two_adapters(tmp_path)
    x = ids()
    model.activate(Sum("a", "b", weights=[0.7, -1.3]))
    got = run(model, x)
    want = run(_dense(base, model, [("a", 0.7), ("b", -1.3)]), x)
    assert (got - want).abs().max().item() <= TOL
    # rsLoRA scaling alpha/sqrt(r) is what b uses
    assert model.get_adapter("b").layers[0].scaling == pytest.approx(3 / 2**0.5)


def test_stack_of_loras_is_their_sum_and_average_normalizes_once(tmp_path):
    base, model = _two_adapters(tmp_path)
    x = ids()
    model.activate("a")
    a_alone = run(model, x)
    model.activate(Average("a", "a"))
    assert (run(model, x) - a_alone).abs().max().item() <= 1e-6
    model.activate(Average("a", "b", weights=[1, 3]))
    avg = run(model, x)
    want = run(_dense(base, model, [("a", 0.25), ("b", 0.75)]), x)
    assert (avg - want).abs().max().item() <= TOL
    model.activate(Stack("a", "b"))
    want = run(_dense(base, model, [("a", 1.0), ("b", 1.0)]), x)
    assert (run(model, x) - want).abs().max().item() <= TOL


def test_sum_of_one_dora_is_the_dora(tmp_path):
    base = tiny("gpt2")
    path, peft_model = peft_dir(tmp_path / "d", base, ["c_attn", "c_proj"], use_dora=True)
    model = AdaptedModel(load_base(base, device="cpu"))
    model.load_path(path, "d")
    x = ids()
    model.activate(Sum("d"))
    assert (run(model, x) - run(peft_model, x)).abs().max().item() <= TOL


def test_per_row_routing_equals_each_row_alone(tmp_path):
    base = tiny("llama")
    pa, _ = peft_dir(tmp_path / "a", base, ["q_proj", "v_proj"], seed=1)
    pb, _ = peft_dir(tmp_path / "b", base, ["v_proj", "up_proj"], seed=2, use_dora=True)
    model = AdaptedModel(load_base(base, device="cpu"))
    model.load_path(pa, "a")
    model.load_path(pb, "b")
    x = ids(batch=5)
    names = ["a", "b", None, "a", "b"]  # non-contiguous groups: index path
    got = run(model, x, adapter_names=names)
    for i, name in enumerate(names):
        if name is None:
            model.deactivate()
        else:
            model.activate(name)
        alone = run(model, x[i : i + 1])
        assert (got[i] - alone[0]).abs().max().item() <= TOL, (i, name)
    model.activate("a")
    sorted_names = ["a", "a", "b", "b", None]  # contiguous groups: slice path
    got = run(model, x, adapter_names=sorted_names)
    model.activate("b")
    assert (got[2:4] - run(model, x[2:4])).abs().max().item() <= TOL
    assert model.active == "b"  # routing leaves the active adapter as it was


def test_routing_in_generate(tmp_path):
    base = tiny("llama")
    pa, _ = peft_dir(tmp_path / "a", base, ["q_proj", "v_proj"], seed=1)
    model = AdaptedModel(load_base(base, device="cpu"))
    model.load_path(pa, "a")
    x = ids(batch=2, length=4)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=x, adapter_names=["a", None], **kw)
    model.activate("a")
    assert torch.equal(mixed[0], model.generate(input_ids=x[:1], **kw)[0])
    model.deactivate()
    assert torch.equal(mixed[1], model.generate(input_ids=x[1:], **kw)[0])


@pytest.mark.parametrize("kind,dora", [("llama", False), ("gpt2", False), ("gpt2", True), ("bert", True)])
def test_merge_and_unmerge_are_exact(tmp_path, kind, dora):
    base = tiny(kind)
    path, _ = peft_dir(tmp_path / "a", base, TARGETS[kind], use_dora=dora)
    model = AdaptedModel(load_base(base, device="cpu"))
    model.load_path(path, "a")
    x = ids()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plain = run(model, x)
    model.activate("a")
    active = run(model, x)
    model.merge("a")
    assert model.active is None
    assert (run(model, x) - active).abs().max().item() <= TOL
    with pytest.raises(Unsupported, match="merged"):
        model.activate("a")
    model.unmerge("a")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert torch.equal(run(model, x), plain)


def test_switching_copies_no_weights(tmp_path):
    base, model = _two_adapters(tmp_path)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    for target in ("a", "b", Sum("a", "b"), "a"):
        model.activate(target)
    model.deactivate()
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    assert "forward" not in base.model.layers[0].self_attn.q_proj.__dict__  # plain base code again


def test_incompatible_shapes_and_modules(tmp_path):
    big = tiny("llama")
    path, _ = peft_dir(tmp_path / "a", big, ["q_proj"])
    small = AdaptedModel(load_base(tiny("llama", hidden_size=32, intermediate_size=64), device="cpu"))
    with pytest.raises(IncompatibleBase, match=r"q_proj.*\(32, 32\).*lora_A \[4, 64\]"):
        small.load_path(path, "a")
    gpt_path, _ = peft_dir(tmp_path / "g", tiny("gpt2"), ["c_attn"])
    with pytest.raises(IncompatibleBase, match=r"transformer\.h\.0\.attn\.c_attn"):
        small.load_path(gpt_path, "g")
    assert small.adapters == []


def test_fingerprint_checked_on_load_unless_forced(tmp_path):
    from deltahub import Registry
    from deltahub.compose.base import fingerprint

    base = tiny("llama")
    path, peft_model = peft_dir(tmp_path / "a", base, ["q_proj", "v_proj"])
    registry = Registry()
    registry.publish(path, "adapter", base_fingerprint=fingerprint(base))
    registry.publish(path, "other", base_fingerprint="sha256:" + "0" * 64)
    model = AdaptedModel(load_base(base, device="cpu"), registry=registry)
    assert model.load("adapter@1") == "adapter"
    model.activate("adapter")
    x = ids()
    assert (run(model, x) - run(peft_model, x)).abs().max().item() <= TOL
    assert model.load("adapter") == "adapter"  # same version again: no-op
    with pytest.raises(IncompatibleBase, match="force=True"):
        model.load("other")
    assert model.load("other", force=True) == "other"


def test_fingerprint_ignores_dtype_and_packing():
    from torch import nn

    from deltahub.compose.base import fingerprint

    a, b = tiny("llama"), tiny("llama", seed=5).to(torch.bfloat16)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(tiny("llama", num_hidden_layers=3))

    class Linear4bit(nn.Module):  # bitsandbytes' packed layout: (numel / 2, 1) uint8
        def __init__(self, d_in: int, d_out: int) -> None:
            super().__init__()
            self.in_features, self.out_features = d_in, d_out
            self.weight = nn.Parameter(
                torch.zeros(d_in * d_out // 2, 1, dtype=torch.uint8), requires_grad=False
            )

    q = tiny("llama")
    q.model.layers[0].self_attn.q_proj = Linear4bit(64, 64)
    assert fingerprint(q) == fingerprint(a)
