"""AdapterFusion: the folded math against the direct formula, composition, artifacts, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltahub.compose.base import load_base
from deltahub.compose.blocks import Fuse
from deltahub.compose.model import AdaptedModel
from deltahub.errors import IntegrityError, InvalidArtifact, InvalidConfig, NotFound
from deltahub.fusion.layer import FusionLayer, Part, add_fusion
from deltahub.registry import Registry
from tests import fusion_helpers as fh

LAST = "encoder.layer.1.output.dense"


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fh.bert_dir(tmp_path_factory.mktemp("bert") / "bert")


def _model(bert_path: Path) -> AdaptedModel:
    return AdaptedModel(load_base(bert_path, device="cpu"))


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(fh.SPECIAL + fh.WORDS), (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _two_loras_and_pfeiffer(model: AdaptedModel) -> None:
    """Two LoRAs and a Pfeiffer adapter, all changing the last FFN output (random weights)."""
    for i, name in enumerate(["a", "b"]):
        model.add_adapter(name, {"method": "lora", "r": 2 + 2 * i, "lora_alpha": 8, "target_modules": [LAST]})
        _randomize(model.get_adapter(name), seed=i)
    model.add_adapter(
        "c",
        # reading the FFN output h, as the hand computations below do (AdapterHub's default
        # placement, LN(x + h), is checked against AdapterHub itself in test_adapterhub.py)
        {
            "method": "bottleneck",
            "variant": "pfeiffer",
            "original_ln_before": False,
            "bottleneck_size": 4,
            "target_layers": [1],
        },
    )
    _randomize(model.get_adapter("c"), seed=7, std=0.2)


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_folded_equals_direct_formula(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    d = 24
    layer = FusionLayer(d, temperature=0.7).to(dtype)
    _randomize(layer, seed=1, std=0.2)
    h = torch.randn(2, 5, d, dtype=dtype)
    parts, a, zs = [], [], []
    for r, with_c in [(3, True), (5, False), (None, False)]:  # bottleneck-like, LoRA-like, opaque
        if r is None:
            z = torch.randn(2, 5, d, dtype=dtype)
            parts.append(Part(lambda *_: None, lambda: (None, None)))  # type: ignore[arg-type,return-value]
            a.append(z)
            zs.append(z)
            continue
        W = torch.randn(d, r, dtype=dtype)
        c = torch.randn(d, dtype=dtype) if with_c else None
        a_n = torch.randn(2, 5, r, dtype=dtype)
        parts.append(Part(lambda *_: None, lambda W=W, c=c: (W, c)))  # type: ignore[arg-type,return-value]
        a.append(a_n)
        zs.append(a_n @ W.T + (c if c is not None else 0))
    out_direct, s_direct = layer.direct(h, zs)
    out_folded, s_folded = layer.folded(h, parts, a)
    assert torch.allclose(s_folded, s_direct, atol=tol, rtol=0)
    assert torch.allclose(out_folded, out_direct, atol=tol * float(out_direct.detach().abs().max()), rtol=0)
    assert torch.allclose(s_folded.sum(-1), torch.ones(2, 5, dtype=dtype), atol=tol)


@pytest.mark.parametrize("mixed", [True, False])
def test_fuse_in_model_matches_independent_computation(bert_path: Path, mixed: bool) -> None:
    """At the fused module: output = y + sum_n s_n V z_n, every z_n computed by hand.

    mixed: two LoRAs and a bottleneck; else three bottlenecks (one stacked down-projection)."""
    model = _model(bert_path)
    if mixed:
        _two_loras_and_pfeiffer(model)
    else:
        for i, name in enumerate(["a", "b", "c"]):
            cfg = {
                "method": "bottleneck",
                "variant": "pfeiffer",
                "original_ln_before": False,  # reads h (see _two_loras_and_pfeiffer)
                "bottleneck_size": 3 + i,
                "target_layers": [1],
            }
            model.add_adapter(name, cfg)
            _randomize(model.get_adapter(name), seed=10 + i, std=0.2)
    fusion = add_fusion(model, "f", ["a", "b", "c"], temperature=2.0)
    _randomize(fusion, seed=3, std=0.2)
    site = model.base.get_submodule(LAST)
    seen: dict[str, torch.Tensor] = {}
    handle = site.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out.detach().clone()))
    inputs = _inputs()
    with torch.no_grad():
        model.deactivate()
        model(**inputs)
        x, y = seen["x"], seen["y"]  # the last layer's inputs do not depend on the fusion there
        model.activate(Fuse("a", "b", "c", name="f"))
        model(**inputs)
    handle.remove()
    zs = []
    for name in ("a", "b", "c"):
        delta = model.get_adapter(name).delta_at(LAST)
        if type(delta).__name__ == "LoraLayer":
            zs.append(delta.scaling * (x @ delta.lora_A.T) @ delta.lora_B.T)
        else:
            hidden = torch.relu(y @ delta.adapter_down.weight.T + delta.adapter_down.bias)
            zs.append(delta.scaling * (hidden @ delta.adapter_up.weight.T + delta.adapter_up.bias))
    layer = fusion.delta_at(LAST)
    q = y @ layer.fusion_query.weight.T + layer.fusion_query.bias
    scores = torch.stack([(q * (z @ layer.fusion_key.weight.T)).sum(-1) for z in zs], -1) / 2.0
    s = torch.softmax(scores, -1)
    expected = y + sum(s[..., i : i + 1] * (z @ layer.fusion_value.weight.T) for i, z in enumerate(zs))
    assert torch.allclose(seen["y"], expected, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "pfeiffer"])
def test_one_adapter_with_identity_value_reproduces_it(bert_path: Path, method: str) -> None:
    model = _model(bert_path)
    if method == "lora":
        model.add_adapter(
            "a", {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "dense"]}
        )
    else:
        model.add_adapter("a", {"method": "bottleneck", "variant": "pfeiffer", "bottleneck_size": 4})
    _randomize(model.get_adapter("a"), seed=5)
    fusion = add_fusion(model, "f", ["a"])
    _randomize(fusion, seed=6)  # Q and K do not matter with one adapter; V does
    with torch.no_grad():
        for layer in fusion.layers:
            layer.fusion_value.weight.copy_(torch.eye(layer.d))
    inputs = _inputs()
    with torch.no_grad():
        model.deactivate()
        plain = model(**inputs).last_hidden_state
        model.activate("a")
        alone = model(**inputs).last_hidden_state
        model.activate(Fuse("a", name="f"))
        fused = model(**inputs).last_hidden_state
    assert (alone - plain).abs().max() > 1e-2  # the adapter does change the output
    assert torch.allclose(fused, alone, atol=1e-5)


def test_value_starts_near_identity_and_regularization(bert_path: Path) -> None:
    model = _model(bert_path)
    model.add_adapter("a", {"method": "lora", "r": 2, "target_modules": ["query"]})
    fusion = add_fusion(model, "f", ["a"])
    V = fusion.layers[0].fusion_value.weight
    assert 0 < (V - torch.eye(V.shape[0])).abs().max() < 1e-5
    with torch.no_grad():
        for layer in fusion.layers:
            layer.fusion_value.weight.copy_(torch.eye(layer.d))
        fusion.layers[0].fusion_value.weight[0, 1] = 0.5
    assert fusion.regularization().item() == pytest.approx(0.25)


def test_gradients_reach_only_fusion_and_head(bert_path: Path) -> None:
    from deltahub.training.engine import TaskModel
    from deltahub.training.head import TaskHead

    model = _model(bert_path)
    _two_loras_and_pfeiffer(model)
    for name in ("a", "b", "c"):
        model.get_adapter(name).requires_grad_(False)  # as loaded constituents are
    fusion = add_fusion(model, "f", ["a", "b", "c"])
    model.activate(Fuse("a", "b", "c", name="f"))
    head = TaskHead(32, 3)
    task = TaskModel(model, "classification", head, fusion, fusion_reg=0.01).train()
    out = task(**_inputs(), labels=torch.tensor([0, 1, 2]))
    out["loss"].backward()
    trainable = {id(p) for p in [*fusion.parameters(), *head.parameters()]}
    assert len(trainable) == 4 + 2  # one site: Q, b_Q, K, V; and the head
    for n, p in task.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_return_fusion_attentions(bert_path: Path) -> None:
    model = _model(bert_path)
    _two_loras_and_pfeiffer(model)
    add_fusion(model, "f", ["a", "b", "c"])
    model.activate("f")  # a fusion activates by name as Fuse(its adapters)
    with torch.no_grad():
        out = model(**_inputs(), return_fusion_attentions=True)
        plain = model(**_inputs())
    att = out.fusion_attentions["f"]
    assert set(att) == {LAST}
    assert att[LAST].shape == (3, 7, 3)
    assert torch.allclose(att[LAST].sum(-1), torch.ones(3, 7), atol=1e-6)
    assert torch.equal(out.last_hidden_state, plain.last_hidden_state)


def test_fuse_needs_a_loaded_fusion_name(bert_path: Path) -> None:
    model = _model(bert_path)
    model.add_adapter("a", {"method": "lora", "r": 2, "target_modules": ["query"]})
    with pytest.raises(InvalidConfig, match="name="):
        model.activate(Fuse("a"))
    with pytest.raises(NotFound, match="nope"):
        model.activate(Fuse("a", name="nope"))


def test_fusion_schema_rejects_bad_shapes() -> None:
    from deltahub.artifact import TensorInfo, validate

    def info(shape: tuple[int, ...]) -> TensorInfo:
        return TensorInfo("x", "F32", shape, (0, 0))

    good = {
        "s.fusion_query.weight": info((4, 4)),
        "s.fusion_query.bias": info((4,)),
        "s.fusion_key.weight": info((4, 4)),
        "s.fusion_value.weight": info((4, 4)),
        "deltahub_head.classifier.weight": info((2, 4)),
    }
    assert validate({"method": "fusion", "adapters": ["a"]}, good) == "fusion"
    with pytest.raises(InvalidArtifact, match="shape-mismatch"):
        validate({"method": "fusion", "adapters": ["a"]}, {**good, "s.fusion_key.weight": info((4, 3))})
    with pytest.raises(InvalidArtifact, match="lacks"):
        validate({"method": "fusion", "adapters": ["a"]}, {k: v for k, v in good.items() if "value" not in k})
    with pytest.raises(InvalidArtifact, match="adapters"):
        validate({"method": "fusion", "adapters": []}, good)


# --------------------------------------------------------------------------- artifacts


@pytest.fixture
def published(bert_path: Path, tmp_path: Path) -> dict[str, object]:
    """Two published adapters (LoRA, Pfeiffer) and a fusion over them, trained for one epoch."""
    from deltahub.fusion import fuse

    registry = Registry()
    model = _model(bert_path)
    _two_loras_and_pfeiffer(model)
    for name in ("a", "c"):
        out = model.save_adapter(name, tmp_path / name)
        registry.publish(out, name)
    data = fh.color_task(tmp_path / "train.jsonl", n=16)
    result = fuse(
        ["a", "c"], str(bert_path), str(data), eval_data=str(data), name="fz", epochs=1, batch_size=8,
        registry=registry, progress=False,
    )  # fmt: skip
    return {"registry": registry, "result": result, "data": data}


def test_fusion_publish_load_same_outputs_and_pins(bert_path: Path, published: dict) -> None:
    from deltahub.training import load_task_model

    registry, result = published["registry"], published["result"]
    version = result.version
    manifest = registry.manifest(version)
    pins = {p.ref: p.digest for p in manifest.parents if p.role == "constituent"}
    assert pins == {"a@1": registry.resolve("a@1").digest, "c@1": registry.resolve("c@1").digest}
    assert set(manifest.extra["fusion"]["attention"]) == {"a", "c"}
    assert manifest.extra["head"]["labels"] == sorted(fh.COLORS)

    inputs = _inputs()
    with torch.no_grad():
        before = result.model(**inputs)["logits"]
        loaded = load_task_model(str(bert_path), "fz", registry=registry)
        after = loaded(**inputs)["logits"]
    assert loaded.model.adapters == ["a", "c", "fz"]
    assert torch.allclose(before, after, atol=1e-6)

    # A newer version of a constituent does not change what the fusion loads.
    model = _model(bert_path)
    model.add_adapter("a", {"method": "lora", "r": 2, "target_modules": ["query"]})
    registry.publish(model.save_adapter("a", Path(registry.home) / "a2"), "a")
    fresh = AdaptedModel(load_base(bert_path, device="cpu"), registry=registry)
    fresh.load("fz")
    assert fresh._digests["a"] == pins["a@1"]


def test_missing_or_different_constituent_is_a_clear_error(bert_path: Path, published: dict) -> None:
    from deltahub.fusion.artifact import load_constituents

    registry = published["registry"]
    registry.remove("c@1", force=True)  # rm refuses a pinned constituent unless forced
    model = AdaptedModel(load_base(bert_path, device="cpu"), registry=registry)
    with pytest.raises(NotFound, match=r"constituent c@1 \(sha256:"):
        model.load("fz")

    # The ref exists but with other bytes than the pinned digest.
    artifact = registry.open("fz")
    constituents = artifact.manifest.extra["fusion"]["constituents"]
    constituents[0]["digest"] = "sha256:" + "0" * 64
    with pytest.raises(IntegrityError, match="pins sha256:0000"):
        load_constituents(
            AdaptedModel(load_base(bert_path, device="cpu"), registry=registry), artifact, registry
        )
