"""Per-row routing through slot buffers (`deltahub.compose.slots`): the gathered
computation equals the plain loop it replaces, the per-adapter path, and each row run
alone (fp32, <= 1e-5), for mixed ranks, mixed methods, DoRA and None rows; slot paging
with more resident adapters than slots; generation with beams."""

from __future__ import annotations

import copy

import pytest
import torch

from deltahub import AdaptedModel, load_base
from deltahub.compose import routing, slots
from deltahub.compose.slots import (
    SlotBank,
    SlotTable,
    gathered_delta,
    looped_delta,
    run_pieces,
    segmented_add_,
    slot_runs,
)
from deltahub.methods.lora.layer import LoraLayer
from tests.compose_helpers import ids, out_of, randomize, tiny

TOL = 1e-5


@pytest.fixture(params=["gathered", "segmented"])
def gathers(request, monkeypatch):
    """Force one slot kernel at every site and count its calls: "gathered" (one bmm pair
    over gathered factors: a tiny model is below its CPU cost rule) or "segmented" (two
    matmuls per run of rows on views of the slots, in place)."""
    calls = []
    if request.param == "gathered":
        monkeypatch.setattr(slots, "CPU_ELEMENTS_PER_ADAPTER", 10**12)
        monkeypatch.setattr(slots, "SEGMENTED_PIECES_PER_ADAPTER", 0)

        def counted(x, rows, bank):
            calls.append(x.shape[0])
            return gathered_delta(x, rows, bank)

        monkeypatch.setattr(routing, "gathered_delta", counted)
    else:
        monkeypatch.setattr(slots, "CPU_ELEMENTS_PER_ADAPTER", 0)
        monkeypatch.setattr(slots, "SEGMENTED_PIECES_PER_ADAPTER", 10**9)

        def counted_in_place(y, x, pieces, bank):
            calls.append(x.shape[0])
            return segmented_add_(y, x, pieces, bank)

        monkeypatch.setattr(routing, "segmented_add_", counted_in_place)
    return calls


def _lora(r: int, targets: list[str], **kw) -> dict:
    return {"method": "lora", "r": r, "lora_alpha": 2 * r, "target_modules": targets, **kw}


def _model(configs: dict[str, dict], seed: int = 0) -> AdaptedModel:
    model = AdaptedModel(load_base(tiny("llama", seed=seed), device="cpu"))
    for i, (name, cfg) in enumerate(configs.items()):
        model.add_adapter(name, cfg)
        randomize(model.get_adapter(name), seed=10 + i, std=0.1)
    model.eval()
    return model


