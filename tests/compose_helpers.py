"""Tiny seeded models and PEFT LoRA directories for the compose tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "value", "dense"],
}


def tiny(kind: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny, seeded, eval-mode model of one architecture."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**cfg, **overrides}))
    elif kind == "qwen2":
        cfg = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
        )
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**cfg, **overrides}))
    elif kind == "gpt2":
        cfg = dict(
            n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**{**cfg, **overrides}))
    elif kind in ("bert", "roberta"):
        cfg = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=128,
            max_position_embeddings=64,
        )
        if kind == "bert":
            model = tf.BertModel(tf.BertConfig(**{**cfg, **overrides}))
        else:
            model = tf.RobertaModel(tf.RobertaConfig(**{**cfg, "pad_token_id": 1, **overrides}))
    elif kind == "bert-cls":
        cfg = dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=128,
            max_position_embeddings=64,
            num_labels=3,
        )
        model = tf.BertForSequenceClassification(tf.BertConfig(**{**cfg, **overrides}))
    else:
        raise ValueError(kind)
    return model.eval()


def out_of(output: Any) -> torch.Tensor:
    """The main output tensor of a transformers output."""
    if hasattr(output, "logits"):
        return output.logits
    return output.last_hidden_state


def ids(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


def peft_dir(
    path: Path, base: nn.Module, target_modules: list[str], seed: int = 0, r: int = 4, **lora_kwargs: Any
) -> tuple[Path, nn.Module]:
    """Save a PEFT LoRA with random non-zero A, B (and magnitude) on a copy of `base`;
    return the directory and the PEFT model (for reference outputs)."""
    from peft import LoraConfig, get_peft_model

    lora_kwargs.setdefault("lora_alpha", 2 * r)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, target_modules=target_modules, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))
    model.eval()
    model.save_pretrained(str(path))
    return Path(path), model


def randomize(adapter: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every parameter of an adapter random values (so it changes outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
