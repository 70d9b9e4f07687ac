"""Artifact validation: a corpus of malformed artifacts, each refused by the rule it breaks."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from deltahub import artifact as af
from deltahub import fileformat
from deltahub.errors import InvalidArtifact
from deltahub.registry import Registry

LORA_CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj"],
    "base_model_name_or_path": "tiny/llama",
}
PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def good_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{PREFIX}.lora_A.weight": torch.randn(4, 16, generator=g),
        f"{PREFIX}.lora_B.weight": torch.randn(16, 4, generator=g),
    }


def make_good(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(good_tensors(), str(path / af.WEIGHTS_FILE))
    (path / af.CONFIG_FILE).write_text(json.dumps(LORA_CONFIG))
    return path


def raw_safetensors(header: dict | bytes, data: bytes = b"", declared: int | None = None) -> bytes:
    """A safetensors file from a raw header (dict -> JSON, or bytes as given)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if declared is None else declared
    return struct.pack("<Q", n) + hb + data


def entry(shape: list[int], start: int, dtype: str = "F32") -> dict:
    size = 4 if dtype == "F32" else 2
    n = 1
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, start + n * size]}


def valid_header() -> dict:
    return {
        f"{PREFIX}.lora_A.weight": entry([4, 16], 0),
        f"{PREFIX}.lora_B.weight": entry([16, 4], 256),
    }


def weights(content: bytes) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / af.WEIGHTS_FILE).write_bytes(content)

    return mutate


def config(cfg: dict | str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / af.CONFIG_FILE).write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))

    return mutate


def manifest(data: dict | str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / af.MANIFEST_FILE).write_text(data if isinstance(data, str) else json.dumps(data))

    return mutate


def truncate_weights(d: Path) -> None:
    data = (d / af.WEIGHTS_FILE).read_bytes()
    (d / af.WEIGHTS_FILE).write_bytes(data[:-10])


def append_bytes(d: Path) -> None:
    with open(d / af.WEIGHTS_FILE, "ab") as f:
        f.write(b"\0" * 8)


def pickle_as_safetensors(d: Path) -> None:
    (d / af.WEIGHTS_FILE).write_bytes(pickle.dumps({"x": [1, 2, 3]}, protocol=4))


def torch_zip_as_safetensors(d: Path) -> None:
    with zipfile.ZipFile(d / af.WEIGHTS_FILE, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")


def extra_pickle_file(d: Path) -> None:
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))


def remove(name: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / name).unlink()

    return mutate


def symlinked_config(d: Path) -> None:
    target = d.parent / "elsewhere.json"
    target.write_text(json.dumps(LORA_CONFIG))
    (d / af.CONFIG_FILE).unlink()
    (d / af.CONFIG_FILE).symlink_to(target)


