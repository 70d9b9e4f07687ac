"""deltahub.diff and `deltahub diff`: exactness against dense matrices, verdicts, CLI.

Every LoRA number is checked against an independent dense computation (dW = s B A
materialized in float64, torch.linalg on it), or against PEFT's own delta weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import deltahub
from deltahub.artifact import Parent, register_config_checker, write_dir
from deltahub.cli.main import cli
from deltahub.registry import Registry

FP = "sha256:" + "a" * 64
FP_OTHER = "sha256:" + "b" * 64
PREFIX = "base_model.model."

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (B (d_out, r), A (r, d_in))


def lora_dir(
    path: Path,
    modules: Factors,
    r: int,
    alpha: float,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    use_rslora: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A PEFT-format LoRA directory written directly (safetensors + adapter_config.json)."""
    tensors = {}
    for name, (B, A) in modules.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B.contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_dropout": 0.0,
        "base_model_name_or_path": None,
        **(extra or {}),
    }
    return write_dir(path, tensors, config)


def rand_factors(shapes: dict[str, tuple[int, int, int]], seed: int) -> Factors:
    """module -> (d_out, d_in, r): random float32 factors with B non-zero."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g) / math.sqrt(d_in))
        for name, (d_out, d_in, r) in shapes.items()
    }


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    # Small dense oracles and factored math: intra-op threads only add contention on a
    # shared 2-core runner (measured: 2 threads up to 10x slower there than 1).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def publish(path: Path, name: str, fingerprint: str = FP, **kwargs: Any) -> str:
    v = Registry().publish(path, name=name, base_fingerprint=fingerprint, **kwargs)
    return v.ref


# --------------------------------------------------------------------------- dense oracle


def dense(B: torch.Tensor, A: torch.Tensor, s: float) -> torch.Tensor:
    return s * (B.double() @ A.double())  # (d_out, d_in)


def dense_svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    return U, S


def dense_effective_rank(S: torch.Tensor) -> float:
    p = S / S.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def dense_subspace(Ua: torch.Tensor, Ub: torch.Tensor, k: int) -> float:
    return float((Ua[:, :k].T @ Ub[:, :k]).pow(2).sum() / k)


def close(x: float | None, y: float, rel: float = 1e-5, abs_: float = 1e-12) -> bool:
    return x is not None and math.isclose(x, y, rel_tol=rel, abs_tol=abs_)


# --------------------------------------------------------------------------- exactness


def test_exact_against_dense_across_ranks_and_scalings(tmp_path: Path) -> None:
    """Ranks 1..64, d up to 1024, rank_pattern / alpha_pattern / rsLoRA: every number vs dense."""
    shapes_a = {
        "m0.big": (1024, 1024, 64),
        "m1.tall": (1024, 256, 1),
        "m2.wide": (64, 512, 8),
        "m3.sq": (256, 256, 16),
    }
    ranks_b = {"m0.big": 64, "m1.tall": 16, "m2.wide": 32, "m3.sq": 16}
    fa = rand_factors(shapes_a, seed=1)
    fb = rand_factors({n: (d_out, d_in, ranks_b[n]) for n, (d_out, d_in, _) in shapes_a.items()}, seed=2)
    # m0 is a small perturbation of a: a relative change ~1e-4 must survive cancellation.
    g = torch.Generator().manual_seed(3)
    Ba, Aa = fa["m0.big"]
    fb["m0.big"] = (
        Ba + 1e-4 * torch.randn(Ba.shape, generator=g),
        Aa + 1e-4 * torch.randn(Aa.shape, generator=g) / 32,
    )

    rp_a = {"m0.big": 64, "m1.tall": 1, "m2.wide": 8}  # m3 uses r=16
    ap_a = {"m2.wide": 3.0}
    rp_b = {"m0.big": 64, "m2.wide": 32}  # m1, m3 use r=16
    ap_b = {"m1.tall": 7.0, "m0.big": 4.0}  # m0: s_b = 4 / sqrt(64) = s_a
    ref_a = publish(lora_dir(tmp_path / "a", fa, 16, 32, rp_a, ap_a), "x")
    ref_b = publish(lora_dir(tmp_path / "b", fb, 16, 24, rp_b, ap_b, use_rslora=True), "x")

    def s_a(name: str) -> float:
        return ap_a.get(name, 32) / rp_a.get(name, 16)

    def s_b(name: str) -> float:
        return ap_b.get(name, 24) / math.sqrt(rp_b.get(name, 16))

    report = deltahub.diff(ref_a, ref_b)
    assert report.verdict == "changed"
    by_name = {m.module: m for m in report.modules}
    assert set(by_name) == set(shapes_a)
    num = den = 0.0
    for name in shapes_a:
        Wa, Wb = dense(*fa[name], s_a(name)), dense(*fb[name], s_b(name))
        m = by_name[name]
        na, nb, nd = float(Wa.norm()), float(Wb.norm()), float((Wa - Wb).norm())
        num, den = num + nd**2, den + na**2
        assert m.scaling_a == pytest.approx(s_a(name), rel=1e-12)
        assert m.scaling_b == pytest.approx(s_b(name), rel=1e-12)
        assert close(m.norm_a, na) and close(m.norm_b, nb), name
        assert close(m.diff_norm, nd), (name, m.diff_norm, nd)
        assert close(m.relative_change, nd / na), name
        assert close(m.cosine, float((Wa * Wb).sum()) / (na * nb)), name
        (Ua, Sa), (Ub, Sb) = dense_svd(Wa), dense_svd(Wb)
        k = min(shapes_a[name][2], ranks_b[name])
        assert close(m.subspace_similarity, dense_subspace(Ua, Ub, k)), name
        assert close(m.effective_rank_a, dense_effective_rank(Sa)), name
        assert close(m.effective_rank_b, dense_effective_rank(Sb)), name
        assert (m.rank_a, m.rank_b) == (shapes_a[name][2], ranks_b[name])
    assert by_name["m0.big"].relative_change < 1e-3  # the perturbed module really is close
    assert close(report.relative_change, math.sqrt(num) / math.sqrt(den))
    # Sorted by relative change, largest first.
    rels = [m.relative_change for m in report.modules]
    assert rels == sorted(rels, reverse=True)


def test_scaling_matches_peft_delta_weight(tmp_path: Path) -> None:
    """Our s B A equals PEFT's own get_delta_weight (rsLoRA on, fan-in/fan-out handled)."""
    from tests.helpers import peft_lora_dir, tiny_llama

    base = tiny_llama()
    a = peft_lora_dir(tmp_path / "a", seed=0, r=4, base=base, use_rslora=True)
    b = peft_lora_dir(tmp_path / "b", seed=1, r=4, base=tiny_llama())
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(a))
    deltas = {
        name.removeprefix(PREFIX): mod.get_delta_weight("default").double()
        for name, mod in model.named_modules()
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})
    }
    model_b = PeftModel.from_pretrained(tiny_llama(), str(b))
    deltas_b = {
        name.removeprefix(PREFIX): mod.get_delta_weight("default").double()
        for name, mod in model_b.named_modules()
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})
    }
    report = deltahub.diff(publish(a, "p"), publish(b, "p"))
    assert {m.module for m in report.modules} == set(deltas)
    for m in report.modules:
        Wa, Wb = deltas[m.module], deltas_b[m.module]
        assert close(m.norm_a, float(Wa.norm()), rel=1e-5)
        assert close(m.diff_norm, float((Wa - Wb).norm()), rel=1e-5)
        assert close(m.cosine, float((Wa * Wb).sum() / (Wa.norm() * Wb.norm())), rel=1e-5, abs_=1e-7)


