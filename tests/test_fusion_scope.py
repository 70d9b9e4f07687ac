"""Per-layer fusion (the default) against a computation by hand, its size, and old per-module artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltahub.compose.base import load_base
from deltahub.compose.blocks import Fuse
from deltahub.compose.model import AdaptedModel
from deltahub.fusion.layer import Fusion, LayerSite, add_fusion, fused_sites, fusion_size, layer_of
from tests import fusion_helpers as fh

ATTN_OUT = "encoder.layer.1.attention.output.dense"  # writes d = 32
FFN_UP = "encoder.layer.1.intermediate.dense"  # reads d = 32, writes d_ff = 64


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fh.bert_dir(tmp_path_factory.mktemp("bert") / "bert")


def _two_loras(bert_path: Path) -> AdaptedModel:
    model = AdaptedModel(load_base(bert_path, device="cpu"))
    for i, name in enumerate(["a", "b"]):
        model.add_adapter(
            name, {"method": "lora", "r": 2 + i, "lora_alpha": 8, "target_modules": "all-linear"}
        )
        _randomize(model.get_adapter(name), seed=i)
    return model


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(fh.SPECIAL + fh.WORDS), (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_layer_of() -> None:
    assert layer_of("encoder.layer.3.attention.self.query") == "encoder.layer.3"
    assert layer_of("model.layers.12.mlp.down_proj") == "model.layers.12"
    assert layer_of("transformer.h.0.attn.c_attn") == "transformer.h.0"
    assert layer_of("pooler.dense") == "pooler.dense"


def test_per_layer_fusion_matches_a_computation_by_hand(bert_path: Path) -> None:
    """One Q, K, V per layer; at a d-wide module the paper's formula on the deltas, at the
    d_ff-wide FFN projection the input-side formula, both with the layer's shared Q, K, V."""
    model = _two_loras(bert_path)
    fusion = add_fusion(model, "f", ["a", "b"], temperature=1.5)
    _randomize(fusion, seed=3, std=0.2)
    assert fusion.scope == "layer"
    shared = fusion.delta_at(ATTN_OUT)
    assert isinstance(shared, LayerSite) and shared.layer is fusion.delta_at(FFN_UP).layer  # type: ignore[union-attr]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        model.base.get_submodule(p).register_forward_hook(
            lambda m, args, out, p=p: seen.__setitem__(p, (args[0].detach(), out.detach()))
        )
        for p in (ATTN_OUT, FFN_UP)
    ]
    with torch.no_grad():
        model.activate(Fuse("a", "b", name="f"))
        model(**_inputs())
    for h in hooks:
        h.remove()
    layer = shared.layer  # type: ignore[union-attr]
    Q, bQ = layer.fusion_query.weight, layer.fusion_query.bias
    K, V = layer.fusion_key.weight, layer.fusion_value.weight
    loras = {p: [model.get_adapter(n).delta_at(p) for n in ("a", "b")] for p in (ATTN_OUT, FFN_UP)}

    def base_out(p: str, x: torch.Tensor) -> torch.Tensor:
        m = model.base.get_submodule(p)
        return x @ m.weight.T + m.bias

    # Output side: query = the module's output y, keys and values from z_n = s B A x.
    x, got = seen[ATTN_OUT]
    y = base_out(ATTN_OUT, x)
    zs = [lo.scaling * (x @ lo.lora_A.T) @ lo.lora_B.T for lo in loras[ATTN_OUT]]
    q = y @ Q.T + bQ
    s = torch.softmax(torch.stack([(q * (z @ K.T)).sum(-1) for z in zs], -1) / 1.5, -1)
    want = y + sum(s[..., n : n + 1] * (z @ V.T) for n, z in enumerate(zs))
    assert torch.allclose(got, want, atol=1e-5)

    # Input side: query = the input x, k_n = K A_n^T A_n x, out = sum_n s_n Delta W_n (V x).
    x, got = seen[FFN_UP]
    y = base_out(FFN_UP, x)
    assert got.shape[-1] == 64 and x.shape[-1] == 32
    q = x @ Q.T + bQ
    keys = [((x @ lo.lora_A.T) @ lo.lora_A) @ K.T for lo in loras[FFN_UP]]
    s = torch.softmax(torch.stack([(q * k).sum(-1) for k in keys], -1) / 1.5, -1)
    vx = x @ V.T
    want = y + sum(
        s[..., n : n + 1] * (lo.scaling * (vx @ lo.lora_A.T) @ lo.lora_B.T)
        for n, lo in enumerate(loras[FFN_UP])
    )
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - y).abs().max() > 1e-2  # the fusion does change the output


