"""Servability per target, `deltahub check`, `export --target [--convert]`, and the conversion's math.

The conversion is checked against PEFT (an independent implementation of DoRA and IA3):
at full rank the converted LoRA reproduces the original adapter's outputs to 1e-5 (the
update is exactly representable: rank >= min(d_out, d_in)); below it, the error the
export reports equals the one measured here from PEFT's merged weights and logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from deltahub import artifact as af
from deltahub.cli.main import cli
from deltahub.errors import Unsupported
from deltahub.registry import Registry
from deltahub.serving.convert import probe_ids
from deltahub.serving.export import export_for_target
from deltahub.serving.rules import check_servable
from tests.compose_helpers import peft_dir, tiny
from tests.hub_helpers import lora_dir

TOL = 1e-5


def _artifact(config: dict[str, Any], tensors: dict[str, tuple[int, ...]] | None = None) -> af.Artifact:
    """An artifact of shapes only (the rules read names and config, never values)."""
    from deltahub.fileformat import TensorInfo

    r = config.get("r", 4)
    shapes = tensors or {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (r, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (64, r),
    }
    infos = {k: TensorInfo(k, "F32", tuple(v), (0, 0)) for k, v in shapes.items()}
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    return af.Artifact(files={}, config=cfg, tensors=infos)


def _q(r: int) -> dict[str, tuple[int, ...]]:
    return {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (r, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (64, r),
    }


def _rules(report: Any) -> list[str]:
    return [f.rule for f in report.refusals]


def test_vllm_rules_each_refusal_names_its_rule() -> None:
    assert check_servable(_artifact({}), "vllm").ok
    assert _rules(check_servable(_artifact({"use_dora": True}), "vllm")) == ["dora"]
    assert _rules(check_servable(_artifact({"modules_to_save": ["score"]}), "vllm")) == ["modules-to-save"]
    assert _rules(check_servable(_artifact({"bias": "all"}), "vllm")) == ["bias"]
    assert _rules(check_servable(_artifact({"lora_bias": True}), "vllm")) == ["bias"]
    big = check_servable(_artifact({"r": 600}), "vllm")
    assert _rules(big) == ["rank"] and big.convertible
    assert "512" in big.refusals[0].message
    # A rank within the set: loads, given the flag; the note says which.
    r20 = check_servable(_artifact({"r": 20}), "vllm")
    assert r20.ok and r20.summary() == "yes (--max-lora-rank 32)"
    # rank_pattern: the largest rank decides the flag; a note says older vLLM ignores the pattern.
    patterned = check_servable(_artifact({"r": 4, "rank_pattern": {"q_proj": 40}}, _q(40)), "vllm")
    assert patterned.ok and patterned.summary() == "yes (--max-lora-rank 64)"
    assert "per-module-rank" in [n.rule for n in patterned.notes]
    # Modules vLLM does not adapt in a Llama-style decoder; GPT-2 has no LoRA in vLLM.
    odd = {
        "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": (4, 64),
        "base_model.model.model.layers.0.self_attn.rotary.lora_B.weight": (64, 4),
    }
    assert _rules(check_servable(_artifact({}, odd), "vllm")) == ["target-modules"]
    gpt2 = {
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (4, 64),
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": (192, 4),
    }
    assert _rules(check_servable(_artifact({}, gpt2), "vllm")) == ["architecture"]
    emb = {
        "base_model.model.model.embed_tokens.lora_embedding_A": (4, 128),
        "base_model.model.model.embed_tokens.lora_embedding_B": (64, 4),
    }
    assert "target-modules" in _rules(check_servable(_artifact({}, emb), "vllm"))
    # Every refusal at once, in one report.
    many = check_servable(_artifact({"use_dora": True, "bias": "all", "r": 600}), "vllm")
    assert set(_rules(many)) == {"dora", "bias", "rank"} and not many.convertible


def test_lorax_and_peft_targets() -> None:
    assert check_servable(_artifact({"r": 600}), "lorax").ok  # no rank set in LoRAX
    assert _rules(check_servable(_artifact({"use_dora": True}), "lorax")) == ["dora"]
    assert check_servable(_artifact({"use_dora": True}), "peft").ok
    bottleneck = af.Artifact(files={}, config={"method": "bottleneck"}, tensors={})
    assert _rules(check_servable(bottleneck, "peft")) == ["method"]
    assert _rules(check_servable(bottleneck, "vllm")) == ["method"]


def test_base_mismatch_by_name() -> None:
    art = _artifact({"base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    assert check_servable(art, "vllm", served_base="meta-llama/Llama-3.2-1B").ok
    bad = check_servable(art, "vllm", served_base="Qwen/Qwen2-0.5B")
    assert _rules(bad) == ["base-mismatch"] and "meta-llama/Llama-3.2-1B" in bad.refusals[0].message


# --------------------------------------------------------------------------- CLI


def _dora_published(tmp_path: Path, base: torch.nn.Module, **kw: Any) -> tuple[Registry, Any]:
    d, peft_model = peft_dir(tmp_path / "dora-src", base, ["q_proj", "v_proj", "down_proj"], r=4, **kw)
    reg = Registry()
    reg.publish(d, "team/dora", base_model="tiny-llama")
    return reg, peft_model


def test_check_and_show_on_the_command_line(tmp_path: Path) -> None:
    runner = CliRunner()
    reg = Registry()
    reg.publish(lora_dir(tmp_path / "ok", seed=1), "team/ok")
    _dora_published(tmp_path, tiny("llama"), use_dora=True)
    ok = runner.invoke(cli, ["check", "team/ok", "--target", "vllm"])
    assert ok.exit_code == 0, ok.output
    assert "yes (--max-lora-rank 8)" in ok.output
    bad = runner.invoke(cli, ["check", "team/dora", "--target", "vllm"])
    assert bad.exit_code == 1 and "refused  dora" in bad.output and "export --convert fixes it" in bad.output
    js = json.loads(runner.invoke(cli, ["check", "team/dora", "--json"]).output)
    assert js["servable"] is False and js["refusals"][0]["rule"] == "dora" and js["convertible"]
    assert runner.invoke(cli, ["check", "team/dora", "--target", "peft"]).exit_code == 0
    mismatch = runner.invoke(cli, ["check", "team/ok", "--base", "other/model"])
    assert mismatch.exit_code == 1 and "base-mismatch" in mismatch.output
    shown = runner.invoke(cli, ["show", "team/dora"])
    assert shown.exit_code == 0 and "servable on vllm  no: dora" in shown.output


def test_export_target_vllm_refuses_then_converts(tmp_path: Path) -> None:
    runner = CliRunner()
    base = tiny("llama")
    base.save_pretrained(tmp_path / "base")  # safetensors
    reg = Registry()
    reg.publish(lora_dir(tmp_path / "ok", seed=1), "team/ok")
    _dora_published(tmp_path, base, use_dora=True)
    plain = runner.invoke(cli, ["export", "team/ok", str(tmp_path / "ok-out"), "--target", "vllm"])
    assert plain.exit_code == 0, plain.output
    v = reg.resolve("team/ok")
    assert {f: (tmp_path / "ok-out" / f).read_bytes() for f in v.files} == {
        f: reg.store.path(d).read_bytes() for f, d in v.files.items()
    }
    refused = runner.invoke(cli, ["export", "team/dora", str(tmp_path / "no"), "--target", "vllm"])
    assert refused.exit_code == Unsupported.exit_code
    assert "dora: vllm does not run DoRA" in refused.output and not (tmp_path / "no").exists()
    args = ["export", "team/dora", str(tmp_path / "conv"), "--target", "vllm", "--convert"]
    assert runner.invoke(cli, args).exit_code != 0  # no --base
    done = runner.invoke(cli, [*args, "--base", str(tmp_path / "base"), "--rank", "64"])
    assert done.exit_code == 0, done.output
    assert "rank-64 LoRA (dora converted)" in done.output and ": exact" in done.output
    conv = af.load_dir(tmp_path / "conv")
    assert check_servable(conv, "vllm").ok
    assert conv.manifest is not None and conv.manifest.parents[0].digest == reg.resolve("team/dora").digest
    assert conv.manifest.extra["conversion"]["rank"] == 64


# --------------------------------------------------------------------------- the math


def _peft_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _peft_load(base: torch.nn.Module, path: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def test_dora_at_full_rank_reproduces_the_dora_model(tmp_path: Path) -> None:
    base = tiny("llama")
    _reg, dora_model = _dora_published(tmp_path, base, use_dora=True)
    ids = probe_ids(base, batch=3, length=12, seed=7)
    # 64 >= min(d_out, d_in) of every adapted layer (64x64 q, 32x64 v, 64x128 down): exact.
    result = export_for_target(
        "team/dora", tmp_path / "full", "vllm", convert=True, rank=64, base=copy.deepcopy(base), probe=ids
    )
    conv = result["conversion"]
    assert conv["exact"] and conv["max_module_rel_error"] < 1e-6
    want = _peft_logits(dora_model, ids)
    got = _peft_logits(_peft_load(base, tmp_path / "full"), ids)  # PEFT loads the exported directory
    assert (got - want).abs().max().item() <= TOL
    assert conv["logits_max_abs"] <= TOL and conv["logits_rel_error"] <= TOL


def test_truncated_rank_reports_the_error_it_introduced(tmp_path: Path) -> None:
    from peft import PeftModel

    base = tiny("llama")
    _reg, dora_model = _dora_published(tmp_path, base, use_dora=True)
    ids = probe_ids(base, batch=3, length=12, seed=8)
    conv = export_for_target(
        "team/dora", tmp_path / "r2", "vllm", convert=True, rank=2, base=copy.deepcopy(base), probe=ids
    )["conversion"]
    assert not conv["exact"]
    # Independently: PEFT merges DoRA into W'; ΔW = W' - W; B A from the exported file.
    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "dora-src")).merge_and_unload()
    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / "r2" / af.WEIGHTS_FILE))
    for module, reported in conv["module_rel_errors"].items():
        delta = (merged.get_submodule(module).weight - base.get_submodule(module).weight).double()
        key = f"base_model.model.{module}"
        ba = lora[f"{key}.lora_B.weight"].double() @ lora[f"{key}.lora_A.weight"].double()
        measured = ((delta - ba).norm() / delta.norm()).item()
        assert reported == pytest.approx(measured, abs=1e-4), module
        assert 0.05 < reported < 1
    want = _peft_logits(dora_model, ids)
    got = _peft_logits(_peft_load(base, tmp_path / "r2"), ids)
    measured = ((got - want).norm() / want.norm()).item()
    assert conv["logits_rel_error"] == pytest.approx(measured, abs=1e-4)
    assert conv["logits_max_abs"] == pytest.approx((got - want).abs().max().item(), abs=1e-4)


def test_ia3_converts_exactly_at_full_rank(tmp_path: Path) -> None:
    from peft import IA3Config, get_peft_model

    base = tiny("llama")
    model = get_peft_model(
        copy.deepcopy(base),
        IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    model.eval().save_pretrained(str(tmp_path / "ia3"))
    Registry().publish(tmp_path / "ia3", "team/ia3", base_model="tiny-llama")
    assert check_servable(Registry().open(Registry().resolve("team/ia3")), "vllm").convertible
    ids = probe_ids(base, seed=9)
    conv = export_for_target(
        "team/ia3", tmp_path / "out", "vllm", convert=True, rank=64, base=copy.deepcopy(base), probe=ids
    )["conversion"]
    assert conv["source"] == "ia3" and conv["exact"]
    got = _peft_logits(_peft_load(base, tmp_path / "out"), ids)
    assert (got - _peft_logits(model, ids)).abs().max().item() <= TOL


def test_gpt2_conv1d_dora_converts_for_peft(tmp_path: Path) -> None:
    base = tiny("gpt2")
    d, dora_model = peft_dir(tmp_path / "g", base, ["c_attn", "c_fc"], r=4, use_dora=True)
    Registry().publish(d, "team/g")
    ids = probe_ids(base, seed=2)
    conv = export_for_target(
        "team/g", tmp_path / "out", "peft", convert=True, rank=64, base=copy.deepcopy(base), probe=ids
    )["conversion"]
    assert conv["exact"]
    assert json.loads((tmp_path / "out" / af.CONFIG_FILE).read_text())["fan_in_fan_out"] is True
    got = _peft_logits(_peft_load(base, tmp_path / "out"), ids)
    assert (got - _peft_logits(dora_model, ids)).abs().max().item() <= TOL
    # vLLM has no LoRA for GPT-2: converting does not change that, and it says so.
    with pytest.raises(Unsupported, match="architecture"):
        export_for_target("team/g", tmp_path / "v", "vllm", convert=True, rank=8, base=base)


def test_ia3_output_scaling_over_a_bias_is_refused(tmp_path: Path) -> None:
    from peft import IA3Config, get_peft_model

    base = tiny("gpt2")  # c_attn has a bias, which IA3's output scaling also scales
    model = get_peft_model(copy.deepcopy(base), IA3Config(target_modules=["c_attn"], feedforward_modules=[]))
    model.save_pretrained(str(tmp_path / "ia3"))
    Registry().publish(tmp_path / "ia3", "team/ia3g")
    with pytest.raises(Unsupported, match=r"IA3 scales the output of transformer\.h\.0\.attn\.c_attn, bias"):
        export_for_target("team/ia3g", tmp_path / "o", "peft", convert=True, rank=8, base=base)
    assert not (tmp_path / "o").exists()


def test_a_merge_result_is_re_ranked_with_the_error_of_the_dense_update(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from deltahub.compose import merge_adapters

    reg = Registry()
    reg.publish(lora_dir(tmp_path / "a", seed=1), "team/a")
    reg.publish(lora_dir(tmp_path / "b", seed=2), "team/b")
    merged = merge_adapters(["team/a", "team/b"], "linear", name="team/ab", registry=reg)  # rank 8 (cat)
    src = load_file(str(reg.open(merged).weights_path))
    config = reg.open(merged).config
    base = tiny("llama")
    conv = export_for_target(
        "team/ab", tmp_path / "r3", "vllm", convert=True, rank=3, base=copy.deepcopy(base)
    )["conversion"]
    out = load_file(str(tmp_path / "r3" / af.WEIGHTS_FILE))
    for module, reported in conv["module_rel_errors"].items():
        key = f"base_model.model.{module}"
        r = src[f"{key}.lora_A.weight"].shape[0]
        scale = config["lora_alpha"] / r
        dense = scale * src[f"{key}.lora_B.weight"].double() @ src[f"{key}.lora_A.weight"].double()
        ba = out[f"{key}.lora_B.weight"].double() @ out[f"{key}.lora_A.weight"].double()
        assert reported == pytest.approx(((dense - ba).norm() / dense.norm()).item(), abs=1e-6)
        assert reported > 0.01  # rank 3 < 8: truncated
    exact = export_for_target(
        "team/ab", tmp_path / "r8", "vllm", convert=True, rank=8, base=copy.deepcopy(base)
    )["conversion"]
    assert exact["exact"] and exact["logits_max_abs"] <= TOL
