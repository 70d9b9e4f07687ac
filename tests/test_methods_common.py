"""IA3, BitFit and SSF on tiny Llama and BERT: identity at init, training, save -> publish
-> load by name, exact merge, per-row routing, and what Sum/Average/Stack mean, each
checked against an independently built single adapter with the combined vectors."""

from __future__ import annotations

import pytest
import torch

from deltahub import AdaptedModel, Average, Stack, Sum, load_base
from deltahub.errors import InvalidArtifact, Unsupported
from deltahub.registry import Registry
from tests.compose_helpers import ids, tiny
from tests.methods_helpers import perturb, run, train_steps

METHODS = {"ia3": {"method": "ia3"}, "bitfit": {"method": "bitfit"}, "ssf": {"method": "ssf"}}
CASES = [(m, k) for m in METHODS for k in ("llama", "bert")]
TOL = 1e-5


def fresh(kind: str) -> AdaptedModel:
    return AdaptedModel(load_base(tiny(kind), device="cpu"))


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_identity_at_init_and_training_lowers_loss(method, kind):
    model = fresh(kind)
    x = ids()
    plain = run(model, x)
    model.add_adapter("a", METHODS[method])
    model.activate("a")
    assert torch.equal(run(model, x), plain)
    before = {n: p.clone() for n, p in model.base.named_parameters()}
    losses = train_steps(model, "a", x, METHODS[method])
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(p, before[n]) for n, p in model.base.named_parameters())  # base frozen


@pytest.mark.parametrize(("method", "kind"), [*CASES, *((m, "gpt2") for m in METHODS)])  # Conv1D merges
def test_publish_load_by_name_merge_and_routing(tmp_path, method, kind):
    model = fresh(kind)
    model.add_adapter("a", METHODS[method])
    perturb(model.get_adapter("a"), seed=1)
    x = ids()
    plain = run(model, x)
    model.activate("a")
    ours = run(model, x)
    assert (ours - plain).abs().max().item() > 1e-2
    model.save_adapter("a", tmp_path / "a")
    reg = Registry()
    version = reg.publish(tmp_path / "a", f"{method}-{kind}")
    assert version.method == method

    other = AdaptedModel(load_base(tiny(kind), device="cpu"), registry=reg)
    name = other.load(f"{method}-{kind}")
    other.activate(name)
    assert torch.equal(run(other, x), ours)

    other.deactivate()
    other.merge(name)
    assert (run(other, x) - ours).abs().max().item() <= TOL
    other.unmerge(name)
    assert torch.equal(run(other, x), plain)

    routed = run(other, x, adapter_names=[name, None, name])
    assert (routed[0] - ours[0]).abs().max().item() <= TOL
    assert (routed[1] - plain[1]).abs().max().item() <= TOL
    assert (routed[2] - ours[2]).abs().max().item() <= TOL


def _combined(model, names, weights, identity):
    """A new adapter whose vectors are identity + sum_i w_i (p_i - identity)."""
    model.add_adapter("c", METHODS[model.get_adapter(names[0]).method])
    with torch.no_grad():
        for i, p in enumerate(model.get_adapter("c").parameters()):
            ps = [list(model.get_adapter(n).parameters())[i] for n in names]
            p.copy_(identity[i] + sum(w * (q - identity[i]) for w, q in zip(weights, ps, strict=True)))
    return "c"


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("block", ["sum", "average"])
def test_sum_and_average_mean_combined_vectors(method, block):
    model = fresh("llama")
    model.add_adapter("a", METHODS[method])
    identity = [p.detach().clone() for p in model.get_adapter("a").parameters()]
    model.add_adapter("b", METHODS[method])
    perturb(model.get_adapter("a"), seed=1)
    perturb(model.get_adapter("b"), seed=2)
    x = ids()
    if block == "sum":
        weights, node = [1.0, 0.5], Sum("a", "b", weights=[1.0, 0.5])
    else:
        weights, node = [0.75, 0.25], Average("a", "b", weights=[3, 1])
    model.activate(node)
    got = run(model, x)
    model.activate(_combined(model, ["a", "b"], weights, identity))
    want = run(model, x)
    assert (got - want).abs().max().item() <= TOL
    assert (got - run(model, x, adapter_names=["a"] * 3)).abs().max().item() > 1e-3


