"""Prompt tuning, prefix tuning and P-tuning v2 against PEFT, with generation through the
KV cache checked against cache-free greedy decoding."""

from __future__ import annotations

import pytest
import torch

from deltahub import AdaptedModel, Stack, Sum, load_base
from deltahub.errors import Unsupported
from deltahub.registry import Registry
from tests.compose_helpers import ids, out_of, tiny
from tests.methods_helpers import run, train_steps

K = 3
PEFT_TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}


def _peft(kind, prefix, path):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    cls = PrefixTuningConfig if prefix else PromptTuningConfig
    model = get_peft_model(tiny(kind), cls(task_type=PEFT_TASK[kind], num_virtual_tokens=K)).eval()
    model.save_pretrained(str(path))
    return model


def _peft_out(model, x, mask, prefix):
    with torch.no_grad():
        out = out_of(model(input_ids=x, attention_mask=mask))
    return out if prefix else out[:, K:]  # PEFT keeps the virtual positions of prompt tuning


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("prefix", [False, True], ids=["prompt", "prefix"])
def test_peft_artifacts_load_both_ways_with_same_outputs(tmp_path, kind, prefix):
    from peft import PeftModel

    peft_model = _peft(kind, prefix, tmp_path / "peft")
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # a left-padded row
    ref = _peft_out(peft_model, x, mask, prefix)
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    plain = run(model, x, attention_mask=mask)
    model.load_path(tmp_path / "peft", "a")
    model.activate("a")
    got = run(model, x, attention_mask=mask)
    assert got.shape == plain.shape  # the caller's positions only
    assert (got - ref).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-3
    model.save_adapter("a", tmp_path / "ours")
    back = PeftModel.from_pretrained(tiny(kind), str(tmp_path / "ours")).eval()
    assert (_peft_out(back, x, mask, prefix) - got).abs().max().item() <= 1e-5
    model.deactivate()
    assert torch.equal(run(model, x, attention_mask=mask), plain)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_generate_with_kv_cache_equals_cache_free_greedy_decoding(kind, method):
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    model.add_adapter("a", {"method": method, "num_virtual_tokens": K})
    model.activate("a")
    x = ids(batch=2, length=4)
    with torch.no_grad():
        got = model.generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False
        )
        seq = x
        for _ in range(6):  # full recomputation every step, no cache
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("method", ["prompt", "prefix", "ptuning-v2"])
def test_training_lowers_loss_and_publish_load_by_name_is_exact(tmp_path, kind, method):
    model = AdaptedModel(load_base(tiny(kind), device="cpu"))
    config = {"method": method, "num_virtual_tokens": K}
    if method == "prefix":
        config["prefix_projection"] = True  # Li & Liang's MLP reparameterization while training
    model.add_adapter("a", config)
    x = ids()
    losses = train_steps(model, "a", x, config, steps=10, lr=5e-2)  # fit a teacher prompt's outputs
    assert losses[-1] < 0.8 * losses[0], losses
    ours = run(model, x)
    model.save_adapter("a", tmp_path / "a")
    reg = Registry()
    reg.publish(tmp_path / "a", f"{method}-{kind}")
    other = AdaptedModel(load_base(tiny(kind), device="cpu"), registry=reg)
    other.activate(other.load(f"{method}-{kind}"))
    assert (run(other, x) - ours).abs().max().item() <= 1e-6  # the MLP is dropped: prefixes stored
    assert other.get_adapter(f"{method}-{kind}").config.get("prefix_projection") in (None, False)


def test_text_init_uses_the_token_embeddings_repeated_to_k():
    base = tiny("llama")
    model = AdaptedModel(load_base(base, device="cpu"))
    model.add_adapter("a", {"method": "prompt", "num_virtual_tokens": 5, "init_token_ids": [7, 9]})
    want = base.get_input_embeddings().weight[[7, 9, 7, 9, 7]]
    assert torch.equal(model.get_adapter("a").prompt_embeddings.detach(), want)
    assert model.adapter_config("a")["prompt_tuning_init"] == "TEXT"


def test_soft_prompts_refuse_composition_merge_and_routing():
    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    model.add_adapter("p", {"method": "prompt", "num_virtual_tokens": K})
    model.add_adapter("q", {"method": "prefix", "num_virtual_tokens": K})
    model.add_adapter("l", {"method": "lora", "r": 2, "target_modules": ["q_proj"]})
    for block in (Sum("p", "q"), Stack("l", "p")):
        with pytest.raises(Unsupported, match=r"prompt_tuning|prefix_tuning"):
            model.activate(block)
    with pytest.raises(Unsupported, match="cannot be merged"):
        model.merge("p")
    with pytest.raises(Unsupported, match="routed per row"):
        run(model, ids(), adapter_names=["p", None, "p"])
