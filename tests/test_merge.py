"""Delta arithmetic (`deltahub.compose.merge`) checked against dense math and PEFT itself.

References are independent of the code under test: dense deltas come from PEFT's own
`get_delta_weight` (which applies PEFT's scaling, rsLoRA and rank/alpha patterns), model
outputs from PEFT-loaded adapters or from base weights with the dense delta added, and
ties/dare from PEFT's `add_weighted_adapter` on the same adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deltahub.artifact import Parent
from deltahub.cli.main import cli
from deltahub.compose.merge import merge_adapters, merge_loras
from deltahub.errors import IncompatibleBase, InvalidConfig, NotFound, Unsupported
from deltahub.registry import Registry

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
PREFIX = "base_model.model."


def tiny_llama(hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def make_lora(
    path: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj"), hidden: int = 64, **kw
) -> Path:
    """A PEFT LoRA with random A, B (and perturbed DoRA magnitudes), saved by PEFT."""
    kw.setdefault("lora_alpha", 2 * r)
    model = get_peft_model(tiny_llama(hidden), LoraConfig(r=r, target_modules=list(targets), **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters on one tiny Llama: equal-rank ones (for linear/ties/dare) and varied ones."""
    d = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(d / "a", 1),
        "b": make_lora(d / "b", 2, lora_alpha=3),
        "c": make_lora(d / "c", 3, use_rslora=True, targets=("q_proj", "v_proj", "down_proj")),
        "q_only": make_lora(d / "q", 4, targets=("q_proj",)),
        # varied ranks: rank_pattern/alpha_pattern, rsLoRA, different target sets
        "r2": make_lora(d / "r2", 5, r=2, targets=("q_proj", "o_proj")),
        "pat": make_lora(
            d / "pat",
            6,
            r=3,
            targets=("q_proj", "v_proj", "up_proj"),
            rank_pattern={"model.layers.1.self_attn.q_proj": 5},
            alpha_pattern={"up_proj": 1.5},
        ),
        "rs": make_lora(d / "rs", 7, r=6, use_rslora=True, targets=("q_proj", "v_proj", "gate_proj")),
        "dora": make_lora(d / "dora", 8, use_dora=True, targets=("q_proj", "v_proj", "up_proj")),
        "small_base": make_lora(d / "small", 9, hidden=32),
    }


def publish(loras: dict[str, Path], *names: str, fingerprints: dict[str, str] | None = None) -> Registry:
    reg = Registry()
    for n in names:
        reg.publish(loras[n], name=n, base_fingerprint=(fingerprints or {}).get(n))
    return reg


def peft_name(name: str) -> str:
    # PEFT warns about (and may re-initialize) adapter names that are substrings of "lora_".
    return f"adapter_{name}"


def peft_with(loras: dict[str, Path], names: list[str]) -> PeftModel:
    model = PeftModel.from_pretrained(tiny_llama(), str(loras[names[0]]), adapter_name=peft_name(names[0]))
    for n in names[1:]:
        model.load_adapter(str(loras[n]), adapter_name=peft_name(n))
    return model.eval()


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    return {k: m for k, m in model.named_modules() if isinstance(m, LoraLayer)}


def dense_sum(loras: dict[str, Path], names: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i dW_i per module, each dW_i from PEFT's get_delta_weight (float64)."""
    out: dict[str, torch.Tensor] = {}
    for module, layer in lora_layers(peft_with(loras, names)).items():
        for n, w in zip(names, weights, strict=True):
            if peft_name(n) in layer.lora_A:
                d = w * layer.get_delta_weight(peft_name(n)).double()
                out[module] = out[module] + d if module in out else d
    return out


def merged_deltas(reg: Registry, ref: str) -> dict[str, torch.Tensor]:
    """B @ A of each merged module, after checking that the config's scaling is 1."""
    from deltahub.compose.merge import load_tensors, lora_modules

    art = reg.open(ref)
    modules = lora_modules(art.config, load_tensors(art))
    assert all(m.scaling == 1.0 for m in modules.values())
    return {k: m.B.double() @ m.A.double() for k, m in modules.items()}


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_merged_in_peft(reg: Registry, ref: str, tmp_path: Path) -> PeftModel:
    out = reg.export(ref, tmp_path / "export")
    return PeftModel.from_pretrained(tiny_llama(), str(out)).eval()


# --------------------------------------------------------------------------- exact methods


def test_cat_is_the_exact_weighted_sum_and_loads_in_peft(loras, tmp_path):
    names, weights = ["r2", "pat", "rs", "a"], [0.7, -0.5, 1.2, 0.3]
    reg = publish(loras, *names)
    v = merge_adapters(names, method="cat", weights=weights, name="merged", registry=reg)
    dense = dense_sum(loras, names, weights)
    got = merged_deltas(reg, v.ref)
    assert set(got) == set(dense)
    for module, d in dense.items():
        assert rel_err(got[module], d) <= 1e-5, module
    # rank = sum of the ranks present at each module (rank_pattern where it differs)
    config = reg.open(v.ref).config
    assert config["r"] == 2 + 5 + 6 + 4 and config["lora_alpha"] == config["r"]
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "o_proj", "up_proj", "gate_proj"}

    # PEFT loads the merged artifact; it equals a base whose weights have the dense sum added.
    reference = tiny_llama()
    with torch.no_grad():
        for module, d in dense.items():
            reference.get_submodule(module.removeprefix(PREFIX)).weight += d.float()
    merged = load_merged_in_peft(reg, v.ref, tmp_path)
    assert (logits(merged) - logits(reference)).abs().max() <= 1e-5
    assert (logits(reference) - logits(tiny_llama())).abs().max() > 1e-2  # the delta matters


