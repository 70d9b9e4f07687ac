"""Every PEFT option our users' adapters carry, against PEFT itself, both ways.

Each case trains nothing: it gives every trainable tensor of a PEFT model seeded noise
(factors, saved heads, biases, prompt encoders), saves it with PEFT's `save_pretrained`,
and takes PEFT's own `PeftModel.from_pretrained` of that directory as the reference.
deltahub must then publish the directory, load it by name and match the reference
(max abs <= 1e-5, fp32), leave the base bit for bit when deactivated, export it
(`Registry.export`, and `save_adapter` from what it loaded) so that PEFT loads it with
the same outputs, and, where the method merges, give the same outputs merged.

`check_case` is shared with `bench/peft_fidelity_table.py`, which prints the table in
bench/RESULTS.md ("Fidelity against PEFT").
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from deltahub import AdaptedModel, Sum, load_base
from deltahub.errors import DeltahubError, IncompatibleBase, InvalidArtifact, Unsupported
from deltahub.registry import Registry
from tests.compose_helpers import out_of, tiny

TOL = 1e-5
K = 3  # virtual tokens
LABELS = 3


def seq_cls(kind: str, seed: int = 0) -> nn.Module:
    """A tiny, seeded sequence classifier (its head is `classifier` or `score`)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = tf.BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=128, max_position_embeddings=64, num_labels=LABELS,
        )  # fmt: skip
        return tf.BertForSequenceClassification(cfg).eval()
    if kind == "roberta":
        cfg = tf.RobertaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=128, max_position_embeddings=64, num_labels=LABELS, pad_token_id=1,
        )  # fmt: skip
        return tf.RobertaForSequenceClassification(cfg).eval()
    if kind == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, num_labels=LABELS,
            pad_token_id=0, bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return tf.GPT2ForSequenceClassification(cfg).eval()
    cfg = tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, num_labels=LABELS, pad_token_id=0,
    )  # fmt: skip
    return tf.LlamaForSequenceClassification(cfg).eval()


def plain(kind: str) -> nn.Module:
    """The plain tiny base of an architecture (Llama with biases, so `bias=` has some)."""
    if kind == "llama":
        return tiny("llama", attention_bias=True, mlp_bias=True)
    return tiny(kind)


LINEAR = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
}
EMBED = {"bert": "word_embeddings", "gpt2": "wte", "llama": "embed_tokens"}
TASK = {"bert": "FEATURE_EXTRACTION", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}


@dataclasses.dataclass
class Case:
    """One (option, architecture): how to build the base and PEFT's config."""

    option: str
    kind: str
    base: Callable[[str], nn.Module]
    config: Callable[[str], Any]
    save: dict[str, Any] = dataclasses.field(default_factory=dict)
    merge: bool = True  # the method merges (LoRA / IA3)
    virtual: int = 0  # virtual positions PEFT keeps in its outputs (prompt tuning, P-tuning)

    @property
    def id(self) -> str:
        return f"{self.option}-{self.kind}"


def _lora(**kw: Any) -> Callable[[str], Any]:
    def make(kind: str) -> Any:
        from peft import LoraConfig

        opts = dict(kw)
        tm = opts.pop("target_modules", LINEAR[kind])
        if callable(tm):
            tm = tm(kind)
        return LoraConfig(r=4, lora_alpha=8, target_modules=tm, **opts)

    return make


def _ia3_seq_cls(kind: str) -> Any:
    from peft import IA3Config

    ff = {"bert": ["output.dense"], "gpt2": ["mlp.c_proj"], "llama": ["down_proj"]}[kind]
    return IA3Config(task_type="SEQ_CLS", target_modules=LINEAR[kind] + ff, feedforward_modules=ff)


def _prefix_projection(kind: str) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(
        task_type=TASK[kind], num_virtual_tokens=K, prefix_projection=True, encoder_hidden_size=32
    )