def test_lora_on_embeddings_counts_against_peft_delta_weight(tmp_path: Path) -> None:
    """PEFT names embedding factors `lora_embedding_A/B` (no `.weight`): they are diffed too."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from tests.helpers import tiny_llama

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = get_peft_model(
            tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_()
        model.save_pretrained(tmp_path / f"v{seed}", save_embedding_layers=False)
        dirs.append(tmp_path / f"v{seed}")

    def deltas(d: Path) -> dict[str, torch.Tensor]:
        model = PeftModel.from_pretrained(tiny_llama(), str(d))
        return {
            name.removeprefix(PREFIX): mod.get_delta_weight("default").double()
            for name, mod in model.named_modules()
            if hasattr(mod, "get_delta_weight")
            and "default" in {**getattr(mod, "lora_A", {}), **getattr(mod, "lora_embedding_A", {})}
        }

    da, db = deltas(dirs[0]), deltas(dirs[1])
    assert "model.embed_tokens" in da
    report = deltahub.diff(publish(dirs[0], "emb"), publish(dirs[1], "emb"))
    assert {m.module for m in report.modules} == set(da)
    for m in report.modules:
        Wa, Wb = da[m.module], db[m.module]
        assert close(m.norm_a, float(Wa.norm()), rel=1e-5)
        assert close(m.diff_norm, float((Wa - Wb).norm()), rel=1e-5)


# --------------------------------------------------------------------------- verdicts

SHAPES = {
    f"model.layers.{i}.self_attn.{p}": (32, 48, 4) for i in range(2) for p in ("q_proj", "k_proj", "v_proj")
}


@pytest.fixture
def base_factors() -> Factors:
    return rand_factors(SHAPES, seed=0)


def test_identical_versions(tmp_path: Path, base_factors: Factors) -> None:
    d = lora_dir(tmp_path / "a", base_factors, 4, 8)
    v1 = publish(d, "x", metrics={"acc": 0.5})
    v2 = publish(d, "x", metrics={"acc": 0.75}, description="same weights, new eval")
    report = deltahub.diff(v1, v2)
    assert report.verdict == "identical"
    assert report.relative_change == 0.0
    assert all(m.status == "unchanged" and m.diff_norm == 0.0 for m in report.modules)
    assert len(report.modules) == len(SHAPES)
    assert report.tensor_names("unchanged") and not report.tensor_names("changed")
    assert [(c.field, c.a, c.b, c.change) for c in report.metrics] == [("acc", 0.5, 0.75, 0.25)]
    # The same version against itself, and a directory against its published copy.
    assert deltahub.diff(v1, v1).verdict == "identical"
    assert deltahub.diff(str(d), v1).verdict == "identical"


def test_B_scaled_by_two_is_relative_change_one(tmp_path: Path, base_factors: Factors) -> None:
    doubled = {n: (2 * B, A) for n, (B, A) in base_factors.items()}
    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    rb = publish(lora_dir(tmp_path / "b", doubled, 4, 8), "x")
    report = deltahub.diff(ra, rb)
    assert report.verdict == "changed"
    assert len(report.modules) == len(SHAPES)
    for m in report.modules:
        assert m.status == "changed"
        assert abs(m.relative_change - 1.0) < 1e-6
        assert abs(m.cosine - 1.0) < 1e-9 and abs(m.subspace_similarity - 1.0) < 1e-9
        assert abs(m.norm_b - 2 * m.norm_a) < 1e-9 * m.norm_a
    assert abs(report.relative_change - 1.0) < 1e-6
    assert sorted(report.tensor_names("changed")) == sorted(f"{PREFIX}{n}.lora_B.weight" for n in SHAPES)
    assert len(report.tensor_names("unchanged")) == len(SHAPES)  # every lora_A
    for t in report.tensors:
        if t.status == "changed":  # per-tensor numbers too: B_b = 2 B_a
            assert abs(t.relative_change - 1.0) < 1e-6 and abs(t.cosine - 1.0) < 1e-6


def test_rebalanced_factors_are_numerically_identical(tmp_path: Path, base_factors: Factors) -> None:
    """B*2 with A/2: every factor tensor differs, dW does not."""
    rebalanced = {n: (2 * B, A / 2) for n, (B, A) in base_factors.items()}
    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    rb = publish(lora_dir(tmp_path / "b", rebalanced, 4, 8), "x")
    report = deltahub.diff(ra, rb)
    assert report.verdict == "numerically_identical"
    assert report.relative_change < 1e-12
    assert len(report.tensor_names("changed")) == 2 * len(SHAPES)


def test_only_the_changed_module_is_reported(tmp_path: Path, base_factors: Factors) -> None:
    target = "model.layers.1.self_attn.k_proj"
    changed = dict(base_factors)
    B, A = changed[target]
    changed[target] = (B + 0.5 * torch.randn(B.shape, generator=torch.Generator().manual_seed(9)), A)
    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    rb = publish(lora_dir(tmp_path / "b", changed, 4, 8), "x")
    report = deltahub.diff(ra, rb)
    assert report.verdict == "changed"
    assert [m.module for m in report.changed_modules] == [target]
    assert report.modules[0].module == target
    assert report.tensor_names("changed") == [f"{PREFIX}{target}.lora_B.weight"]
    Wa, Wb = dense(B, A, 2.0), dense(changed[target][0], A, 2.0)
    assert close(report.modules[0].relative_change, float((Wa - Wb).norm() / Wa.norm()))
    # The overall change spreads that module's change over every module's norm.
    total = math.sqrt(sum(float(dense(b, a, 2.0).norm()) ** 2 for b, a in base_factors.values()))
    assert close(report.relative_change, float((Wa - Wb).norm()) / total)


def test_rank_8_against_rank_16(tmp_path: Path) -> None:
    shapes8 = {f"model.layers.0.mlp.{p}": (40, 24, 8) for p in ("up_proj", "down_proj")}
    fa = rand_factors(shapes8, seed=4)
    g = torch.Generator().manual_seed(5)
    # Rank 16 holding the same dW: a's factors padded with zero columns of B.
    padded = {
        n: (
            torch.cat([B, torch.zeros(B.shape[0], 8)], 1),
            torch.cat([A, torch.randn(8, A.shape[1], generator=g)]),
        )
        for n, (B, A) in fa.items()
    }
    ra = publish(lora_dir(tmp_path / "a", fa, 8, 16), "x")  # s = 2
    rb = publish(lora_dir(tmp_path / "b", padded, 16, 32), "x")  # s = 2
    report = deltahub.diff(ra, rb)
    assert report.verdict == "numerically_identical"
    assert {(m.rank_a, m.rank_b) for m in report.modules} == {(8, 16)}
    assert all(m.relative_change < 1e-12 and abs(m.subspace_similarity - 1) < 1e-9 for m in report.modules)
    assert len(report.tensor_names("reshaped")) == 2 * len(shapes8)
    assert {c.field for c in report.config} == {"r", "lora_alpha"}

    fresh = rand_factors({n: (40, 24, 16) for n in shapes8}, seed=6)
    rc = publish(lora_dir(tmp_path / "c", fresh, 16, 32), "x")
    report = deltahub.diff(ra, rc)
    assert report.verdict == "changed"
    for m in report.modules:
        Wa, Wc = dense(*fa[m.module], 2.0), dense(*fresh[m.module], 2.0)
        assert close(m.relative_change, float((Wa - Wc).norm() / Wa.norm()))
        assert close(m.subspace_similarity, dense_subspace(dense_svd(Wa)[0], dense_svd(Wc)[0], 8))


def test_added_and_removed_modules(tmp_path: Path, base_factors: Factors) -> None:
    fewer = {n: f for n, f in base_factors.items() if "v_proj" not in n}
    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    rb = publish(lora_dir(tmp_path / "b", fewer, 4, 8), "x")
    report = deltahub.diff(ra, rb)
    assert report.verdict == "changed"
    removed = sorted(m.module for m in report.modules if m.status == "removed")
    assert removed == sorted(n for n in base_factors if "v_proj" in n)
    assert all(m.relative_change == 1.0 for m in report.modules if m.status == "removed")
    assert len(report.tensor_names("removed")) == 4
    back = deltahub.diff(rb, ra)
    assert sorted(m.module for m in back.modules if m.status == "added") == removed


def test_different_bases(tmp_path: Path, base_factors: Factors) -> None:
    d = lora_dir(tmp_path / "a", base_factors, 4, 8)
    ra = publish(d, "x", FP)
    rb = publish(d, "y", FP_OTHER)
    report = deltahub.diff(ra, rb)
    assert report.verdict == "different_base"
    assert report.different_base and "fingerprint" in report.different_base
    # Same fingerprint, different base ids: the fingerprint decides.
    assert deltahub.diff(ra, publish(d, "z", FP, base_model="other/id")).verdict == "identical"
    # dW of another shape means another base even without fingerprints.
    wider = rand_factors({n: (64, 48, 4) for n in SHAPES}, seed=1)
    e = lora_dir(tmp_path / "e", wider, 4, 8)
    report = deltahub.diff(str(d), str(e))
    assert report.verdict == "different_base"
    assert all(m.status == "reshaped" for m in report.modules)


# --------------------------------------------------------------------------- other methods


@pytest.fixture
def generic_method() -> str:
    # Bottleneck adapters and fusion are built elsewhere; a stand-in "method" artifact
    # exercises the method-agnostic path (any config with "method" instead of "peft_type").
    register_config_checker("difftest", lambda config, tensors: None)
    return "difftest"


def generic_dir(path: Path, tensors: dict[str, torch.Tensor], method: str, **config: Any) -> Path:
    return write_dir(path, tensors, {"method": method, **config})


def test_non_lora_per_tensor_and_parents(tmp_path: Path, generic_method: str) -> None:
    g = torch.Generator().manual_seed(7)
    ta = {
        "fusion.query.weight": torch.randn(16, 16, generator=g),
        "fusion.value.weight": torch.eye(16),
        "head.bias": torch.randn(4, generator=g),
    }
    tb = dict(ta)
    tb["fusion.query.weight"] = ta["fusion.query.weight"] + 0.1 * torch.randn(16, 16, generator=g)
    del tb["head.bias"]
    tb["head.weight"] = torch.randn(4, 16, generator=g)

    c1 = publish(generic_dir(tmp_path / "c1", {"w": torch.ones(2)}, generic_method), "c1")
    c1b = publish(generic_dir(tmp_path / "c1b", {"w": torch.zeros(2)}, generic_method), "c1")
    c2 = publish(generic_dir(tmp_path / "c2", {"w": torch.ones(3)}, generic_method), "c2")
    reg = Registry()

    def parents(*refs: str) -> list[Parent]:
        return [Parent(r, reg.resolve(r).digest, "constituent") for r in refs]

    fa = publish(generic_dir(tmp_path / "fa", ta, generic_method, n=2), "f", parents=parents(c1, c2))
    fb = publish(generic_dir(tmp_path / "fb", tb, generic_method, n=3), "f", parents=parents(c1b, c2))
    report = deltahub.diff(fa, fb)
    assert report.verdict == "changed"
    assert report.modules == []
    assert report.tensor_names("changed") == ["fusion.query.weight"]
    assert report.tensor_names("unchanged") == ["fusion.value.weight"]
    assert report.tensor_names("added") == ["head.weight"]
    assert report.tensor_names("removed") == ["head.bias"]
    t = next(t for t in report.tensors if t.status == "changed")
    a, b = ta["fusion.query.weight"].double(), tb["fusion.query.weight"].double()
    assert close(t.relative_change, float((b - a).norm() / a.norm()))
    assert close(t.cosine, float((a * b).sum() / (a.norm() * b.norm())))
    assert [(c.field, c.a, c.b) for c in report.config] == [("n", 2, 3)]
    status = {p.name: p.status for p in report.parents}
    assert status == {"c1": "changed", "c2": "same"}
    # Overall: sqrt(sum ||a - b||^2) / sqrt(sum ||a||^2), added/removed as b - 0 / 0 - a.
    num = (
        float((b - a).norm()) ** 2 + float(ta["head.bias"].norm()) ** 2 + float(tb["head.weight"].norm()) ** 2
    )
    den = sum(float(x.double().norm()) ** 2 for x in ta.values())
    assert close(report.relative_change, math.sqrt(num / den))


def test_fusion_attention_and_constituent_changes(tmp_path: Path, base_factors: Factors) -> None:
    """A real fusion artifact: attention-parameter changes, and which constituent moved."""
    c1 = publish(lora_dir(tmp_path / "c1", base_factors, 4, 8), "c1")
    c1_next = publish(lora_dir(tmp_path / "c1n", rand_factors(SHAPES, seed=8), 4, 8), "c1")
    c2 = publish(lora_dir(tmp_path / "c2", rand_factors(SHAPES, seed=9), 4, 8), "c2")
    reg = Registry()
    g = torch.Generator().manual_seed(11)
    site = "model.layers.0.self_attn.o_proj"
    ta = {
        f"{site}.fusion_query.weight": torch.randn(16, 16, generator=g),
        f"{site}.fusion_query.bias": torch.zeros(16),
        f"{site}.fusion_key.weight": torch.randn(16, 16, generator=g),
        f"{site}.fusion_value.weight": torch.eye(16),
    }
    tb = {**ta, f"{site}.fusion_value.weight": torch.eye(16) + 0.01 * torch.randn(16, 16, generator=g)}

    def fusion(path: Path, tensors: dict[str, torch.Tensor], refs: tuple[str, ...]) -> str:
        config = {"method": "fusion", "adapters": [r.split("@")[0] for r in refs], "temperature": 1.0}
        parents = [Parent(r, reg.resolve(r).digest, "constituent") for r in refs]
        return publish(write_dir(path, tensors, config), "fused", parents=parents)

    fa = fusion(tmp_path / "fa", ta, (c1, c2))
    fb = fusion(tmp_path / "fb", tb, (c1_next, c2))
    report = deltahub.diff(fa, fb)
    assert report.verdict == "changed" and report.modules == []
    assert report.tensor_names("changed") == [f"{site}.fusion_value.weight"]
    t = report.tensors[[x.name for x in report.tensors].index(f"{site}.fusion_value.weight")]
    a, b = ta[f"{site}.fusion_value.weight"].double(), tb[f"{site}.fusion_value.weight"].double()
    assert close(t.relative_change, float((b - a).norm() / a.norm()))
    assert [(p.name, p.status) for p in report.parents] == [("c1", "changed"), ("c2", "same")]
    assert report.parents[0].digest_b == reg.resolve(c1_next).digest
    d = report.to_dict()
    assert d["parents"][0]["status"] == "changed"
    result = CliRunner().invoke(cli, ["diff", fa, fb], catch_exceptions=False)
    assert "parent c1 (constituent) changed" in result.output


def test_non_lora_tolerance(tmp_path: Path, generic_method: str) -> None:
    ta = {"w": torch.ones(8, 8, dtype=torch.float64)}
    tb = {"w": torch.ones(8, 8, dtype=torch.float64) * (1 + 1e-9)}
    ra = publish(generic_dir(tmp_path / "a", ta, generic_method), "g")
    rb = publish(generic_dir(tmp_path / "b", tb, generic_method), "g")
    assert deltahub.diff(ra, rb).verdict == "numerically_identical"
    assert deltahub.diff(ra, rb, tolerance=1e-12).verdict == "changed"


# --------------------------------------------------------------------------- API surface


def test_to_dict_is_strict_json(tmp_path: Path, base_factors: Factors) -> None:
    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    rb = publish(lora_dir(tmp_path / "b", rand_factors(SHAPES, seed=1), 4, 8), "x")
    d = json.loads(json.dumps(deltahub.diff(ra, rb, top=2).to_dict(), allow_nan=False))
    assert d["verdict"] == "changed" and isinstance(d["relative_change"], float)
    assert len(d["modules"]) == 2 and d["modules_total"] == len(SHAPES)
    keys = {"module", "relative_change", "cosine", "subspace_similarity", "norm_a", "norm_b"}
    assert keys | {"effective_rank_a", "effective_rank_b"} <= set(d["modules"][0])
    assert set(d["tensors"]) == {"added", "removed", "changed", "unchanged", "reshaped"}
    assert "digest" in d["manifest"] and d["manifest"]["version"] == {"a": "1", "b": "2"}


def test_top_level_diff_is_the_function_even_after_importing_the_package() -> None:
    import deltahub.diffing as diffing

    assert deltahub.diff is diffing.diff and deltahub.diff.__name__ == "diff"


def test_bad_arguments(tmp_path: Path, base_factors: Factors) -> None:
    from deltahub.errors import InvalidConfig, InvalidRef, NotFound

    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    with pytest.raises(NotFound, match="nope"):
        deltahub.diff(ra, "nope@1")
    with pytest.raises(NotFound, match="no version"):
        deltahub.diff(ra, "x@7")
    with pytest.raises(InvalidRef, match="neither a registry ref"):
        deltahub.diff(ra, str(tmp_path / "missing"))
    with pytest.raises(InvalidConfig, match="tolerance"):
        deltahub.diff(ra, ra, tolerance=-1)
    with pytest.raises(InvalidConfig, match="both base and probe"):
        deltahub.diff(ra, ra, base=str(tmp_path))


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def two_versions(tmp_path: Path, base_factors: Factors) -> tuple[str, str]:
    target = "model.layers.0.self_attn.q_proj"
    changed = {n: ((2 * B if n == target else B), A) for n, (B, A) in base_factors.items()}
    return (
        publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x"),
        publish(lora_dir(tmp_path / "b", changed, 4, 8), "x"),
    )


def test_cli_table(two_versions: tuple[str, str]) -> None:
    result = CliRunner().invoke(cli, ["diff", *two_versions], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("verdict: changed")
    assert "overall relative change" in lines[0]
    assert "model.layers.0.self_attn.q_proj" in result.output
    assert "1 of 6 changed" in result.output
    # Only the changed module gets a table row.
    assert "k_proj" not in result.output
    assert len(lines) < 25


def test_cli_json_and_top(two_versions: tuple[str, str]) -> None:
    result = CliRunner().invoke(cli, ["diff", *two_versions, "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    d = json.loads(result.output)
    assert {"verdict", "relative_change", "modules", "tensors", "manifest"} <= set(d)
    assert d["modules"][0]["module"] == "model.layers.0.self_attn.q_proj"
    assert d["modules"][0]["relative_change"] == pytest.approx(1.0, abs=1e-6)
    assert len(d["modules"]) == 6
    top = CliRunner().invoke(cli, ["diff", *two_versions, "--json", "--top", "2"], catch_exceptions=False)
    assert len(json.loads(top.output)["modules"]) == 2


def test_cli_top_limits_table(tmp_path: Path, base_factors: Factors) -> None:
    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    rb = publish(lora_dir(tmp_path / "b", rand_factors(SHAPES, seed=3), 4, 8), "x")
    result = CliRunner().invoke(cli, ["diff", ra, rb, "--top", "2"], catch_exceptions=False)
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 2
    assert "4 more" in result.output


def test_cli_different_base_comes_first(tmp_path: Path, base_factors: Factors) -> None:
    d = lora_dir(tmp_path / "a", base_factors, 4, 8)
    result = CliRunner().invoke(cli, ["diff", publish(d, "x", FP), publish(d, "y", FP_OTHER)])
    assert result.exit_code == 0
    assert result.output.startswith("DIFFERENT BASE")
    assert "verdict: different_base" in result.output


@pytest.mark.parametrize("bad", ["nope", "x@9", "bad@@ref", "./no/such/dir"])
def test_cli_bad_ref_is_one_line_error(two_versions: tuple[str, str], bad: str) -> None:
    result = CliRunner().invoke(cli, ["diff", two_versions[0], bad])
    assert result.exit_code != 0
    assert result.stdout == ""
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error:"), result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- behavior (--base --probe)

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "adapters", "are", "small", "fast"]
PROBES = ["hello world", "adapters are small", "small fast adapters are hello"]


def save_base(model: Any, path: Path) -> Path:
    """A base directory with a tiny word-level tokenizer beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    model.save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return path