def test_manifest_pins_parents_and_options(loras):
    reg = publish(loras, "a", "b")
    reg.publish(loras["a"], name="a")  # a@2: the merge must pin the version it used
    v = merge_adapters(["a@1", "b"], method="svd", rank=3, name="ab", registry=reg, weights=[1, 2])
    manifest = reg.manifest(v.ref)
    assert manifest.parents == [
        Parent("a@1", reg.resolve("a@1").digest, role="merge"),
        Parent("b@1", reg.resolve("b").digest, role="merge"),
    ]
    assert reg.resolve("a@1").digest != reg.resolve("a@2").digest
    assert manifest.extra["merge"] == {
        "method": "svd",
        "weights": [1.0, 2.0],
        "density": None,
        "rank": 3,
        "seed": 0,
    }
    assert v.method == "lora" and reg.resolve("ab").digest == v.digest


def test_svd_full_rank_is_exact(loras):
    names, weights = ["a", "rs", "pat"], [1.0, -0.6, 0.8]
    reg = publish(loras, *names)
    v = merge_adapters(names, method="svd", rank=4 + 6 + 5, weights=weights, name="m", registry=reg)
    dense = dense_sum(loras, names, weights)
    got = merged_deltas(reg, v.ref)
    for module, d in dense.items():
        assert rel_err(got[module], d) <= 1e-5, module


@pytest.mark.parametrize("k", [1, 3])
def test_svd_low_rank_is_the_best_rank_k_approximation(loras, k):
    names, weights = ["a", "b", "rs"], [0.5, 1.5, -1.0]
    reg = publish(loras, *names)
    v = merge_adapters(names, method="svd", rank=k, weights=weights, name="m", registry=reg)
    got = merged_deltas(reg, v.ref)
    for module, d in dense_sum(loras, names, weights).items():
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert rel_err(got[module], best) <= 1e-4, module
        # and it is not trivially the full sum
        assert rel_err(got[module], d) > 1e-3


@pytest.mark.parametrize("conditioning", ["well", "near-deficient", "deficient", "wide"])
def test_low_rank_sum_is_eckart_young_on_both_paths(conditioning):
    """The CholeskyQR fast path and the Householder QR fallback against a dense SVD."""
    from deltahub.compose import lowrank
    from deltahub.compose.merge import low_rank_sum

    g = torch.Generator().manual_seed(0)
    d_out = 12 if conditioning == "wide" else 40  # wide: R = 16 > d_out, Cholesky must fail
    B1, A1 = torch.randn(d_out, 8, generator=g), torch.randn(8, 30, generator=g)
    B2, A2 = torch.randn(d_out, 8, generator=g), torch.randn(8, 30, generator=g)
    if conditioning == "near-deficient":
        B2 = B1 + 1e-9 * B2  # condition number ~1e9: squaring it would lose everything
    if conditioning == "deficient":
        B2, A2 = B1, A1  # the same adapter twice: the stack has rank 8
    terms = [(0.7, B1, A1), (-1.3, B2, A2)]
    dense = sum(c * b.double() @ a.double() for c, b, a in terms)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    for k in (3, 16, 20):
        Bk, Ak = low_rank_sum(*lowrank.stack(terms), k)
        assert Bk.shape == (d_out, k) and Ak.shape == (k, 30)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        assert rel_err(Bk @ Ak, best) <= 1e-8, k


