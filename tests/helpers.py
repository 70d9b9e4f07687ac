"""Test helpers shared across test modules: tiny models and PEFT LoRA directories."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def peft_lora_dir(
    path: Path,
    seed: int = 0,
    r: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    base=None,
    **lora_kwargs,
) -> Path:
    """Save a PEFT LoRA (random non-zero B, so it changes outputs) on a tiny Llama."""
    from peft import LoraConfig, get_peft_model

    base = base if base is not None else tiny_llama()
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), **lora_kwargs)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(path))
    model.unload()
    return Path(path)