def test_stack_of_ssf_composes_the_affine_maps():
    model = fresh("bert")
    for n in ("a", "b", "c"):
        model.add_adapter(n, METHODS["ssf"])
    perturb(model.get_adapter("a"), seed=1)
    perturb(model.get_adapter("b"), seed=2)
    a, b, c = (model.get_adapter(n) for n in "abc")
    with torch.no_grad():  # gamma_b (gamma_a y + beta_a) + beta_b
        for la, lb, lc in zip(a.layers, b.layers, c.layers, strict=True):
            lc.ssf_scale.copy_(la.ssf_scale * lb.ssf_scale)
            if lc.ssf_shift is not None:
                lc.ssf_shift.copy_(lb.ssf_scale * la.ssf_shift + lb.ssf_shift)
    x = ids()
    model.activate(Stack("a", "b"))
    got = run(model, x)
    model.activate("c")
    assert (got - run(model, x)).abs().max().item() <= TOL


def test_stack_of_bitfit_is_their_sum():
    model = fresh("bert")
    for n in ("a", "b"):
        model.add_adapter(n, METHODS["bitfit"])
        perturb(model.get_adapter(n), seed=len(n) + ord(n))
    x = ids()
    model.activate(Stack("a", "b"))
    got = run(model, x)
    model.activate(Sum("a", "b"))
    assert (got - run(model, x)).abs().max().item() <= TOL


def test_stack_of_ia3_is_refused_with_the_alternative():
    model = fresh("llama")
    model.add_adapter("a", METHODS["ia3"])
    model.add_adapter("b", METHODS["ia3"])
    with pytest.raises(Unsupported, match="Stack over ia3 adapter 'a'"):
        model.activate(Stack("a", "b"))


def test_bitfit_artifact_stores_only_changed_biases(tmp_path):
    model = fresh("bert")
    model.add_adapter("a", METHODS["bitfit"])
    adapter = model.get_adapter("a")
    assert len(adapter.paths) > 10  # every linear layer and LayerNorm with a bias
    with torch.no_grad():
        adapter.layers[3].bitfit_bias.fill_(0.5)
    assert list(adapter.tensors()) == [f"{adapter.paths[3]}.bitfit_bias"]


def test_llama_bitfit_adds_biases_and_merge_removes_them_again():
    model = fresh("llama")
    model.add_adapter("a", METHODS["bitfit"])
    perturb(model.get_adapter("a"), seed=3)
    names = {n for n, _ in model.base.named_parameters()}
    model.merge("a")
    assert {n for n, _ in model.base.named_parameters()} > names  # biases were created to merge into
    model.unmerge("a")
    assert {n for n, _ in model.base.named_parameters()} == names


def test_registry_rejects_malformed_artifacts(tmp_path):
    from deltahub import artifact as af

    cases = {
        "ia3": ({"peft_type": "IA3", "target_modules": ["k_proj"]}, {"m.k_proj.ia3_l": torch.ones(2, 3)}),
        "bitfit": ({"method": "bitfit"}, {"m.dense.bitfit_bias": torch.ones(2, 3)}),
        "ssf": ({"method": "ssf"}, {"m.dense.ssf_shift": torch.ones(3)}),
    }
    for method, (config, tensors) in cases.items():
        af.write_dir(tmp_path / method, tensors, config, af.Manifest(name=method, method=method))
        with pytest.raises(InvalidArtifact):
            Registry().publish(tmp_path / method, method)


def test_composition_table_matches_what_activate_checks():
    from deltahub.compose.blocks import composition_rules
    from deltahub.methods import get_method

    rows = {}
    for line in composition_rules().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        for method in cells[0].split(" / "):
            rows[method] = dict(zip(["stack", "sum", "average", "fuse", "route"], cells[1:6], strict=True))
    for method in ("ia3", "bitfit", "ssf", "prompt", "prefix", "ptuning-v2", "lora"):
        supports = get_method(method).supports
        for kind, cell in rows[method].items():
            refused = cell.startswith(("refused", "no"))
            assert refused == (kind not in supports), (method, kind, cell)
