"""The hostile corpus (issue 14): every artifact here is refused by `Registry.publish` with
a typed error (`DeltahubError`) whose message names a rule, within 2 s and without
growing traced peak memory by 256 MiB.

It takes test_artifact's malformed corpus whole and adds the hostile inputs that one does
not hold (regex denial of service, invalid patterns, huge numbers, path names, AdapterHub
wrappers, pickle-only directories, shapes the config contradicts). Each case is built in
the test from a good LoRA directory (`make_good`) and one mutation.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from deltahub import artifact as af
from deltahub.errors import DeltahubError
from deltahub.registry import Registry
from deltahub.settings import MAX_NAME_LENGTH
from tests.adapterhub_helpers import FIX
from tests.test_artifact import (
    CORPUS,
    DATA,
    LORA_CONFIG,
    PREFIX,
    config,
    entry,
    make_good,
    manifest,
    raw_safetensors,
    weights,
)

A, B = f"{PREFIX}.lora_A.weight", f"{PREFIX}.lora_B.weight"
LIMIT_S = 2.0
LIMIT_BYTES = 256 << 20
RULE = re.compile(r"\[[a-z0-9][a-z0-9-]*\]")


def one_tensor(name: str, **fields: object) -> Callable[[Path], None]:
    """Weights holding one LoRA A tensor whose header entry is overridden by `fields`."""
    return weights(raw_safetensors({name: entry([4, 16], 0) | fields}, bytes(256)))


def only_files(files: dict[str, bytes]) -> Callable[[Path], None]:
    """Replace the directory's contents with exactly `files`."""

    def mutate(d: Path) -> None:
        for p in d.iterdir():
            p.unlink()
        for name, data in files.items():
            (d / name).write_bytes(data)

    return mutate


def adapterhub(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """An AdapterHub LoRA save (the bert fixture) whose wrapper config `change` edits."""

    def mutate(d: Path) -> None:
        shutil.rmtree(d)
        shutil.copytree(FIX / "bert-lora" / "adapter", d)
        wrapper = json.loads((d / "adapter_config.json").read_text())
        change(wrapper)
        (d / "adapter_config.json").write_text(json.dumps(wrapper))

    return mutate


def ia3(cfg: dict) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        shutil.rmtree(d)
        base = {"peft_type": "IA3", "target_modules": ["down_proj"], "feedforward_modules": ["down_proj"]}
        af.write_dir(d, {"base_model.model.m.down_proj.ia3_l": torch.ones(1, 8)}, base | cfg)

    return mutate


def lora(**changes: object) -> Callable[[Path], None]:
    return config(LORA_CONFIG | changes)


def not_a_directory(d: Path) -> None:
    shutil.rmtree(d)
    d.write_bytes(b"just a file")


def weights_is_a_directory(d: Path) -> None:
    (d / af.WEIGHTS_FILE).unlink()
    (d / af.WEIGHTS_FILE).mkdir()


def huge_config(d: Path) -> None:
    (d / af.CONFIG_FILE).write_text(json.dumps(LORA_CONFIG | {"pad": "x" * (2 << 20)}))


PICKLE = b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00}\x94."
EVIL = "(.|.)*Z"