def test_input_side_folded_equals_direct() -> None:
    from deltahub.fusion.layer import FusionLayer, Part

    torch.manual_seed(0)
    layer = FusionLayer(16, temperature=0.7).double()
    _randomize(layer, seed=1, std=0.2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    As = [torch.randn(r, 16, dtype=torch.float64) for r in (2, 5)]
    Bs = [torch.randn(40, r, dtype=torch.float64) for r in (2, 5)]
    parts = [
        Part(lambda *_: None, lambda B=B: (B * 0.5, None), lora_A=lambda A=A: A, width_out=40)  # type: ignore[arg-type,misc]
        for A, B in zip(As, Bs, strict=True)
    ]
    out_f, s_f = layer.folded_input(x, parts, [x @ A.T for A in As])
    out_d, s_d = layer.direct_input(x, As, [0.5 * B @ A for A, B in zip(As, Bs, strict=True)])
    assert torch.allclose(s_f, s_d, atol=1e-12) and torch.allclose(out_f, out_d, atol=1e-10)


def test_one_lora_with_identity_value_reproduces_it_at_every_width(bert_path: Path) -> None:
    model = AdaptedModel(load_base(bert_path, device="cpu"))
    model.add_adapter("a", {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    _randomize(model.get_adapter("a"), seed=5)
    fusion = add_fusion(model, "f", ["a"])
    _randomize(fusion, seed=6)
    with torch.no_grad():
        for layer in fusion.fusion_layers():
            layer.fusion_value.weight.copy_(torch.eye(layer.d))
        model.activate("a")
        alone = model(**_inputs()).last_hidden_state
        model.activate("f")
        fused = model(**_inputs()).last_hidden_state
    assert torch.allclose(fused, alone, atol=1e-5)


def test_sizes_per_layer_and_per_module(bert_path: Path) -> None:
    model = _two_loras(bert_path)
    sites = fused_sites(model, ["a", "b"])
    d, L = 32, 2
    per_layer = add_fusion(model, "fl", ["a", "b"])
    groups = {layer_of(s) for s in sites}
    assert len(groups) == L + 1  # two layers and the pooler
    n_layer = sum(t.numel() for t in per_layer.tensors().values())
    assert n_layer == (L + 1) * (3 * d * d + d) == fusion_size(model.base, sites, "layer")["parameters"]
    per_module = add_fusion(model, "fm", ["a", "b"], scope="module")
    n_module = sum(t.numel() for t in per_module.tensors().values())
    widths = [model.base.get_submodule(s).weight.shape[0] for s in sites]
    assert (
        n_module
        == sum(3 * w * w + w for w in widths)
        == fusion_size(model.base, sites, "module")["parameters"]
    )
    assert n_module > 4 * n_layer


def test_minilm_shaped_fusion_is_within_15_percent_of_the_base() -> None:
    """all-MiniLM-L6-v2's shape (built on the meta device: no weights): two LoRAs on every
    linear give a per-module fusion bigger than the base (the issue's 225 MB on 91 MB) and
    a per-layer one of at most 15% of it."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    with torch.device("meta"):
        base = BertModel(config)
    sites = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    layer = fusion_size(base, sites, "layer")
    module = fusion_size(base, sites, "module")
    assert module["bytes"] > base_bytes(base) and module["bytes"] == pytest.approx(225e6, rel=0.01)
    assert layer["ratio"] <= 0.15 and layer["bytes"] == pytest.approx(12.4e6, rel=0.01)


def base_bytes(base: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in base.parameters())


def test_a_per_module_artifact_without_scope_loads_and_computes_as_before(bert_path: Path) -> None:
    model = _two_loras(bert_path)
    old = add_fusion(model, "old", ["a", "b"], scope="module")
    _randomize(old, seed=9, std=0.2)
    with torch.no_grad():
        model.activate("old")
        before = model(**_inputs()).last_hidden_state
    tensors = old.tensors()
    assert "encoder.layer.1.intermediate.dense.fusion_query.weight" in tensors  # per module
    config = {"method": "fusion", "adapters": ["a", "b"], "temperature": 1.0}  # as written before scopes
    loaded = Fusion.from_tensors(model.base, config, list(tensors), tensors.__getitem__, "g")
    assert loaded.scope == "module"
    model._register("g", loaded, None)
    with torch.no_grad():
        model.activate(Fuse("a", "b", name="g"))
        after = model(**_inputs()).last_hidden_state
    assert torch.equal(before, after)

    # A per-layer artifact round-trips through its tensors too.
    new = add_fusion(model, "new", ["a", "b"])
    _randomize(new, seed=10, std=0.2)
    with torch.no_grad():
        model.activate("new")
        want = model(**_inputs()).last_hidden_state
    t = new.tensors()
    assert set(k.rsplit(".", 2)[0] for k in t) == {"encoder.layer.0", "encoder.layer.1", "pooler.dense"}
    config = {"method": "fusion", "adapters": ["a", "b"], "temperature": 1.0, "scope": "layer"}
    back = Fusion.from_tensors(model.base, config, list(t), t.__getitem__, "h")
    model._register("h", back, None)
    with torch.no_grad():
        model.activate(Fuse("a", "b", name="h"))
        got = model(**_inputs()).last_hidden_state
    assert torch.equal(want, got)


def test_fuse_per_layer_by_default_and_module_scope_says_its_size(bert_path: Path, tmp_path: Path) -> None:
    from deltahub.fusion import fuse
    from deltahub.registry import Registry

    registry = Registry()
    model = _two_loras(bert_path)
    for name in ("a", "b"):
        registry.publish(model.save_adapter(name, tmp_path / name), name)
    data = fh.color_task(tmp_path / "train.jsonl", n=16)
    lines: list[str] = []
    common = {"epochs": 1, "batch_size": 8, "registry": registry, "progress": False, "log": lines.append}
    r = fuse(["a", "b"], str(bert_path), str(data), name="fl", **common)
    manifest = registry.manifest(r.version)
    assert registry.open("fl").config["scope"] == "layer" and manifest.extra["fusion"]["scope"] == "layer"
    assert not any("per-module" in line for line in lines)
    r = fuse(["a", "b"], str(bert_path), str(data), name="fm", scope="module", **common)
    assert registry.open("fm").config["scope"] == "module"
    size = [line for line in lines if line.startswith("per-module fusion:")]
    assert len(size) == 1 and f"{r.extra['fusion']['parameters']:,} parameters" in size[0]


def test_cli_fuse_scope_output_dir_and_no_publish(bert_path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deltahub import artifact as af
    from deltahub.cli.main import cli
    from deltahub.registry import Registry

    registry = Registry()
    model = _two_loras(bert_path)
    for name in ("a", "b"):
        registry.publish(model.save_adapter(name, tmp_path / name), name)
    data = fh.color_task(tmp_path / "train.jsonl", n=16)
    args = ["fuse", "a", "b", "--base", str(bert_path), "--data", str(data), "--name", "fz", "--epochs", "1",
            "--batch-size", "8", "--no-publish"]  # fmt: skip
    r = CliRunner().invoke(cli, [*args, "--scope", "module", "--output-dir", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    assert "per-module fusion:" in r.stderr and "% of the base" in r.stderr
    written = af.load_dir(tmp_path / "o")
    assert written.config["scope"] == "module" and not Registry().exists("fz")
    r = CliRunner().invoke(cli, [*args, "--version", "2"])
    assert r.exit_code == 2 and "--no-publish" in r.output


def test_per_layer_on_llama_with_grouped_query_attention(tmp_path: Path) -> None:
    """k_proj / v_proj write 16 wide (2 of 4 heads), the MLP 64: the input side; one LoRA
    with V = I reproduces that LoRA at every module."""
    model = AdaptedModel(load_base(fh.llama_dir(tmp_path / "llama"), device="cpu"))
    model.add_adapter("a", {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"})
    _randomize(model.get_adapter("a"), seed=2, std=0.2)
    fusion = add_fusion(model, "f", ["a"])
    assert len(fusion.fusion_layers()) == 2  # model.layers.0 and model.layers.1
    with torch.no_grad():
        for layer in fusion.fusion_layers():
            layer.fusion_value.weight.copy_(torch.eye(layer.d))
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        model.activate("a")
        alone = model(input_ids=ids).logits
        model.activate("f")
        fused = model(input_ids=ids).logits
    assert torch.allclose(fused, alone, atol=1e-4)