def test_low_rank_sum_batch_mixes_fast_and_fallback_paths():
    from deltahub.compose.merge import low_rank_sum

    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(3, 40, 16, generator=g, dtype=torch.float64), torch.randn(3, 16, 30, generator=g)
    B[1, :, 8:] = B[1, :, :8]  # rank-deficient stack in the middle of the batch
    Bk, Ak = low_rank_sum(B, A, 5)
    for i in range(3):
        U, S, Vh = torch.linalg.svd(B[i] @ A[i].double(), full_matrices=False)
        assert rel_err(Bk[i] @ Ak[i], (U[:, :5] * S[:5]) @ Vh[:5]) <= 1e-8, i


def test_negative_weights_negate_and_cancel(loras):
    reg = publish(loras, "rs")
    neg = merged_deltas(
        reg, merge_adapters(["rs"], method="cat", weights=[-1.0], name="neg", registry=reg).ref
    )
    for module, d in dense_sum(loras, ["rs"], [1.0]).items():
        assert rel_err(neg[module], -d) <= 1e-6
    # a - a is exactly zero with cat and with svd
    for method in ("cat", "svd"):
        v = merge_adapters(
            ["rs", "rs"], method=method, weights=[1.0, -1.0], name=f"zero-{method}", registry=reg
        )
        for module, d in merged_deltas(reg, v.ref).items():
            assert d.abs().max() <= 1e-6 * dense_sum(loras, ["rs"], [1.0])[module].abs().max(), module


@pytest.mark.parametrize("adapter", ["a", "rs", "dora"])
@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_one_adapter_weight_one_reproduces_peft(loras, tmp_path, adapter, method):
    reg = publish(loras, adapter)
    v = merge_adapters([adapter], method=method, name="solo", registry=reg)
    original = peft_with(loras, [adapter])
    merged = load_merged_in_peft(reg, v.ref, tmp_path)
    assert (logits(merged) - logits(original)).abs().max() <= 1e-5
    assert reg.open(v.ref).config["use_dora"] is (adapter == "dora")


# --------------------------------------------------------------------------- PEFT's merges


def peft_merge(loras, names, weights, **kw) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    model = peft_with(loras, names)
    model.add_weighted_adapter([peft_name(n) for n in names], weights, "merged", **kw)
    return {
        k: (layer.lora_B["merged"].weight.detach(), layer.lora_A["merged"].weight.detach())
        for k, layer in lora_layers(model).items()
    }


def ours(loras, names, weights, method, **kw) -> dict[str, torch.Tensor]:
    from deltahub.compose.merge import load_tensors

    reg = publish(loras, *names)
    inputs = [(reg.open(n).config, load_tensors(reg.open(n))) for n in names]
    tensors, config = merge_loras(inputs, method, weights, **kw)
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
    return tensors


def assert_same_factors(mine: dict[str, torch.Tensor], theirs: dict) -> None:
    assert {k.rsplit(".lora_", 1)[0] for k in mine} == set(theirs)
    for module, (B, A) in theirs.items():
        torch.testing.assert_close(mine[module + ".lora_A.weight"], A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(mine[module + ".lora_B.weight"], B, rtol=1e-5, atol=1e-7)


# equal-rank adapters with different alphas, rsLoRA, and one that targets only q_proj
SAME_RANK = ["a", "b", "c", "q_only"]
SAME_RANK_WEIGHTS = [0.6, -0.4, 1.0, 0.8]


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("linear", {}),
        ("ties", {"density": 0.5}),
        ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
        # density 1.0 drops nothing, so dare's math is deterministic and comparable as is
        ("dare_linear", {"density": 1.0}),
        ("dare_ties", {"density": 1.0}),
    ],
)
def test_matches_peft_add_weighted_adapter(loras, method, kw):
    theirs = peft_merge(loras, SAME_RANK, SAME_RANK_WEIGHTS, combination_type=method, **kw)
    mine = ours(loras, SAME_RANK, SAME_RANK_WEIGHTS, method, **kw)
    assert_same_factors(mine, theirs)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_given_the_same_random_drops(loras, monkeypatch, method):
    """Our seeded drops are recorded per factor and replayed inside PEFT's random_pruning."""
    import peft.utils.merge_utils as mu

    import deltahub.compose.merge.peft_methods as merge_mod

    drawn: dict[bytes, torch.Tensor] = {}
    real = merge_mod._dare_prune

    def recording(X, density, generator):
        out = real(X, density, generator)
        flat = zip(X.reshape(-1, *X.shape[-2:]), out.reshape(-1, *X.shape[-2:]), strict=True)
        for x, o in flat:  # one (module, adapter) factor each
            kept = o != 0
            # DARE rescales the survivors by 1 / density and leaves them otherwise untouched
            torch.testing.assert_close(o[kept], x[kept] / density)
            drawn[x.numpy().tobytes()] = o
        return out

    def replay(tensor, density, rescale):
        assert rescale
        return drawn[tensor.detach().float().numpy().tobytes()].to(tensor.dtype)

    monkeypatch.setattr(merge_mod, "_dare_prune", recording)
    mine = ours(loras, SAME_RANK, SAME_RANK_WEIGHTS, method, density=0.4, seed=7)
    kept = torch.cat([(o != 0).float().flatten() for o in drawn.values()]).mean()
    assert 0.35 < kept < 0.45  # about `density` of the entries survive
    monkeypatch.setattr(mu, "random_pruning", replay)
    theirs = peft_merge(loras, SAME_RANK, SAME_RANK_WEIGHTS, combination_type=method, density=0.4)
    assert_same_factors(mine, theirs)


