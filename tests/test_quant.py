"""Quantized (bitsandbytes 4-bit / 8-bit) bases: equivalence with the dequantized base,
the CPU kernel guard, merging with an error report, routing, bottleneck and fusion, QLoRA
training, and adapters moving between 4-bit and full-precision copies of one base.

The reference for a 4-bit base is its *dequantized* copy (`quant.dequantize_model`: dense
`nn.Linear`/`Conv1D` layers holding exactly the weights the 4-bit layers compute with),
running PEFT's LoRA or deltahub's full-precision path: an independent computation that a
4-bit bug cannot share. Tolerances are relative to the largest output magnitude.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltahub.compose import AdaptedModel, Fuse, load_base, quant
from deltahub.compose.base import fingerprint
from deltahub.errors import IncompatibleBase, InvalidConfig, Unsupported
from tests.compose_helpers import tiny

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """bitsandbytes' CPU double-quant dequantization is ~500x slower with 2 threads on a
    busy 2-core machine (thread contention on tiny blocks); these models are tiny anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


REL = 1e-4  # 4-bit base + adapter vs dequantized base + adapter, fp32 compute
IDS = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def logits(model: Any, ids: torch.Tensor = IDS, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def pair(kind: str, quantize: str = "nf4", **overrides: Any) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(full-precision base, quantized base, dequantized copy of the quantized base)."""
    fp = load_base(tiny(kind, **overrides), device="cpu")
    q = load_base(tiny(kind, **overrides), device="cpu", quantize=quantize)
    dense = quant.dequantize_model(copy.deepcopy(q))
    return fp, q, dense


def randomize(model: AdaptedModel, name: str, seed: int = 0, std: float = 0.1) -> None:
    """Give an adapter nonzero weights (a fresh LoRA's B is zero: no effect to compare)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_quantized_module_keeps_head_and_norms_and_fingerprint(kind: str) -> None:
    fp, q, dense = pair(kind)
    names = {n: type(m).__name__ for n, m in q.named_modules()}
    head = "lm_head"
    assert names[head] == "Linear"  # the head stays in full precision
    assert sum(t == "Linear4bit" for t in names.values()) == (14 if kind == "llama" else 8)
    assert not any(p.requires_grad for p in q.parameters())
    norms = [p for n, p in q.named_parameters() if "norm" in n or ".ln_" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    # One fingerprint for the fp base, its 4-bit copy and the dequantized copy.
    assert q.deltahub_fingerprint == fp.deltahub_fingerprint == fingerprint(dense) == fingerprint(q)
    if kind == "gpt2":  # Conv1D layers came back as Conv1D with (in, out) weights
        assert type(dense.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert dense.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    # The quantized base really is a 4-bit approximation of the fp one.
    assert 1e-3 < rel(logits(q), logits(fp)) < 0.5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_load_from_directory_through_bitsandbytes_config(kind: str, tmp_path: Path) -> None:
    tiny(kind).save_pretrained(str(tmp_path))
    fp = load_base(tmp_path, device="cpu")
    q = load_base(tmp_path, device="cpu", quantize="nf4", double_quant=False)
    assert getattr(q.config, "quantization_config", None) is not None
    kinds = {type(m).__name__ for m in q.modules()}
    assert "Linear4bit" in kinds and type(q.lm_head).__name__ == "Linear"
    assert q.deltahub_fingerprint == fp.deltahub_fingerprint
    dense = quant.dequantize_model(copy.deepcopy(q))
    assert rel(logits(q), logits(dense)) < REL


def test_bad_quantize_values_and_missing_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidConfig, match="int4"):
        load_base(tiny("llama"), quantize="int4")
    q = load_base(tiny("llama"), device="cpu", quantize="nf4")
    with pytest.raises(Unsupported, match="quantized already"):
        load_base(q, quantize="nf4")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(Unsupported, match="bitsandbytes"):
        load_base(tiny("llama"), quantize="nf4")
    fp = AdaptedModel(load_base(tiny("llama"), device="cpu"))  # full precision never needs it
    fp.add_adapter("a", LORA)
    fp.activate("a")
    logits(fp)


def test_package_imports_without_touching_bitsandbytes() -> None:
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import deltahub, deltahub.compose.quant, deltahub.compose.model, deltahub.compose.export\n"
        "import deltahub.methods.lora.runtime, deltahub.methods.bottleneck.runtime, deltahub.cli.main\n"
        "from deltahub.compose import load_base, AdaptedModel\n"
        "import transformers as tf\n"
        "m = AdaptedModel(load_base(tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=16))))\n"
        "m.add_adapter('a', {'method': 'lora', 'r': 2, 'target_modules': 'all-linear'}); m.merge('a')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --------------------------------------------------------------------------- CPU kernel guard

# (d_in, d_out): kernel-friendly, then the shapes bnb's packed CPU kernel cannot run:
# d_in not a multiple of the blocksize (64), d_out not a multiple of 32, both, and the
# reported Llama down_proj (intermediate size 1376).
SHAPES = [(64, 64), (128, 32), (96, 64), (64, 48), (33, 17), (1376, 64)]


def _layer(d_in: int, d_out: int, quantize: str = "nf4") -> nn.Module:
    torch.manual_seed(d_in * 1000 + d_out)
    holder = nn.Sequential(nn.Linear(d_in, d_out))
    return load_base(holder, device="cpu", quantize=quantize)[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_runs_exactly_in_eval_mode(shape: tuple[int, int]) -> None:
    layer = _layer(*shape)
    assert not layer.training
    x = torch.randn(2, 5, shape[0])
    with torch.no_grad():  # the mode that used to crash (packed kernel) for odd shapes
        y = layer(x)
    ref = F.linear(x, quant.dequantize_weight(layer), layer.bias)
    assert rel(y, ref) < 1e-6
    assert quant.packed_kernel_supports(layer) == (shape[0] % 64 == 0 and shape[1] % 32 == 0)


@pytest.mark.skipif(
    bnb.__version__ != "0.50.2" or not bnb.functional.has_avx512bf16(),
    reason="documents bitsandbytes 0.50.2's packed AVX512-BF16 CPU kernel",
)
@pytest.mark.parametrize("shape", [(1376, 64), (64, 48)])
def test_unguarded_packed_kernel_fails_on_odd_shapes(shape: tuple[int, int]) -> None:
    layer = _layer(*shape)
    layer.support_avx512bf16_for_cpu = True  # what bnb does by itself without the guard
    with pytest.raises((RuntimeError, AssertionError)), torch.no_grad():
        layer(torch.randn(3, shape[0]))


def test_packed_kernel_opt_in_skips_unsupported_layers() -> None:
    # intermediate 80: gate/up have 80 outputs (not a multiple of 32), down_proj 80 inputs.
    _, q, dense = pair("llama", intermediate_size=80)
    exact = logits(q)
    slow = quant.use_packed_cpu_kernel(q)
    mlp = {n for n in slow if "mlp" in n}
    assert mlp == {f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
    if bnb.functional.has_avx512bf16():  # the attention projections (64 wide) use the fast kernel
        assert mlp == set(slow)
    # bfloat16 scales/compute on the packed layers (when the CPU has the kernel): close, not exact.
    assert rel(logits(q), exact) < 3e-2
    assert rel(exact, logits(dense)) < REL


# --------------------------------------------------------------------------- LoRA equivalence


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_on_4bit_equals_dequantized_base_with_peft(kind: str, variant: str, tmp_path: Path) -> None:
    from peft import PeftModel

    fp, q, dense = pair(kind)
    # Made (and saved) on the full-precision base: it must load on the 4-bit copy as is.
    src = AdaptedModel(fp)
    src.add_adapter("a", {**LORA, **VARIANTS[variant]})
    randomize(src, "a")
    src.save_adapter("a", tmp_path / "a")
    model = AdaptedModel(q)
    model.load_path(tmp_path / "a", "a")  # no force: the fingerprints agree
    model.activate("a")
    got = logits(model)
    plain = logits(dense)
    peft = PeftModel.from_pretrained(dense, str(tmp_path / "a")).eval()  # injects into `dense`
    want = logits(peft)
    assert rel(got, want) < REL
    assert rel(got, plain) > 1e-3  # the adapter does something


def test_odd_shapes_lora_equals_dequantized_base(tmp_path: Path) -> None:
    _, q, dense = pair("llama", intermediate_size=80)
    model, ref = AdaptedModel(q), AdaptedModel(dense)
    model.add_adapter("a", {**LORA, "use_dora": True})
    randomize(model, "a")
    model.save_adapter("a", tmp_path / "a")
    ref.load_path(tmp_path / "a", "a")
    model.activate("a")
    ref.activate("a")
    assert rel(logits(model), logits(ref)) < REL


def test_int8_base(tmp_path: Path) -> None:
    fp, q, dense = pair("llama", quantize="int8")
    assert {type(m).__name__ for m in q.modules()} >= {"Linear8bitLt"}
    assert q.deltahub_fingerprint == fp.deltahub_fingerprint
    model = AdaptedModel(q)
    model.add_adapter("a", LORA)
    randomize(model, "a")
    # One layer: exactly the int8 layer's own output plus s B A x.
    path = "model.layers.0.self_attn.q_proj"
    layer = model.get_adapter("a").delta_at(path)
    x = torch.randn(2, 4, 64)
    module = q.get_submodule(path)
    model.activate("a")
    with torch.no_grad():
        got = module(x)
        model.deactivate()
        want = module(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    assert rel(got, want) < 1e-6
    # The model: LLM.int8 also quantizes activations, so only close to the dequantized base.
    model.save_adapter("a", tmp_path / "a")
    ref = AdaptedModel(dense)
    ref.load_path(tmp_path / "a", "a")
    model.activate("a")
    ref.activate("a")
    assert rel(logits(model), logits(ref)) < 5e-2
    model.deactivate()
    before = logits(model)
    report = model.merge("a", allow_lossy=True)
    assert report.quantization == "int8" and report.layers == 14
    model.unmerge("a")
    assert torch.equal(logits(model), before)


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_into_4bit_reports_its_error_and_unmerges_exactly(variant: str) -> None:
    _, q, _ = pair("gpt2")
    model = AdaptedModel(q)
    model.add_adapter("a", {**LORA, **VARIANTS[variant]})
    randomize(model, "a")
    path = "transformer.h.0.mlp.c_fc"
    module = q.get_submodule(path)
    original = module.weight
    original_bytes = original.data.clone()
    base_out = logits(model)
    model.activate("a")
    adapted = logits(model)
    with pytest.raises(Unsupported, match="allow_lossy=True"):
        model.merge("a")
    assert model.merged == []
    probe = {"input_ids": IDS}
    layer = model.get_adapter("a").delta_at(path)
    expected_dense = layer._merged_weight(quant.dequantize_weight(module)).detach()
    report = model.merge("a", allow_lossy=True, probe=probe)
    # The report's numbers, recomputed independently.
    merged = logits(model)
    diff = (merged - adapted).abs()
    assert report.max_abs == pytest.approx(float(diff.max()), rel=1e-6)
    assert report.mean_abs == pytest.approx(float(diff.mean()), rel=1e-6)
    assert report.layers == 8 and report.probe_shape == list(adapted.shape)
    assert model.merge_reports["a"] is report and report.to_dict()["max_rel"] > 0
    # The merged weight is bitsandbytes' own requantization of W + dW.
    requant = bnb.nn.Params4bit(
        expected_dense.clone(), requires_grad=False, quant_type="nf4", blocksize=64, compress_statistics=True
    ).to("cpu")
    assert torch.equal(
        quant.dequantize_weight(module), bnb.functional.dequantize_4bit(requant.data, requant.quant_state)
    )
    assert (
        report.weight_max_abs >= float((quant.dequantize_weight(module) - expected_dense).abs().max()) - 1e-7
    )
    # Requantization error is real but of the order of the 4-bit error itself.
    assert 0 < report.max_rel < 0.5
    model.unmerge("a")
    assert module.weight is original and torch.equal(module.weight.data, original_bytes)
    assert torch.equal(logits(model), base_out)  # merge deactivated "a"; the base is back bit for bit
    model.activate("a")
    assert torch.equal(logits(model), adapted)


def test_merge_of_full_precision_base_returns_no_report() -> None:
    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    model.add_adapter("a", LORA)
    assert model.merge("a") is None and model.merge_reports == {}


# --------------------------------------------------------------------------- routing, bottleneck, fusion


def test_per_row_routing_on_4bit_equals_rows_alone() -> None:
    _, q, _ = pair("llama")
    model = AdaptedModel(q)
    for i, name in enumerate(["a", "b"]):
        model.add_adapter(name, {**LORA, "use_dora": name == "b"})
        randomize(model, name, seed=i)
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(3))
    names = ["a", None, "b", "a"]
    mixed = logits(model, ids, adapter_names=names)
    for i, name in enumerate(names):
        if name is None:
            model.deactivate()
        else:
            model.activate(name)
        alone = logits(model, ids[i : i + 1])
        assert rel(mixed[i : i + 1], alone) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("variant", ["pfeiffer", "parallel"])
def test_bottleneck_on_4bit_equals_dequantized_base(kind: str, variant: str, tmp_path: Path) -> None:
    _, q, dense = pair(kind)
    model, ref = AdaptedModel(q), AdaptedModel(dense)
    model.add_adapter("b", {"method": "bottleneck", "variant": variant, "reduction_factor": 8})
    randomize(model, "b")
    model.save_adapter("b", tmp_path / "b")
    ref.load_path(tmp_path / "b", "b")
    plain = logits(q)  # (activating patches the base in place)
    model.activate("b")
    ref.activate("b")
    got, want = logits(model), logits(ref)
    assert rel(got, want) < REL and rel(got, plain) > 1e-3
    with pytest.raises(Unsupported, match="cannot be merged"):
        model.merge("b", allow_lossy=True)


def test_fusion_on_4bit_equals_dequantized_base(tmp_path: Path) -> None:
    from deltahub.fusion.layer import add_fusion

    fp, q, dense = pair("llama")
    src, model, ref = AdaptedModel(fp), AdaptedModel(q), AdaptedModel(dense)
    cfgs = {"l": LORA, "p": {"method": "bottleneck", "variant": "pfeiffer", "reduction_factor": 8}}
    for i, (name, cfg) in enumerate(cfgs.items()):
        src.add_adapter(name, cfg)
        randomize(src, name, seed=i)
        src.save_adapter(name, tmp_path / name)
        model.load_path(tmp_path / name, name)  # the same site order on both
        ref.load_path(tmp_path / name, name)
    fq = add_fusion(model, "f", ["l", "p"])
    fd = add_fusion(ref, "f", ["l", "p"])
    with torch.no_grad():
        for p in fq.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    fd.load_state_dict(fq.state_dict())
    plain = logits(q)
    model.activate(Fuse("l", "p", name="f"))
    ref.activate(Fuse("l", "p", name="f"))
    got = logits(model)
    assert rel(got, logits(ref)) < REL and rel(got, plain) > 1e-3


# --------------------------------------------------------------------------- training


def test_qlora_training_lowers_loss_and_the_adapter_moves_to_full_precision(tmp_path: Path) -> None:
    fp, q, _ = pair("llama")
    quant.prepare_for_training(q, gradient_checkpointing=True)
    assert getattr(q, "is_activation_checkpointing", None) or q.is_gradient_checkpointing
    model = AdaptedModel(q)
    model.add_adapter("t", {**LORA, "r": 8, "lora_alpha": 16})
    model.activate("t")
    params = model.adapter_parameters("t")
    opt = torch.optim.AdamW(params, lr=2e-2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    q.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    q.eval()
    assert losses[-1] < losses[0] - 0.5
    first = model.get_adapter("t").delta_at("model.layers.0.self_attn.q_proj")
    assert first.lora_B.abs().sum() > 0  # gradients reached the first layer through checkpointing
    assert not any(p.requires_grad for n, p in q.named_parameters())  # the base stayed frozen
    model.save_adapter("t", tmp_path / "t")
    # Trained on 4 bits, it activates on the full-precision base (same fingerprint, no force).
    full = AdaptedModel(fp)
    full.load_path(tmp_path / "t", "t")
    for key, t in model.adapter_state_dict("t").items():
        assert torch.equal(full.adapter_state_dict("t")[key], t)
    full.activate("t")
    with torch.no_grad():
        fp_loss = float(full(input_ids=ids, labels=ids).loss)
    assert fp_loss < losses[0] - 0.5  # and helps there too
    # A base of another architecture still refuses it.
    other = AdaptedModel(load_base(tiny("llama", hidden_size=128), device="cpu", quantize="nf4"))
    with pytest.raises(IncompatibleBase):
        other.load_path(tmp_path / "t", "t")