def peft_outputs(make_base: Any, adapter: Path, base_dir: Path) -> list[torch.Tensor]:
    """PEFT's own outputs (logits, else last hidden states) per probe: the oracle."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = PeftModel.from_pretrained(make_base(), str(adapter)).eval()
    outs = []
    with torch.no_grad():
        for text in PROBES:
            batch = tok(text, return_tensors="pt")
            if "token_type_ids" not in model.get_base_model().forward.__code__.co_varnames:
                batch.pop("token_type_ids", None)
            out = model(**batch)
            outs.append((out.logits if hasattr(out, "logits") else out.last_hidden_state)[0].double())
    return outs


def test_behavior_kl_on_causal_lm(tmp_path: Path) -> None:
    from deltahub.compose import load_base
    from tests.helpers import peft_lora_dir, tiny_llama

    base_dir = save_base(tiny_llama(), tmp_path / "base")
    fp = load_base(str(base_dir), device="cpu").deltahub_fingerprint
    a = peft_lora_dir(tmp_path / "a", seed=0, base=tiny_llama())
    b = peft_lora_dir(tmp_path / "b", seed=1, base=tiny_llama())
    probe = tmp_path / "probe.txt"
    probe.write_text("\n".join(PROBES) + "\n\n")
    ra, rb = publish(a, "lm", fp), publish(b, "lm", fp)

    report = deltahub.diff(ra, rb, base=base_dir, probe=probe)
    bh = report.behavior
    assert bh is not None and bh.kind == "kl" and bh.inputs == 3
    la, lb = peft_outputs(tiny_llama, a, base_dir), peft_outputs(tiny_llama, b, base_dir)
    kls, differ, positions = [], 0, 0
    for xa, xb in zip(la, lb, strict=True):
        pa, pb = xa.log_softmax(-1), xb.log_softmax(-1)
        kls.append((pa.exp() * (pa - pb)).sum(-1))
        differ += int((xa.argmax(-1) != xb.argmax(-1)).sum())
        positions += xa.shape[0]
    expected = float(torch.cat(kls).mean())
    assert expected > 1e-4  # the probe really separates the two versions
    assert bh.positions == positions == 2 + 3 + 5
    assert math.isclose(bh.mean_kl, expected, rel_tol=1e-3)
    assert bh.top1_differ == differ

    same = deltahub.diff(ra, ra, base=base_dir, probe=probe).behavior
    assert same is not None and same.mean_kl == 0.0 and same.top1_differ == 0

    result = CliRunner().invoke(cli, ["diff", ra, rb, "--base", str(base_dir), "--probe", str(probe)])
    assert result.exit_code == 0, result.output
    assert "behavior on 3 probe inputs: mean KL" in result.output


def test_behavior_hidden_cosine_on_encoder(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    def bert() -> Any:
        torch.manual_seed(0)
        cfg = BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128
        )
        return BertModel(cfg).eval()

    from tests.helpers import peft_lora_dir

    base_dir = save_base(bert(), tmp_path / "base")
    a = peft_lora_dir(tmp_path / "a", seed=0, base=bert(), target_modules=("query", "value"))
    b = peft_lora_dir(tmp_path / "b", seed=1, base=bert(), target_modules=("query", "value"))
    probe = tmp_path / "probe.txt"
    probe.write_text("\n".join(PROBES))
    bh = deltahub.diff(str(a), str(b), base=base_dir, probe=probe).behavior
    assert bh is not None and bh.kind == "hidden_cosine" and bh.top1_differ is None
    ha, hb = peft_outputs(bert, a, base_dir), peft_outputs(bert, b, base_dir)
    cos = torch.cat(
        [torch.nn.functional.cosine_similarity(x, y, dim=-1) for x, y in zip(ha, hb, strict=True)]
    )
    assert bh.positions == cos.numel()
    assert float(cos.mean()) < 0.9999
    assert math.isclose(bh.mean_cosine, float(cos.mean()), rel_tol=1e-5)


def test_behavior_errors(tmp_path: Path, base_factors: Factors) -> None:
    from deltahub.errors import InvalidConfig

    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(InvalidConfig, match="no inputs"):
        deltahub.diff(ra, ra, base=tmp_path, probe=empty)
    result = CliRunner().invoke(cli, ["diff", ra, ra, "--probe", str(empty)])
    assert result.exit_code != 0 and result.stderr.startswith("Error:")


def test_thread_setting_is_restored(tmp_path: Path, base_factors: Factors) -> None:
    ra = publish(lora_dir(tmp_path / "a", base_factors, 4, 8), "x")
    rb = publish(lora_dir(tmp_path / "b", rand_factors(SHAPES, seed=1), 4, 8), "x")
    torch.set_num_threads(2)
    assert deltahub.diff(ra, rb).verdict == "changed"
    assert torch.get_num_threads() == 2