def _p_tuning(encoder: str) -> Callable[[str], Any]:
    def make(kind: str) -> Any:
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(
            task_type=TASK[kind],
            num_virtual_tokens=K,
            encoder_hidden_size=32,
            encoder_reparameterization_type=encoder,
        )

    return make


def _prompt_seq_cls(peft_type: str) -> Callable[[str], Any]:
    def make(kind: str) -> Any:
        import peft

        cls = {
            "prompt": peft.PromptTuningConfig,
            "prefix": peft.PrefixTuningConfig,
            "p_tuning": peft.PromptEncoderConfig,
        }[peft_type]
        extra = {"encoder_hidden_size": 32} if peft_type == "p_tuning" else {}
        return cls(task_type="SEQ_CLS", num_virtual_tokens=K, **extra)

    return make


def cases() -> list[Case]:
    out: list[Case] = []
    for kind in ("bert", "gpt2", "llama"):
        out += [
            Case("modules_to_save (SEQ_CLS LoRA)", kind, seq_cls, _lora(task_type="SEQ_CLS")),
            Case("modules_to_save (SEQ_CLS IA3)", kind, seq_cls, _ia3_seq_cls),
            Case("bias=all", kind, plain, _lora(bias="all")),
            Case("bias=lora_only", kind, plain, _lora(bias="lora_only")),
            Case("bias=all + SEQ_CLS head", kind, seq_cls, _lora(task_type="SEQ_CLS", bias="all")),
            Case("bias=lora_only + DoRA", kind, plain, _lora(bias="lora_only", use_dora=True)),
            Case("lora_bias=True", kind, plain, _lora(lora_bias=True)),
            Case(
                "LoRA on embedding",
                kind,
                plain,
                _lora(target_modules=lambda k: [EMBED[k], *LINEAR[k]]),
                merge=kind != "gpt2",  # GPT-2's wte is tied to lm_head: merging is refused
            ),
            Case(
                "LoRA on embedding, save_embedding_layers=True",
                kind,
                plain,
                _lora(target_modules=lambda k: [EMBED[k], *LINEAR[k]]),
                save={"save_embedding_layers": True},
                merge=kind != "gpt2",
            ),
            Case("prefix_projection=True", kind, plain, _prefix_projection, merge=False),
            Case("P_TUNING (MLP)", kind, plain, _p_tuning("MLP"), merge=False, virtual=K),
            Case("P_TUNING (LSTM)", kind, plain, _p_tuning("LSTM"), merge=False, virtual=K),
            *[
                Case(f"modules_to_save (SEQ_CLS {t})", kind, seq_cls, _prompt_seq_cls(t), merge=False)
                for t in ("prompt", "p_tuning")  # PEFT cannot run prefix tuning on a classifier
            ],
        ]
    return out


CASES = cases()


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=g)  # 0 is the classifiers' pad id


def run(model: Any, x: torch.Tensor, virtual: int = 0) -> torch.Tensor:
    with torch.no_grad():
        out = out_of(model(input_ids=x, attention_mask=torch.ones_like(x)))
    return out[:, virtual:] if virtual else out