def _alone(model: AdaptedModel, x: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    rows = []
    for i, n in enumerate(names):
        if n is None:
            model.deactivate()
        else:
            model.activate(n)
        rows.append(out_of(model(input_ids=x[i : i + 1])))
    model.deactivate()
    return torch.cat(rows)


def _looped(model: AdaptedModel, x: torch.Tensor, names: list[str | None], monkeypatch) -> torch.Tensor:
    """The per-adapter path (no slots), the reference the gathered path replaces."""
    with monkeypatch.context() as m:
        m.setattr(model, "_assign_slots", lambda *a: {})
        return out_of(model(input_ids=x, adapter_names=names))


def test_gathered_kernel_equals_the_plain_loop_and_each_layer():
    torch.manual_seed(0)
    d_in, d_out = 24, 40
    base = torch.nn.Linear(d_in, d_out)
    layers = []
    for r in (1, 3, 8, 5):  # mixed ranks: padded to 8
        layer = LoraLayer(base, r, scaling=2.0 / r, use_dora=False, dtype=torch.float32)
        torch.nn.init.normal_(layer.lora_B)
        layers.append(layer)
    bank = SlotBank(d_in, d_out, torch.float32, torch.device("cpu"))
    for s, layer in enumerate(layers, start=1):
        bank.put(s, layer, capacity=8)
    assert bank.r_max == 8 and bank.n_slots >= 4
    slots = torch.tensor([2, 0, 1, 4, 4, 3, 0, 2])
    x = torch.randn(len(slots), 5, d_in)
    got = gathered_delta(x, slots, bank)
    ref = looped_delta(x, slots, bank)
    assert (got - ref).abs().max().item() <= TOL
    for i, s in enumerate(slots.tolist()):  # independent: each row through its own layer's math
        want = torch.zeros(5, d_out) if s == 0 else (x[i] @ layers[s - 1].lora_A.T) @ layers[s - 1].lora_B.T
        if s:
            want = want * layers[s - 1].scaling
        assert (got[i] - want).abs().max().item() <= TOL
    bank.clear(3)
    assert gathered_delta(x[5:6], slots[5:6], bank).abs().max().item() == 0.0


@pytest.mark.parametrize(
    "per_row",
    [
        [2, 2, 0, 1, 4, 4, 4, 3, 0, 2],  # runs one by one
        [1, 2, 3, 4, 0, 3, 4, 2],  # slots 1-4 and 3-4 coalesce: one bmm pair each, ranks padded
    ],
)
def test_segmented_kernel_equals_the_plain_loop_in_place(per_row):
    torch.manual_seed(1)
    d_in, d_out, t = 24, 40, 5
    base = torch.nn.Linear(d_in, d_out)
    bank = SlotBank(d_in, d_out, torch.float32, torch.device("cpu"))
    for s, r in enumerate((1, 3, 8, 5), start=1):  # mixed ranks: each run uses its own
        layer = LoraLayer(base, r, scaling=2.0 / r, use_dora=False, dtype=torch.float32)
        torch.nn.init.normal_(layer.lora_B)
        bank.put(s, layer, capacity=8)
    for repeat in (1, 3):  # 3: each row repeated, as generation's beams
        slots = torch.tensor(per_row).repeat_interleave(repeat)
        x = torch.randn(len(slots), t, d_in)
        y0 = torch.randn(len(slots), t, d_out)
        y = y0.clone()
        runs = slot_runs(per_row, repeat)
        assert all(s for _, _, s in runs)  # slot-0 rows are not runs
        pieces = run_pieces(runs, len(slots), t)
        assert max(count for _, _, count in pieces[1]) == (4 if per_row[0] == 1 else 1)
        segmented_add_(y, x, pieces, bank)
        assert (y - (y0 + looped_delta(x, slots, bank))).abs().max().item() <= TOL
        assert torch.equal(y[slots == 0], y0[slots == 0])  # untouched, not "+ 0"
    bank.clear(4)
    y = y0.clone()
    segmented_add_(
        y, x, run_pieces(slot_runs(per_row, 3), len(slots), t), bank
    )  # a cleared slot adds nothing
    assert torch.equal(y[slots == 4], y0[slots == 4])


def test_slot_runs():
    assert slot_runs([1, 1, 0, 2, 1, 1]) == [(0, 2, 1), (3, 4, 2), (4, 6, 1)]
    assert slot_runs([0, 0]) == []
    assert slot_runs([3, 3, 0], repeat=2) == [(0, 4, 3)]
    sizes, picks = run_pieces(slot_runs([0, 1, 1, 0, 0, 2]), 6, tokens=4)
    assert sizes == [4, 8, 8, 4] and picks == [(1, 1, 1), (3, 2, 1)]
    # adjacent runs of equal length on consecutive slots coalesce into one piece
    sizes, picks = run_pieces(slot_runs([2, 3, 4, 0, 1, 1, 2, 2, 5]), 9, tokens=1)
    assert sizes == [3, 1, 4, 1] and picks == [(0, 2, 3), (2, 1, 2), (3, 5, 1)]


def test_slot_table_pages_least_recently_used_and_overflows():
    t = SlotTable(capacity=2)
    assert t.assign(["a", "b"]) == {"a": 1, "b": 2}
    assert t.assign(["a", "c"]) == {"a": 1, "c": 2}  # b was least recently used
    assert t.assign(["c", "d", "e"]) == {"c": 2, "d": 1}  # e: no slot left, runs per adapter
    assert t.page_ins == 4


MIXED = {
    "r2": _lora(2, ["q_proj", "v_proj"]),
    "r8": _lora(8, ["q_proj", "o_proj", "down_proj"]),
    "rs": _lora(4, ["v_proj", "down_proj"], use_rslora=True),
    "dora": _lora(4, ["q_proj", "v_proj"], use_dora=True),
    "ia3": {"method": "ia3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "bn": {"method": "bottleneck", "variant": "pfeiffer", "bottleneck_size": 8},
}


def test_mixed_batch_equals_loop_and_each_row_alone(monkeypatch, gathers):
    model = _model(MIXED)
    names = ["r2", None, "r8", "dora", "rs", "r2", "ia3", "bn", None, "r8"]
    x = ids(batch=len(names), length=6)
    with torch.no_grad():
        routed = out_of(model(input_ids=x, adapter_names=names))
        looped = _looped(model, x, names, monkeypatch)
        alone = _alone(model, x, names)
    table = model._slot_table
    assert table is not None and set(table.lru) == {"r2", "r8", "rs"}  # only plain LoRAs gather
    assert any(b.r_max == 8 for b in table.banks.values())
    assert len(gathers) >= 4  # q, v, o, down of 2 layers gather (k: ia3 only)
    assert (routed - looped).abs().max().item() <= TOL
    assert (routed - alone).abs().max().item() <= TOL
    assert (routed[0] - routed[1]).abs().max().item() > 1e-3  # the adapters do change rows


def test_rows_unchanged_when_an_adapter_changes_after_paging_in(gathers):
    model = _model({"a": _lora(4, ["q_proj"]), "b": _lora(2, ["q_proj", "v_proj"])})
    x = ids(batch=2)
    with torch.no_grad():
        model(input_ids=x, adapter_names=["a", "b"])
        randomize(model.get_adapter("a"), seed=99, std=0.1)  # the slot copy is now stale
        routed = out_of(model(input_ids=x, adapter_names=["a", "b"]))
        alone = _alone(model, x, ["a", "b"])
        model.unload("b")
        model.add_adapter("b", _lora(6, ["v_proj"]))  # same name, new adapter
        randomize(model.get_adapter("b"), seed=7, std=0.1)
        again = out_of(model(input_ids=x, adapter_names=["a", "b"]))
        alone2 = _alone(model, x, ["a", "b"])
    assert (routed - alone).abs().max().item() <= TOL
    assert (again - alone2).abs().max().item() <= TOL


def test_more_resident_adapters_than_slots_page_in_on_demand(monkeypatch, gathers):
    configs = {f"a{i}": _lora(1 + i % 5, ["q_proj", "v_proj", "down_proj"]) for i in range(9)}
    model = _model(configs)
    model.routing_slots = 3
    x = ids(batch=4, length=5)
    batches = [
        ["a0", "a1", "a2", None],
        ["a3", "a0", "a4", "a3"],
        ["a5", "a6", "a7", "a8"],  # 4 distinct, 3 slots: one runs per adapter
        ["a1", "a2", "a0", "a8"],
    ]
    with torch.no_grad():
        for names in batches:
            routed = out_of(model(input_ids=x, adapter_names=names))
            assert (routed - _alone(model, x, names)).abs().max().item() <= TOL
            assert (routed - _looped(model, x, names, monkeypatch)).abs().max().item() <= TOL
    table = model._slot_table
    assert table.capacity == 3 and len(table.lru) == 3
    assert all(b.n_slots <= 3 for b in table.banks.values())
    assert table.page_ins >= 9


def test_under_autograd_trainable_adapters_take_the_per_adapter_path():
    model = _model({"a": _lora(4, ["q_proj"]), "b": _lora(2, ["q_proj"])})
    x = ids(batch=2)
    out = out_of(model(input_ids=x, adapter_names=["a", "b"]))
    out.sum().backward()
    assert model.get_adapter("a").layers[0].lora_A.grad is not None
    assert model.get_adapter("b").layers[0].lora_B.grad is not None
    with torch.no_grad():
        assert (out.detach() - _alone(model, x, ["a", "b"])).abs().max().item() <= TOL


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_with_beams_equals_each_row_alone(beams, gathers):
    model = _model({"a": _lora(4, ["q_proj", "v_proj"]), "b": _lora(8, ["q_proj", "down_proj"])})
    names = ["a", "b", None]
    x = ids(batch=3, length=5)
    kw = dict(max_new_tokens=4, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        routed = model.generate(input_ids=x, adapter_names=names, **kw)
        for i, n in enumerate(names):
            if n is None:
                model.deactivate()
            else:
                model.activate(n)
            alone = model.generate(input_ids=x[i : i + 1], **kw)
            assert torch.equal(routed[i : i + 1], alone)
    model.deactivate()
    assert model._slot_table is not None and model._slot_table.page_ins == 2
    assert 3 * beams in gathers  # the prompt pass, rows repeated per beam


def test_the_cost_rule_loops_over_few_adapters_on_cpu_and_results_agree(monkeypatch):
    model = _model({"a": _lora(4, ["q_proj"]), "b": _lora(2, ["q_proj"])})
    bank = SlotBank(512, 512, torch.float32, torch.device("cpu"))
    bank.ensure(2, 2, 16)  # bench/compose_bench.py's site
    assert not slots.gathered_pays(64, 2, bank)  # 2 adapters over 64 rows: the loop is cheaper
    assert slots.gathered_pays(64, 64, bank)
    assert not slots.gathered_pays(64, 1, bank)
    x = ids(batch=4)
    names = ["a", "b", None, "b"]
    with torch.no_grad():
        alone = _alone(model, x, names)
        monkeypatch.setattr(slots, "SEGMENTED_PIECES_PER_ADAPTER", 0)
        for per_adapter in (0, 10**12):  # 0: the loop at every site (slotted LoRAs skip y's rows)
            monkeypatch.setattr(slots, "CPU_ELEMENTS_PER_ADAPTER", per_adapter)
            routed = out_of(model(input_ids=x, adapter_names=names))
            assert (routed - alone).abs().max().item() <= TOL


def test_a_copy_of_the_base_is_not_needed():
    base = tiny("llama")
    before = copy.deepcopy(base.state_dict())
    model = AdaptedModel(load_base(base, device="cpu"))
    model.add_adapter("a", _lora(4, ["q_proj"]))
    model.add_adapter("b", _lora(4, ["q_proj"]))
    with torch.no_grad():
        model(input_ids=ids(batch=2), adapter_names=["a", "b"])
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # slots copy factors, never the base


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_routes_each_row_as_alone(dtype, gathers):
    """The dtype side of the GPU paths, run on a CPU: a half-precision base with adapters
    in its dtype goes through the slot kernels (not a silent fp32 fallback), and every
    row matches that row run alone, within half-precision rounding of the logits."""
    model = AdaptedModel(load_base(tiny("llama"), dtype=dtype, device="cpu"))
    for i, (name, r) in enumerate((("a", 4), ("b", 8), ("c", 2))):
        model.add_adapter(name, _lora(r, ["q_proj", "v_proj", "down_proj"]))
        randomize(model.get_adapter(name), seed=20 + i, std=0.1)
    model.eval()
    assert model.get_adapter("a").layers[0].lora_A.dtype == dtype
    names = ["a", "b", None, "c", "a", "b"]
    x = ids(batch=len(names), length=5)
    with torch.no_grad():
        routed = out_of(model(input_ids=x, adapter_names=names)).float()
        alone = _alone(model, x, names).float()
        model.deactivate()
        bare = out_of(model(input_ids=x)).float()
    assert len(gathers) >= 4  # q, v, down of 2 layers ran through the kernel
    scale = alone.abs().max().item()
    tol = 4 * torch.finfo(dtype).eps * scale  # a few roundings of the largest logit
    assert (routed - alone).abs().max().item() <= tol
    effect = (alone - bare).abs().max().item()
    assert effect > 20 * tol  # the adapters change the rows far beyond the tolerance
