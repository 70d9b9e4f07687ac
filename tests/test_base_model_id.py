"""`base_model` is a portable id, never a local path: from the base's config (`_name_or_path`
when it is a hub id), a Hugging Face cache path's repository, or nothing; PEFT configs that
deltahub writes carry it as `base_model_name_or_path`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from deltahub import Registry
from deltahub.cli.main import cli
from deltahub.compose.base import base_model_id
from deltahub.manifest import portable_base_id
from deltahub.training import train
from tests import fusion_helpers as fh


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("org/name", "org/name"),
        ("bert-base-uncased", "bert-base-uncased"),
        ("/home/me/models/bert", None),
        ("./bert", None),
        ("~/bert", None),
        ("a/b/c", None),
        ("/x/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/0123abc", "sentence-transformers/all-MiniLM-L6-v2"),
        ("", None),
        (None, None),
    ],
)  # fmt: skip
def test_portable_base_id(value, want) -> None:
    assert portable_base_id(value) == want


def _named(path: Path, name: str | None) -> Path:
    config = json.loads((path / "config.json").read_text())
    config["_name_or_path"] = name
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_training_records_the_config_id_and_never_the_path(tmp_path: Path) -> None:
    data = fh.color_task(tmp_path / "color.jsonl", n=8)
    named = _named(fh.bert_dir(tmp_path / "named"), "acme/tiny-bert")
    anonymous = fh.bert_dir(tmp_path / "anonymous")  # config.json has no _name_or_path
    assert base_model_id(str(named)) == "acme/tiny-bert" and base_model_id(str(anonymous)) is None
    kw = {"r": 2, "target_modules": ["query"], "epochs": 1, "batch_size": 8, "progress": False}
    a = train(str(named), str(data), name="a", **kw).version
    b = train(str(anonymous), str(data), name="b", **kw).version
    assert a.base_model == "acme/tiny-bert"
    assert b.base_model is None or str(tmp_path) not in b.base_model
    shown = CliRunner().invoke(cli, ["show", "b", "--json"]).stdout
    assert str(tmp_path) not in shown  # no local path in what a hub would share
    listed = json.loads(CliRunner().invoke(cli, ["list", "--base-model", "acme/tiny-bert", "--json"]).stdout)
    assert [v["name"] for v in listed] == ["a"]
    out = tmp_path / "export"
    assert CliRunner().invoke(cli, ["export", "a", str(out)]).exit_code == 0
    assert (
        json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny-bert"
    )


def test_a_module_loaded_from_a_directory_gives_that_directory_s_id(tmp_path: Path) -> None:
    from transformers import BertModel

    named = _named(fh.bert_dir(tmp_path / "named"), "acme/tiny-bert")
    module = BertModel.from_pretrained(str(named))  # its config's _name_or_path is now the path
    assert base_model_id(module) == "acme/tiny-bert"


def test_a_peft_config_s_local_path_is_not_recorded(tmp_path: Path) -> None:
    from tests.hub_helpers import lora_dir

    path = lora_dir(tmp_path / "lora")
    config = json.loads((path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/someone/models/llama"
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert Registry().publish(path, "p").base_model is None
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B"
    (path / "adapter_config.json").write_text(json.dumps(config))
    assert Registry().publish(path, "q").base_model == "meta-llama/Llama-3.2-1B"


def test_a_merge_s_peft_config_carries_the_base(tmp_path: Path) -> None:
    from tests.hub_helpers import lora_dir

    registry = Registry()
    for seed, name in ((0, "x"), (1, "y")):
        registry.publish(lora_dir(tmp_path / name, seed=seed), name)
    merged = CliRunner().invoke(cli, ["merge", "x", "y", "--method", "cat", "--name", "xy"])
    assert merged.exit_code == 0, merged.output
    out = tmp_path / "xy-out"
    CliRunner().invoke(cli, ["export", "xy", str(out)])
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-llama"