DATA = bytes(256 + 256)
CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated-safetensors": (truncate_weights, "truncated"),
    "short-file": (weights(b"\x01\x02\x03"), "truncated"),
    "huge-header-length": (weights(raw_safetensors(b"{}", declared=1 << 40)), "header-too-large"),
    "header-2MiB": (weights(raw_safetensors(b" " * (2 << 20))), "header-too-large"),
    "header-longer-than-file": (weights(raw_safetensors(b"{}", declared=5000)), "truncated"),
    "header-not-json": (weights(raw_safetensors(b"{not json")), "header-json"),
    "header-not-utf8": (weights(raw_safetensors(b'{"\xff\xfe": 1}')), "header-json"),
    "header-is-list": (weights(raw_safetensors(b"[1, 2]")), "header-json"),
    "duplicate-keys": (
        weights(
            raw_safetensors(
                (
                    "{"
                    + ", ".join(
                        f'"{PREFIX}.lora_A.weight": {json.dumps(entry([4, 16], 0))}' for _ in range(2)
                    )
                    + "}"
                ).encode(),
                bytes(256),
            )
        ),
        "duplicate-key",
    ),
    "overlapping-offsets": (
        weights(
            raw_safetensors(
                {
                    f"{PREFIX}.lora_A.weight": entry([4, 16], 0),
                    f"{PREFIX}.lora_B.weight": entry([16, 4], 128),
                },
                bytes(384),
            )
        ),
        "overlapping-offsets",
    ),
    "gap-between-tensors": (
        weights(
            raw_safetensors(
                {
                    f"{PREFIX}.lora_A.weight": entry([4, 16], 0),
                    f"{PREFIX}.lora_B.weight": entry([16, 4], 300),
                },
                bytes(556),
            )
        ),
        "offsets-gap",
    ),
    "offsets-disagree-with-shape": (
        weights(
            raw_safetensors(
                {f"{PREFIX}.lora_A.weight": {"dtype": "F32", "shape": [4, 16], "data_offsets": [0, 100]}},
                bytes(100),
            )
        ),
        "offsets",
    ),
    "negative-shape": (
        weights(
            raw_safetensors(
                {f"{PREFIX}.lora_A.weight": {"dtype": "F32", "shape": [-4, 16], "data_offsets": [0, 0]}}
            )
        ),
        "shape",
    ),
    "unknown-dtype": (
        weights(
            raw_safetensors({f"{PREFIX}.lora_A.weight": entry([4, 16], 0) | {"dtype": "Q4"}}, bytes(256))
        ),
        "dtype",
    ),
    "extra-entry-field": (
        weights(raw_safetensors({f"{PREFIX}.lora_A.weight": entry([4, 16], 0) | {"x": 1}}, bytes(256))),
        "header-entry",
    ),
    "bad-metadata": (weights(raw_safetensors({"__metadata__": {"a": 1}})), "header-metadata"),
    "trailing-bytes": (append_bytes, "trailing-bytes"),
    "path-traversal-name": (
        weights(raw_safetensors({"../../etc/passwd": entry([4, 16], 0)}, bytes(256))),
        "unsafe-name",
    ),
    "absolute-path-name": (
        weights(raw_safetensors({"/abs.lora_A.weight": entry([4, 16], 0)}, bytes(256))),
        "unsafe-name",
    ),
    "dotdot-inside-name": (
        weights(raw_safetensors({"a..lora_A.weight": entry([4, 16], 0)}, bytes(256))),
        "unsafe-name",
    ),
    "control-char-name": (
        weights(raw_safetensors({"a\nb.lora_A.weight": entry([4, 16], 0)}, bytes(256))),
        "unsafe-name",
    ),
    "pickle-renamed-safetensors": (pickle_as_safetensors, "pickle-file"),
    "torch-zip-renamed-safetensors": (torch_zip_as_safetensors, "pickle-file"),
    "pickle-bin-beside": (extra_pickle_file, "pickle-file"),
    "rank-mismatch": (config(LORA_CONFIG | {"r": 8}), "shape-mismatch"),
    "rank-pattern-mismatch": (config(LORA_CONFIG | {"rank_pattern": {"q_proj": 2}}), "shape-mismatch"),
    "lora-B-missing": (
        weights(raw_safetensors({f"{PREFIX}.lora_A.weight": entry([4, 16], 0)}, bytes(256))),
        "shape-mismatch",
    ),
    "no-lora-tensors": (
        weights(raw_safetensors({"x.weight": entry([4, 16], 0)}, bytes(256))),
        "config-shape",
    ),
    "config-invalid-json": (config("{r: 4"), "config-json"),
    "config-not-object": (config("[1]"), "config-json"),
    "config-r-string": (config(LORA_CONFIG | {"r": "4"}), "config-schema"),
    "config-r-zero": (config(LORA_CONFIG | {"r": 0}), "config-schema"),
    "config-alpha-missing": (
        config({k: v for k, v in LORA_CONFIG.items() if k != "lora_alpha"}),
        "config-schema",
    ),
    "config-target-modules-int": (config(LORA_CONFIG | {"target_modules": 3}), "config-schema"),
    "config-rslora-string": (config(LORA_CONFIG | {"use_rslora": "yes"}), "config-schema"),
    "config-no-type": (config({"r": 4}), "config-schema"),
    "config-unknown-method": (config({"method": "mystery"}), "unknown-method"),
    "config-duplicate-key": (
        config('{"peft_type": "LORA", "r": 4, "r": 8, "lora_alpha": 8}'),
        "duplicate-key",
    ),
    "config-missing": (remove(af.CONFIG_FILE), "missing-file"),
    "weights-missing": (remove(af.WEIGHTS_FILE), "missing-file"),
    "config-symlink": (symlinked_config, "not-a-file"),
    "manifest-invalid-json": (manifest("{"), "manifest-json"),
    "manifest-unknown-field": (manifest({"name": "x", "method": "lora", "evil": 1}), "manifest-schema"),
    "manifest-method-mismatch": (manifest({"name": "x", "method": "bottleneck"}), "manifest-schema"),
    "manifest-bad-metrics": (
        manifest({"name": "x", "method": "lora", "metrics": {"acc": "high"}}),
        "manifest-schema",
    ),
    "manifest-bad-parent-digest": (
        manifest({"name": "x", "method": "lora", "parents": [{"ref": "a", "digest": "md5:00"}]}),
        "manifest-schema",
    ),
    # The validator is total: inputs that used to escape as untyped exceptions (issue 14).
    "config-nested-100000": (
        config('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "config-json",
    ),
    "config-nested-100": (config(LORA_CONFIG | {"x": json.loads("[" * 100 + "]" * 100)}), "config-json"),
    "config-int-5000-digits": (
        config(json.dumps(LORA_CONFIG)[:-1] + ', "x": 1' + "0" * 5000 + "}"),
        "config-json",
    ),
    "config-nan": (config(json.dumps(LORA_CONFIG | {"lora_alpha": float("nan")})), "config-json"),
    "config-infinity": (config(json.dumps(LORA_CONFIG)[:-1] + ', "lora_alpha": 1e999}'), "config-json"),
    "config-invalid-regex": (config(LORA_CONFIG | {"rank_pattern": {"(q_proj": 4}}), "config-pattern"),
    "config-alpha-pattern-string": (
        config(LORA_CONFIG | {"alpha_pattern": {"q_proj": "16"}}),
        "config-schema",
    ),
    "config-prompt-submodules-object": (
        config({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "num_transformer_submodules": {}}),
        "config-schema",
    ),
    "header-zero-size-2^70-dim": (
        weights(
            raw_safetensors(
                {f"{PREFIX}.lora_A.weight": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}}
            )
        ),
        "shape",
    ),
    "header-nested": (
        weights(raw_safetensors(b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}")),
        "header-json",
    ),
    "header-dtype-list": (
        weights(
            raw_safetensors({f"{PREFIX}.lora_A.weight": entry([4, 16], 0) | {"dtype": ["F32"]}}, bytes(256))
        ),
        "dtype",
    ),
    "header-int-5000-digits": (weights(raw_safetensors(b'{"a": 1' + b"0" * 5000 + b"}")), "header-json"),
    "manifest-nested": (
        manifest('{"name": "x", "method": "lora", "extra": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        "manifest-json",
    ),
    "manifest-nan-metric": (
        manifest('{"name": "x", "method": "lora", "metrics": {"acc": NaN}}'),
        "manifest-json",
    ),
    "manifest-parent-ref-int": (
        manifest({"name": "x", "method": "lora", "parents": [{"ref": 1, "digest": "sha256:" + "0" * 64}]}),
        "manifest-schema",
    ),
    "manifest-created-list": (manifest({"name": "x", "method": "lora", "created": []}), "manifest-schema"),
}


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 25


def test_good_artifact_is_accepted(tmp_path: Path) -> None:
    art = af.load_dir(make_good(tmp_path / "good"))
    assert art.method == "lora"
    assert set(art.tensors) == set(good_tensors())
    assert art.tensors[f"{PREFIX}.lora_A.weight"].shape == (4, 16)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_artifact_is_refused(case: str, tmp_path: Path, deltahub_home: Path) -> None:
    mutate, rule = CORPUS[case]
    d = make_good(tmp_path / case)
    mutate(d)
    with pytest.raises(InvalidArtifact) as err:
        af.load_dir(d)
    assert err.value.rule == rule, str(err.value)
    assert f"[{rule}]" in str(err.value)

    registry = Registry()
    with pytest.raises(InvalidArtifact):
        registry.publish(d, name="bad")
    assert registry.list(all_versions=True) == []
    assert list(registry.store.digests()) == []  # nothing written to the store


def test_peft_directory_with_pickle_weights_only_is_refused(tmp_path: Path) -> None:
    d = make_good(tmp_path / "peft")
    shutil.move(d / af.WEIGHTS_FILE, d / "adapter_model.bin")
    with pytest.raises(InvalidArtifact) as err:
        af.load_dir(d)
    assert err.value.rule == "pickle-file"


def test_header_tensor_count_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileformat, "MAX_TENSORS", 1)
    d = make_good(tmp_path / "many")
    with pytest.raises(InvalidArtifact) as err:
        af.load_dir(d)
    assert err.value.rule == "too-many-tensors"