def peft_save(path: Path, base: nn.Module, config: Any, seed: int = 0, **save: Any) -> nn.Module:
    """A PEFT model on a copy of `base` whose every trainable tensor got seeded noise, saved."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(path), **save)
    return model


def peft_load(base: nn.Module, path: Path) -> nn.Module:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


def check_case(case: Case, tmp: Path) -> dict[str, Any]:
    """Run one case end to end; return its figures (max abs differences), raising on a
    mismatch beyond TOL."""
    base = case.base(case.kind)
    x = ids()
    peft_save(tmp / "peft", base, case.config(case.kind), **case.save)
    ref = run(peft_load(base, tmp / "peft"), x, case.virtual)

    registry = Registry()
    version = registry.publish(tmp / "peft", "case")
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"), registry=registry)
    before = run(model, x)
    name = model.load(version.ref)
    model.activate(name)
    got = run(model, x)
    load_diff = (got - ref).abs().max().item()
    assert got.shape == ref.shape
    assert load_diff <= TOL, f"{case.id}: loaded differs from PEFT by {load_diff}"
    assert (got - before).abs().max().item() > 1e-3, "the adapter changes nothing: a vacuous case"

    registry.export(version.ref, tmp / "exported")
    export_diff = (run(peft_load(base, tmp / "exported"), x, case.virtual) - got).abs().max().item()
    assert export_diff <= TOL, f"{case.id}: exported differs in PEFT by {export_diff}"
    model.save_adapter(name, tmp / "ours")
    ours_diff = (run(peft_load(base, tmp / "ours"), x, case.virtual) - got).abs().max().item()
    assert ours_diff <= TOL, f"{case.id}: save_adapter output differs in PEFT by {ours_diff}"

    model.deactivate()
    assert torch.equal(run(model, x), before), "deactivating must restore the base bit for bit"
    merge_diff = None
    if case.merge:
        model.merge(name)
        merge_diff = (run(model, x) - got).abs().max().item()
        assert merge_diff <= TOL, f"{case.id}: merged differs by {merge_diff}"
        model.unmerge(name)
        assert torch.equal(run(model, x), before), "unmerge must restore the base bit for bit"
    return {"load": load_diff, "export": max(export_diff, ours_diff), "merge": merge_diff}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_artifact_is_exact_both_ways(tmp_path, case):
    check_case(case, tmp_path)


def test_merge_of_an_embedding_lora_tied_to_the_output_layer_is_refused(tmp_path):
    base = plain("gpt2")
    peft_save(tmp_path / "p", base, _lora(target_modules=["wte", "c_attn"])("gpt2"))
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    model.load_path(tmp_path / "p", "a")
    x = ids()
    before = run(model, x)
    with pytest.raises(Unsupported, match="lm_head"):
        model.merge("a")
    assert torch.equal(run(model, x), before)  # nothing half-merged


def test_two_classifiers_swap_route_per_row_and_refuse_sums(tmp_path):
    base = seq_cls("bert")
    peft_save(tmp_path / "a", base, _lora(task_type="SEQ_CLS")("bert"), seed=1)
    peft_save(tmp_path / "b", base, _lora(task_type="SEQ_CLS", target_modules=["key"])("bert"), seed=2)
    x = ids()
    ref_a = run(peft_load(base, tmp_path / "a"), x)
    ref_b = run(peft_load(base, tmp_path / "b"), x)
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    model.load_path(tmp_path / "a", "a")
    model.load_path(tmp_path / "b", "b")
    plain_out = run(model, x)
    for _ in range(2):  # back and forth: each head swaps in with its adapter
        model.activate("a")
        assert (run(model, x) - ref_a).abs().max().item() <= TOL
        model.activate("b")
        assert (run(model, x) - ref_b).abs().max().item() <= TOL
    model.deactivate()
    assert torch.equal(run(model, x), plain_out)
    with torch.no_grad():
        routed = out_of(model(input_ids=x, adapter_names=["a", None, "b"]))
    assert (routed[0] - ref_a[0]).abs().max().item() <= TOL
    assert (routed[1] - plain_out[1]).abs().max().item() <= TOL
    assert (routed[2] - ref_b[2]).abs().max().item() <= TOL
    with pytest.raises(Unsupported, match="Sum over lora"):
        model.activate(Sum("a", "b"))


MADE_HERE = {
    "head+bias+embedding": {
        "target_modules": ["wte", "c_attn"],
        "modules_to_save": ["score"],
        "bias": "all",
        "task_type": "SEQ_CLS",
    },
    "lora_only+lora_bias": {"target_modules": ["c_attn", "c_fc"], "bias": "lora_only", "lora_bias": True},
    "ia3+head": {
        "method": "ia3",
        "target_modules": ["c_attn", "mlp.c_proj"],
        "feedforward_modules": ["mlp.c_proj"],
        "modules_to_save": ["score"],
    },
}


@pytest.mark.parametrize("extra", list(MADE_HERE), ids=list(MADE_HERE))
def test_adapters_made_here_with_heads_biases_and_embeddings_load_in_peft(tmp_path, extra):
    base = seq_cls("gpt2")
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    config = MADE_HERE[extra]
    lora = {"method": "lora", "r": 4, "lora_alpha": 8} if "method" not in config else {}
    model.add_adapter("mine", {**lora, **config})
    adapter = model.get_adapter("mine")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    if config.get("lora_bias"):  # AdapterFusion folds LoRA with no place for a lora_B bias
        assert "fuse" not in adapter.supports
    if "wte" in config["target_modules"]:
        assert any(k.endswith("transformer.wte.lora_embedding_A") for k in adapter.tensors())
    model.activate("mine")
    x = ids()
    ours = run(model, x)
    assert (ours - run(base, x)).abs().max().item() > 1e-3
    out = model.save_adapter("mine", tmp_path / "mine")
    theirs = run(peft_load(base, out), x)
    assert (ours - theirs).abs().max().item() <= TOL


def test_a_target_the_method_cannot_adapt_is_an_error_naming_it():
    model = AdaptedModel(load_base(plain("gpt2"), device="cpu"))
    with pytest.raises(IncompatibleBase, match=r"'transformer\.wte'"):
        model.add_adapter(
            "x", {"method": "ia3", "target_modules": ["wte", "c_attn"], "feedforward_modules": []}
        )
    with pytest.raises(IncompatibleBase, match=r"'transformer\.h\.0\.attn'"):
        model.add_adapter("y", {"method": "lora", "target_modules": ["attn"]})
    assert model.adapters == []


REFUSED = [
    ("use_dora on an embedding", {"use_dora": True, "target_modules": ["wte", "c_attn"]}, {}),
    ("trainable_token_indices", {"trainable_token_indices": [1, 2]}, {}),
]


@pytest.mark.parametrize("option,kw,save", REFUSED, ids=[r[0] for r in REFUSED])
def test_options_we_cannot_run_are_refused_at_publish_naming_them(tmp_path, option, kw, save):
    base = plain("gpt2")
    peft_save(tmp_path / "p", base, _lora(**kw)("gpt2"), **save)
    with pytest.raises(InvalidArtifact) as err:
        Registry().publish(tmp_path / "p", "x")
    word = option.split()[0]
    assert word in str(err.value).replace("DoRA", "use_dora")


def test_unexplained_extra_tensors_are_refused_at_publish(tmp_path):
    from safetensors.torch import load_file, save_file

    base = plain("gpt2")
    peft_save(tmp_path / "p", base, _lora()("gpt2"))
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.transformer.ln_f.bias"] = torch.zeros(64)  # bias="none" saves no bias
    save_file(tensors, str(weights))
    with pytest.raises(InvalidArtifact, match=r"ln_f\.bias"):
        Registry().publish(tmp_path / "p", "x")


def test_a_resized_vocabulary_is_refused_at_load_naming_the_fix(tmp_path):
    base = plain("llama")
    bigger = copy.deepcopy(base)
    bigger.resize_token_embeddings(136)
    peft_save(tmp_path / "p", bigger, _lora(target_modules=["embed_tokens", "q_proj"])("llama"))
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    with pytest.raises(DeltahubError, match="resize"):
        model.load_path(tmp_path / "p", "a", force=True)


def test_rows_routed_to_saved_biases_embeddings_and_heads_equal_each_alone(tmp_path):
    base = seq_cls("llama")
    configs = {
        "bias": _lora(task_type="SEQ_CLS", bias="all"),
        "embed": _lora(task_type="SEQ_CLS", target_modules=["embed_tokens", "q_proj"]),
        "ia3": _ia3_seq_cls,
    }
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    for i, (name, config) in enumerate(configs.items()):
        peft_save(tmp_path / name, base, config("llama"), seed=i)
        model.load_path(tmp_path / name, name)
    x = ids(batch=4)
    names = ["embed", "bias", None, "ia3"]
    with torch.no_grad():
        routed = out_of(model(input_ids=x, adapter_names=names))
    for row, name in enumerate(names):
        if name is None:
            model.deactivate()
        else:
            model.activate(name)
        alone = run(model, x)
        assert (routed[row] - alone[row]).abs().max().item() <= TOL, (row, name)
    model.deactivate()


def test_merged_export_carries_the_saved_head_and_biases(tmp_path):
    import transformers as tf

    from deltahub.compose.export import export_merged

    base = seq_cls("bert")
    base.save_pretrained(str(tmp_path / "base"))
    peft_save(tmp_path / "p", base, _lora(task_type="SEQ_CLS", bias="all")("bert"))
    registry = Registry()
    version = registry.publish(tmp_path / "p", "cls")
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"), registry=registry)
    model.activate(model.load(version.ref))
    x = ids()
    ours = run(model, x)
    out = export_merged(version.ref, tmp_path / "base", tmp_path / "merged", registry=registry, force=True)
    served = tf.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert (run(served, x) - ours).abs().max().item() <= TOL


def test_a_changed_saved_embedding_replaces_the_tied_weight_everywhere_while_active(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny("llama", tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    peft_save(tmp_path / "p", base, _lora(target_modules=["embed_tokens", "q_proj"])("llama"))
    weights = tmp_path / "p" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    g = torch.Generator().manual_seed(9)
    tensors[key] = tensors[key] + 0.1 * torch.randn(tensors[key].shape, generator=g)  # fine-tuned
    save_file(tensors, str(weights))
    x = ids()
    ref = run(peft_load(base, tmp_path / "p"), x)  # PEFT writes it into the shared weight
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    before = run(model, x)
    model.load_path(tmp_path / "p", "a")
    assert {"model.embed_tokens", "lm_head"} <= set(model.get_adapter("a").paths)
    model.activate("a")
    assert (run(model, x) - ref).abs().max().item() <= TOL
    model.deactivate()
    assert torch.equal(run(model, x), before)
    model.save_adapter("a", tmp_path / "ours")
    assert (run(peft_load(base, tmp_path / "ours"), x) - ref).abs().max().item() <= TOL


def test_a_nested_classification_head_is_saved_merged_and_restored(tmp_path):
    # RobertaClassificationHead (dense + out_proj) is saved whole, swapped, merged, restored.
    case = Case("modules_to_save (SEQ_CLS LoRA)", "roberta", seq_cls, _lora(task_type="SEQ_CLS"))
    assert check_case(case, tmp_path)["merge"] is not None


def test_targets_inside_a_saved_head_are_left_to_the_head_as_peft_does(tmp_path):
    base = seq_cls("roberta")  # "dense" also names classifier.dense, inside the saved head
    config = {"target_modules": ["dense", "query"], "modules_to_save": ["classifier"], "task_type": "SEQ_CLS"}
    saved = peft_save(tmp_path / "peft", base, _lora(**config)("roberta"))
    assert not any("classifier" in n and "lora_A" in n for n, _ in saved.named_parameters())
    model = AdaptedModel(load_base(copy.deepcopy(base), device="cpu"))
    model.add_adapter("mine", {"method": "lora", "r": 4, "lora_alpha": 8, **config})
    assert not any(p.startswith("classifier.") for p in model.get_adapter("mine").paths)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.get_adapter("mine").parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.activate("mine")
    x = ids()
    out = model.save_adapter("mine", tmp_path / "mine")
    Registry().publish(out, "mine")  # valid at the door
    assert (run(peft_load(base, out), x) - run(model, x)).abs().max().item() <= TOL