HOSTILE: dict[str, Callable[[Path], None]] = {
    # safetensors headers
    "header-length-2^64-1": weights(raw_safetensors(b"{}", declared=(1 << 64) - 1)),
    "header-length-zero": weights(raw_safetensors(b"")),
    "header-empty-file": weights(b""),
    "header-9-dims": weights(
        raw_safetensors({A: {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, bytes(4))
    ),
    "header-2^70-dim-nonzero": one_tensor(A, shape=[2**70], data_offsets=[0, 4]),
    "header-2^70-dims-product": one_tensor(A, shape=[2**35, 2**35], data_offsets=[0, 0]),
    "header-shape-bool": one_tensor(A, shape=[True, 16]),
    "header-shape-float": one_tensor(A, shape=[4.0, 16]),
    "header-shape-string": one_tensor(A, shape="4,16"),
    "header-dtype-int": one_tensor(A, dtype=7),
    "header-dtype-null": one_tensor(A, dtype=None),
    "header-dtype-shape-mismatch": one_tensor(A, dtype="F16"),
    "header-offsets-reversed": one_tensor(A, data_offsets=[256, 0]),
    "header-offsets-strings": one_tensor(A, data_offsets=["0", "256"]),
    "header-offsets-three": one_tensor(A, data_offsets=[0, 128, 256]),
    "header-offsets-past-end": one_tensor(A, data_offsets=[1 << 40, (1 << 40) + 256]),
    "header-offsets-negative": one_tensor(A, data_offsets=[-256, 0]),
    "header-entry-is-list": weights(raw_safetensors({A: ["F32", [4, 16], [0, 256]]}, bytes(256))),
    "header-same-range-twice": weights(
        raw_safetensors({A: entry([4, 16], 0), B: entry([16, 4], 0)}, bytes(256))
    ),
    "header-metadata-nested": weights(raw_safetensors({"__metadata__": {"a": {"b": "c"}}})),
    "header-nan-offset": weights(
        raw_safetensors(
            b'{"' + A.encode() + b'": {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, NaN]}}',
            bytes(256),
        )
    ),
    "header-int-10000-digits": weights(
        raw_safetensors(
            b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 10_000 + b'], "data_offsets": [0, 0]}}'
        )
    ),
    "truncated-data": weights(raw_safetensors({A: entry([4, 16], 0), B: entry([16, 4], 256)}, DATA[:300])),
    # tensor names
    "name-slash-component": one_tensor("base_model/model/../x.lora_A.weight"),
    "name-backslash": one_tensor("base_model\\model.lora_A.weight"),
    "name-dotdot-only": one_tensor(".."),
    "name-leading-dot": one_tensor(".hidden.lora_A.weight"),
    "name-empty": one_tensor(""),
    "name-nul-byte": one_tensor("a\x00b.lora_A.weight"),
    "name-too-long": one_tensor("a" * (MAX_NAME_LENGTH + 1) + ".lora_A.weight"),
    "name-unicode-slash": one_tensor("a\u2215b.lora_A.weight"),
    # JSON numbers and nesting
    "config-int-10000-digits": config(json.dumps(LORA_CONFIG)[:-1] + ', "r": 1' + "0" * 10_000 + "}"),
    "config-minus-infinity": config(json.dumps(LORA_CONFIG)[:-1] + ', "lora_alpha": -Infinity}'),
    "config-alpha-1e400": config(json.dumps(LORA_CONFIG)[:-1] + ', "lora_alpha": 1e400}'),
    "config-nested-object-10000": config(
        '{"peft_type": "LORA", "x": ' + '{"a": ' * 10_000 + "1" + "}" * 10_001
    ),
    "config-too-large": huge_config,
    "config-utf16": lambda d: (d / af.CONFIG_FILE).write_bytes(json.dumps(LORA_CONFIG).encode("utf-16")),
    "config-is-pickle": lambda d: (d / af.CONFIG_FILE).write_bytes(PICKLE),
    "manifest-infinity-metric": manifest('{"name": "x", "method": "lora", "metrics": {"acc": Infinity}}'),
    "manifest-nan-in-extra": manifest('{"name": "x", "method": "lora", "extra": {"loss": [1, NaN]}}'),
    "manifest-int-10000-digits": manifest(
        '{"name": "x", "method": "lora", "extra": {"n": 1' + "0" * 10_000 + "}}"
    ),
    "manifest-is-list": manifest("[]"),
    "manifest-version-object": manifest({"name": "x", "method": "lora", "version": {"a": 1}}),
    # patterns: linear time, bounded length, refused when they do not compile
    "rank-pattern-redos-matching": lora(rank_pattern={"(.|.)*q_proj": 8}),
    "alpha-pattern-redos-string-value": lora(alpha_pattern={EVIL: "16"}),
    "rank-pattern-redos-negative": lora(rank_pattern={EVIL: -4}),
    "rank-pattern-nested-star": lora(rank_pattern={"(a*)*b": 8, "q_proj": 2}),
    "rank-pattern-too-long": lora(rank_pattern={EVIL * 100: 4}),
    "rank-pattern-backreference": lora(rank_pattern={r"(q)\1_proj": 4}),
    "rank-pattern-lookahead": lora(rank_pattern={"(?=q)q_proj": 4}),
    "rank-pattern-invalid": lora(rank_pattern={"[q_proj": 4}),
    "rank-pattern-huge-repeat": lora(rank_pattern={"(?:q?){100000}": 4}),
    "alpha-pattern-invalid": lora(alpha_pattern={"q_proj)": 4}),
    "alpha-pattern-null-value": lora(alpha_pattern={"q_proj": None}),
    "ia3-feedforward-lookbehind": ia3({"feedforward_modules": "(?<=m\\.)down_proj"}),
    "ia3-feedforward-invalid": ia3({"feedforward_modules": "(down_proj"}),
    "ia3-feedforward-int": ia3({"feedforward_modules": 5}),
    "ia3-feedforward-not-targeted": ia3({"feedforward_modules": ["up_proj"]}),
    # config values
    "config-r-negative": lora(r=-4),
    "config-r-huge": lora(r=2**62),
    "config-r-bool": lora(r=True),
    "config-alpha-string": lora(lora_alpha="8"),
    "config-target-modules-ints": lora(target_modules=[1, 2]),
    "config-peft-type-wrong": lora(peft_type="LORAX"),
    "config-peft-type-int": lora(peft_type=5),
    "config-peft-type-prefix": lora(peft_type="PREFIX_TUNING"),
    "config-method-traversal": config({"method": "../../evil"}),
    "config-method-empty": config({"method": ""}),
    "config-shape-rank-inconsistent": weights(
        raw_safetensors({A: entry([4, 16], 0), B: entry([16, 8], 256)}, bytes(768))
    ),
    "config-shape-features-inconsistent": weights(
        raw_safetensors({A: entry([4, 16], 0), B: entry([16, 4, 1], 256)}, bytes(512))
    ),
    # files
    "pickle-bin-only": only_files(
        {"adapter_model.bin": PICKLE, af.CONFIG_FILE: json.dumps(LORA_CONFIG).encode()}
    ),
    "pickle-pt-only": only_files({"adapter.pt": PICKLE}),
    "pickle-readme": lambda d: (d / af.README_FILE).write_bytes(PICKLE),
    "empty-directory": only_files({}),
    "not-a-directory": not_a_directory,
    "weights-is-a-directory": weights_is_a_directory,
    # AdapterHub wrappers
    "adapterhub-unknown-config-field": adapterhub(lambda w: w["config"].update(evil=1)),
    "adapterhub-unknown-architecture": adapterhub(lambda w: w["config"].update(architecture="mystery")),
    "adapterhub-unknown-model-type": adapterhub(lambda w: w.update(model_type="evil")),
    "adapterhub-config-not-object": adapterhub(lambda w: w.update(config="lora")),
    "adapterhub-r-negative": adapterhub(lambda w: w["config"].update(r=-1)),
}

CASES = {
    **{f"artifact/{k}": mutate for k, (mutate, _rule) in CORPUS.items()},
    **{f"hostile/{k}": mutate for k, mutate in HOSTILE.items()},
}


def test_corpus_has_at_least_60_hostile_artifacts() -> None:
    assert len(HOSTILE) >= 60
    assert len(CASES) >= 120


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_artifact_is_refused(case: str, tmp_path: Path, deltahub_home: Path) -> None:
    d = make_good(tmp_path / "art")
    CASES[case](d)
    registry = Registry()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(DeltahubError) as err:
            registry.publish(d, name="x/y")
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert RULE.search(message), f"no rule named: {message}"
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s to refuse"
    assert peak < LIMIT_BYTES, f"peak {peak / 2**20:.0f} MiB to refuse"
    assert registry.list(all_versions=True) == []