def test_unknown_files_are_ignored_not_published(tmp_path: Path) -> None:
    d = make_good(tmp_path / "extra")
    (d / "tokenizer.json").write_text("{}")
    art = af.load_dir(d)
    assert set(art.files) == {af.WEIGHTS_FILE, af.CONFIG_FILE}


def test_artifact_digest_is_order_independent_and_content_bound() -> None:
    a = {"x": "sha256:" + "0" * 64, "y": "sha256:" + "1" * 64}
    b = dict(reversed(list(a.items())))
    assert af.artifact_digest(a) == af.artifact_digest(b)
    assert af.artifact_digest(a) != af.artifact_digest({**a, "y": "sha256:" + "2" * 64})


def test_manifest_refuses_non_finite_numbers() -> None:
    for bad in (
        {"metrics": {"acc": float("nan")}},
        {"metrics": {"acc": float("inf")}},
        {"extra": {"loss": [1.0, float("nan")]}},
        {"extra": {"x": object()}},
    ):
        with pytest.raises(InvalidArtifact) as err:
            af.Manifest(name="x", method="lora", **bad)
        assert err.value.rule == "manifest-schema"


NASTY = [
    "null",
    "true",
    "-1",
    "0",
    "1.5",
    "1e300",
    '"x"',
    '""',
    "[]",
    "{}",
    "[1]",
    "[[1]]",
    '{"a": 1}',
    '{"(a": 1}',
    '{"q_proj": "x"}',
    '{"q_proj": [1]}',
    '["(a"]',
    '"(.|.)*Z"',
    "123456789012345678901234567890",
]