def test_dare_is_seeded(loras):
    a = ours(loras, ["a", "b"], [1.0, 1.0], "dare_ties", density=0.5, seed=3)
    b = ours(loras, ["a", "b"], [1.0, 1.0], "dare_ties", density=0.5, seed=3)
    c = ours(loras, ["a", "b"], [1.0, 1.0], "dare_ties", density=0.5, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- refusals


def test_refuses_mismatched_bases_and_bad_options(loras):
    reg = publish(loras, "a", "b", "r2", "dora", "small_base", fingerprints={"a": FP_A, "b": FP_B})
    with pytest.raises(IncompatibleBase, match="different bases"):
        merge_adapters(["a", "b"], method="cat", name="x", registry=reg)
    with pytest.raises(IncompatibleBase, match="q_proj has different shapes"):
        merge_adapters(["r2", "small_base"], method="cat", name="x", registry=reg)
    with pytest.raises(InvalidConfig, match="3 weights for 2 adapters"):
        merge_adapters(["a", "r2"], method="cat", weights=[1, 2, 3], name="x", registry=reg)
    with pytest.raises(Unsupported, match="equal ranks"):
        merge_adapters(["a", "r2"], method="ties", density=0.5, name="x", registry=reg)
    with pytest.raises(InvalidConfig, match="needs a density"):
        merge_adapters(["a", "r2"], method="dare_linear", name="x", registry=reg)
    with pytest.raises(InvalidConfig, match="density must be"):
        merge_adapters(["a", "r2"], method="ties", density=1.5, name="x", registry=reg)
    with pytest.raises(InvalidConfig, match="rank applies only to svd"):
        merge_adapters(["a", "r2"], method="cat", rank=4, name="x", registry=reg)
    with pytest.raises(Unsupported, match="DoRA"):
        merge_adapters(["dora", "r2"], method="cat", name="x", registry=reg)
    with pytest.raises(NotFound):
        merge_adapters(["a", "nope"], method="cat", name="x", registry=reg)
    assert [v.full_name for v in reg.list()] == ["a", "b", "dora", "r2", "small_base"]  # nothing published


# --------------------------------------------------------------------------- CLI


def test_cli_merge_publishes_and_prints_ref_and_digest(loras):
    reg = publish(loras, "a", "rs")
    runner = CliRunner()
    result = runner.invoke(
        cli, ["merge", "a", "rs", "--method", "svd", "--rank", "6", "--weights", "-1,0.5", "--name", "m"]
    )
    assert result.exit_code == 0, result.output
    ref, digest = result.output.split()
    assert ref == "m@1" and digest == reg.resolve("m").digest

    result = runner.invoke(
        cli,
        ["merge", "a", "rs", "--method", "cat", "--name", "m", "--version", "2.0", "--json", "--tag", "exp"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ref"] == "m@2.0" and "exp" in data["tags"]
    assert [p["digest"] for p in data["parents"]] == [reg.resolve("a").digest, reg.resolve("rs").digest]
    got = merged_deltas(reg, "m@2.0")
    for module, d in dense_sum(loras, ["a", "rs"], [1.0, 1.0]).items():
        assert rel_err(got[module], d) <= 1e-5


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["a", "nope", "--method", "cat"], 4, "nope"),
        (["a", "b", "--method", "cat"], 7, "different bases"),
        (["a", "rs", "--method", "cat", "--weights", "1,2,3"], 2, "3 weights for 2 adapters"),
        (["a", "rs", "--method", "cat", "--weights", "1,x"], 2, "not a comma-separated list"),
        (["a", "rs", "--method", "ties"], 2, "needs a density"),
        (["a", "rs", "--method", "nope"], 2, "nope"),
    ],
)
def test_cli_merge_errors_are_one_clean_line(loras, args, code, message):
    publish(loras, "a", "b", "rs", fingerprints={"a": FP_A, "b": FP_B})
    result = CliRunner().invoke(cli, ["merge", *args, "--name", "m"])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not any(v.full_name == "m" for v in Registry().list())
