"""Module-name patterns from artifacts (rank_pattern, alpha_pattern, IA3 feedforward_modules)
match as PEFT matches them, in linear time, and a pattern that cannot be matched safely is
refused at publish naming its rule (issue 14, item 1)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltahub import artifact as af
from deltahub.errors import InvalidArtifact
from deltahub.patterns import MAX_PATTERN_LENGTH, PatternError, check_pattern, fullmatch, key_matches
from deltahub.registry import Registry

ROOT = Path(__file__).resolve().parent.parent


def random_regex(rng: random.Random, depth: int = 0) -> str:
    """A random regex over a small alphabet, using every construct the matcher supports."""
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(["a", "b", ".", r"\.", "[ab]", "[^a]", "[a-c]", r"\d", r"\w", "", "ab"])
    kind = rng.choice(["cat", "cat", "alt", "star", "plus", "opt", "rep", "group", "lazy", "anchor"])
    sub = random_regex(rng, depth + 1)
    if kind == "cat":
        return sub + random_regex(rng, depth + 1)
    if kind == "alt":
        return f"(?:{sub}|{random_regex(rng, depth + 1)})"
    if kind == "star":
        return f"(?:{sub})*"
    if kind == "plus":
        return f"({sub})+"
    if kind == "opt":
        return f"(?:{sub})?"
    if kind == "rep":
        lo = rng.randint(0, 2)
        return f"(?:{sub}){{{lo},{lo + rng.randint(0, 2)}}}"
    if kind == "lazy":
        return f"(?:{sub})*?"
    return rng.choice(["^", "$", r"\b"]) + sub


def test_matches_exactly_what_python_re_matches() -> None:
    rng = random.Random(0)
    names = ["", *("".join(rng.choice("ab.1_") for _ in range(rng.randint(1, 8))) for _ in range(40))]
    checked = 0
    for _ in range(400):
        pattern = random_regex(rng)
        for name in rng.sample(names, 12):
            assert fullmatch(pattern, name) == (re.fullmatch(pattern, name) is not None), (pattern, name)
            peft = re.match(rf"(.*\.)?({pattern})$", name) is not None
            assert key_matches(pattern, name) == peft, (pattern, name)
            checked += 1
    assert checked == 400 * 12


def test_agrees_with_peft_get_pattern_key() -> None:
    from peft.utils.other import get_pattern_key

    keys = [
        "q_proj",
        "self_attn.q_proj",
        "layers.1.self_attn.q_proj",
        r"layers\.0\..*proj",
        "model.layers.0.mlp.down_proj",
        "v_proj|o_proj",
        ".*mlp.*",
        "layers.1",
    ]
    names = [
        f"model.layers.{i}.{m}"
        for i in range(3)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    ] + ["model.layers.0.self_attn.xq_proj", "q_proj", "layers.1"]
    for name in names:
        ours = next((k for k in keys if key_matches(k, name)), name)
        assert ours == get_pattern_key(keys, name), name


def test_catastrophic_patterns_are_linear() -> None:
    # Python's re takes ~2^n steps on these; the NFA takes n * states.
    for pattern in ["(.|.)*Z", "(a*)*b", "(a|aa)+c", "(?:a?){30}a{30}"]:
        assert not fullmatch(pattern, "a" * 500)
        assert not key_matches(pattern, "a." * 250)


@pytest.mark.parametrize(
    "pattern",
    [
        "(a",
        r"(a)\1",
        "(?=a)b",
        "(?<!a)b",
        "(?i)q_proj",
        "(?>a)",
        "a{5000}",
        "x" * (MAX_PATTERN_LENGTH + 1),
        7,
    ],
)
def test_unsafe_or_invalid_patterns_are_refused(pattern: object) -> None:
    with pytest.raises(PatternError):
        check_pattern(pattern)


def lora_dir(path: Path, config: dict, module: str = "model.layers.0.self_attn.q_proj") -> Path:
    tensors = {
        f"base_model.model.{module}.lora_A.weight": torch.zeros(4, 64),
        f"base_model.model.{module}.lora_B.weight": torch.zeros(64, 4),
    }
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    return af.write_dir(path, tensors, {**base, **config})


@pytest.mark.parametrize(
    ("config", "rule"),
    [
        ({"rank_pattern": {"(q_proj": 4}}, "config-pattern"),
        ({"rank_pattern": {r"(q)\1": 4}}, "config-pattern"),
        ({"alpha_pattern": {"(?=q)q_proj": 8}}, "config-pattern"),
        ({"alpha_pattern": {"q" * 600: 8}}, "config-pattern"),
        ({"alpha_pattern": {"q_proj": "eight"}}, "config-schema"),
        ({"rank_pattern": {f"(?:q?){{1000}}x{i}": 4 for i in range(5)}}, "config-pattern"),
        ({"rank_pattern": {"q_proj": 0}}, "config-schema"),
        ({"rank_pattern": {"q_proj": True}}, "config-schema"),
        ({"rank_pattern": ["q_proj"]}, "config-schema"),
    ],
)
def test_lora_patterns_are_checked_at_publish(tmp_path: Path, config: dict, rule: str) -> None:
    with pytest.raises(InvalidArtifact) as e:
        Registry().publish(lora_dir(tmp_path / "a", config), "bad")
    assert e.value.rule == rule
    assert len(str(e.value)) < 400  # the message names the field, not 600 characters of it


def test_ia3_feedforward_regex_is_checked_at_publish(tmp_path: Path) -> None:
    config = {"peft_type": "IA3", "target_modules": ["down_proj"], "feedforward_modules": "(?=x)down_proj"}
    af.write_dir(tmp_path / "ia3", {"base_model.model.m.down_proj.ia3_l": torch.ones(1, 8)}, config)
    with pytest.raises(InvalidArtifact) as e:
        Registry().publish(tmp_path / "ia3", "ia3")
    assert e.value.rule == "config-pattern"


def test_a_catastrophic_rank_pattern_publishes_loads_and_runs(tmp_path: Path) -> None:
    """The issue's `(.|.)*Z` key: with Python's re it hangs publish and every load. Run in a
    subprocess so that a hang is a failure (after 300 s) rather than a stuck suite."""
    module = "model.layers.0.self_attn.q_proj"
    art = lora_dir(
        tmp_path / "art", {"rank_pattern": {"(.|.)*Z": 8}, "alpha_pattern": {"(.|.)*Z": 1}}, module
    )
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
from deltahub.registry import Registry
from deltahub.compose import AdaptedModel
from tests.compose_helpers import tiny, ids
reg = Registry()
reg.publish({str(art)!r}, "evil/pattern")
model = AdaptedModel(tiny("llama"), registry=reg)
name = model.load("evil/pattern")
layer = model.get_adapter(name).layers[0]
model.activate(name)
model(ids())
print(layer.r, layer.scaling)
"""
    env = {**os.environ, "DELTAHUB_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # no key matched, so r and alpha are the config's: scaling = 8 / 4
    assert out.stdout.split() == ["4", "2.0"]
    assert json.loads((art / af.CONFIG_FILE).read_text())["rank_pattern"] == {"(.|.)*Z": 8}
