"""Tiny seeded base-model directories (with a word-level tokenizer) and toy task files."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

COLORS = ["red", "blue", "green", "gold"]
ANIMALS = ["cat", "dog", "fox", "owl"]
FILLER = ["the", "a", "saw", "near", "big", "small", "very", "one"]
WORDS = COLORS + ANIMALS + FILLER + ["is", "yes", "no", "says"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        eos_token="[SEP]",
    )  # fmt: skip


def bert_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (bare `BertModel`, like all-MiniLM) and its tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=len(SPECIAL + WORDS), max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertModel(config)
    model.config.architectures = ["BertModel"]
    model.save_pretrained(str(path))
    tokenizer().save_pretrained(str(path))
    return path


def llama_dir(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama causal LM sharing the toy vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(SPECIAL + WORDS), max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(path))
    tokenizer().save_pretrained(str(path))
    return path


def sentence(rng: random.Random, color: str, animal: str) -> str:
    words = [rng.choice(FILLER), color, rng.choice(FILLER), animal, rng.choice(FILLER)]
    return " ".join(words)


def color_task(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Label = the color word in the sentence (string labels)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c, a = rng.choice(COLORS), rng.choice(ANIMALS)
        rows.append({"text": sentence(rng, c, a), "label": c})
    return write_jsonl(path, rows)


def animal_task(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c, a = rng.choice(COLORS), rng.choice(ANIMALS)
        rows.append({"text": sentence(rng, c, a), "label": a})
    return write_jsonl(path, rows)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