def method_examples() -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """A valid artifact of every built-in method (config, tensors)."""
    z = torch.zeros
    fusion_site = {
        "s.fusion_query.weight": z(8, 8),
        "s.fusion_query.bias": z(8),
        "s.fusion_key.weight": z(8, 8),
        "s.fusion_value.weight": z(8, 8),
    }
    return {
        "lora": (
            LORA_CONFIG
            | {"rank_pattern": {"q_proj": 4}, "alpha_pattern": {"q_proj": 8}, "use_rslora": False},
            good_tensors(),
        ),
        "bottleneck": (
            {
                "method": "bottleneck",
                "variant": "pfeiffer",
                "hidden_size": 8,
                "reduction_factor": 4,
                "scaling": 1.0,
            },
            {
                "s.adapter_down.weight": z(2, 8),
                "s.adapter_down.bias": z(2),
                "s.adapter_up.weight": z(8, 2),
                "s.adapter_up.bias": z(8),
            },
        ),
        "ia3": (
            {"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": "k"},
            {"m.k.ia3_l": torch.ones(1, 8)},
        ),
        "bitfit": ({"method": "bitfit", "target_modules": ["k"]}, {"m.k.bitfit_bias": torch.ones(8)}),
        "ssf": (
            {"method": "ssf", "target_modules": ["k"], "include_norms": True},
            {"m.k.ssf_scale": torch.ones(8)},
        ),
        "prompt": (
            {
                "peft_type": "PROMPT_TUNING",
                "num_virtual_tokens": 4,
                "token_dim": 8,
                "num_transformer_submodules": 1,
            },
            {"prompt_embeddings": z(4, 8)},
        ),
        "prefix": (
            {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "token_dim": 8, "num_layers": 2},
            {"prompt_embeddings": z(4, 32)},
        ),
        "fusion": ({"method": "fusion", "adapters": ["a", "b"], "temperature": 1.0}, fusion_site),
    }


@pytest.mark.parametrize("method", sorted(method_examples()))
def test_every_malformed_config_value_is_an_invalid_artifact(method: str, tmp_path: Path) -> None:
    """Each field of a valid config replaced by each value of the wrong kind: the artifact is
    accepted or refused with a named rule, never an untyped exception (a CLI traceback, a
    hub 500)."""
    cfg, tensors = method_examples()[method]
    d = af.write_dir(tmp_path / method, tensors, cfg)
    af.load_dir(d)  # the example itself is valid
    refused = 0
    for field in [*cfg, "unknown_field"]:
        for value in NASTY:
            rest = json.dumps({k: v for k, v in cfg.items() if k != field})
            (d / af.CONFIG_FILE).write_text(f"{rest[:-1]}, {json.dumps(field)}: {value}}}")
            try:
                af.load_dir(d)
            except InvalidArtifact as e:
                assert e.rule and len(str(e)) < 1000
                refused += 1
    assert refused > len(NASTY)  # the sweep did reach the schema
