"""Fidelity against AdapterHub: every fixture case through deltahub, as a Markdown table.

    .venv/bin/python bench/fidelity_table.py                 # import + export round trip
    .venv-adapters/bin/python bench/fidelity_table.py        # + adapters' own load_adapter of the export

For each case of tests/fixtures/adapterhub/cases.json (saved by `adapters` 1.3.0, outputs
computed by it on transformers 4.57): publish into a fresh registry, load on the fixture's
base, run its inputs, and report the max abs difference from `adapters`' output (fp32), or
the rule that refused it at publish. Refused prefix cases also show how far deltahub's
prefix runtime (PEFT's semantics) would be from AdapterHub's had they been let in, and the
Average case how far deltahub's Average is from AdapterHub's. Exported cases are
re-imported ("export -> import") and, where `adapters` is importable, loaded by its
`load_adapter(DIR, use_safetensors=True)` ("export -> adapters").
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import adapterhub_helpers as ah

try:
    import adapters as ahlib
except ImportError:
    ahlib = None


def describe(case: str) -> str:
    c = ah.CASES[case]
    cls = c["config_class"]
    cls = " + ".join(cls) if isinstance(cls, list) else cls
    return {"fusion": f"Fuse({cls})", "average": f"Average({cls})"}.get(c["kind"], cls)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def prefix_as_peft(case: str) -> float:
    """How far deltahub's prefix runtime (PEFT's semantics) is from AdapterHub's output."""
    import json

    import safetensors.torch
    import torch.nn.functional as F

    from deltahub import AdaptedModel, load_base
    from deltahub import artifact as af

    d = ah.adapter_dir(case)
    wrapper = json.loads((d / "adapter_config.json").read_text())
    cfg, name = wrapper["config"], wrapper["name"]
    sd = safetensors.torch.load_file(str(d / "adapter.safetensors"))
    pre = f"prefix_tuning.prefix_tunings.{name}.self_prefix."
    base = ah.base_model(ah.CASES[case]["arch"])
    bc = base.config
    n_layers = bc.num_hidden_layers
    kv = getattr(bc, "num_key_value_heads", None) or bc.num_attention_heads
    hd = bc.hidden_size // bc.num_attention_heads
    k = cfg["prefix_length"]
    if cfg.get("flat"):
        prefixes = sd[pre + "control_trans"].view(k, -1)
    else:
        h = torch.tanh(
            F.linear(
                sd[pre + "wte.weight"], sd[pre + "control_trans.0.weight"], sd[pre + "control_trans.0.bias"]
            )
        )
        prefixes = F.linear(h, sd[pre + "control_trans.2.weight"], sd[pre + "control_trans.2.bias"])
    config = {
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": k, "token_dim": kv * hd, "num_layers": n_layers,
        "num_attention_heads": kv, "num_transformer_submodules": 1, "prefix_projection": False,
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        af.write_dir(tmp, {"prompt_embeddings": prefixes.detach()}, config)
        model = AdaptedModel(load_base(base, device="cpu"))
        model.load_path(tmp, "p")
        got = ah.run(model, case, "p")
    return ah.max_abs(got, ah.io(case)[1]["adapted"])


def average_gap() -> float:
    from deltahub import AdaptedModel, Average, Registry, load_base

    registry = Registry()
    for i, n in enumerate(("a", "b")):
        registry.publish(ah.adapter_dir("bert-average", i), n)
    model = AdaptedModel(load_base(ah.base_model("bert"), device="cpu"), registry=registry)
    model.load("a")
    model.load("b")
    return ah.max_abs(ah.run(model, "bert-average", Average("a", "b")), ah.io("bert-average")[1]["adapted"])


def legacy_gap(case: str, home: Path) -> float | None:
    """How far deltahub's placement_version 1 (before AdapterHub's placements) is, same weights."""
    import json
    import shutil

    from deltahub import AdaptedModel, load_base
    from deltahub.interop.adapterhub import convert_dir

    if ah.CASES[case]["kind"] != "single" or ah.CASES[case]["config_class"] not in (
        "SeqBnConfig",
        "ParBnConfig",
    ):
        return None
    out = convert_dir(ah.adapter_dir(case), home / f"{case}-v1")
    cfg = json.loads((out / "adapter_config.json").read_text())
    for key in ("placement_version", "original_ln_before"):
        cfg.pop(key, None)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    (out / "deltahub.json").unlink()
    model = AdaptedModel(load_base(ah.base_model(ah.CASES[case]["arch"]), device="cpu"))
    model.load_path(out, "v1")
    gap = ah.max_abs(ah.run(model, case, "v1"), ah.io(case)[1]["adapted"])
    shutil.rmtree(out)
    return gap


def export_gaps(case: str, registry: object, tmp: Path) -> tuple[float | None, float | None]:
    from deltahub import AdaptedModel, load_base
    from deltahub.interop.adapterhub_export import export_adapterhub

    if ah.CASES[case]["kind"] != "single":
        return None, None
    out = export_adapterhub(registry, "ah", tmp / case)
    registry.publish(out, "back")  # type: ignore[attr-defined]
    model = AdaptedModel(load_base(ah.base_model(ah.CASES[case]["arch"]), device="cpu"), registry=registry)
    model.load("back")
    want = ah.io(case)[1]["adapted"]
    back = ah.max_abs(ah.run(model, case, "back"), want)
    theirs = None
    if ahlib is not None:
        bare = ah.base_model(ah.CASES[case]["arch"])
        ahlib.init(bare)
        bare.load_adapter(str(out), use_safetensors=True)
        bare.set_active_adapters("ah")
        with torch.no_grad():
            theirs = ah.max_abs(bare(**ah.io(case)[0]).last_hidden_state, want)
    return back, theirs


def main() -> None:
    from deltahub import Registry
    from deltahub.errors import InvalidArtifact

    rows = []
    for case in sorted(ah.CASES):
        c = ah.CASES[case]
        with tempfile.TemporaryDirectory() as home:
            os.environ["DELTAHUB_HOME"] = home
            registry = Registry()
            note = ""
            back = theirs = None
            if c["kind"] == "average":
                result, diff = "not the same composition", average_gap()
                note = "constituents import exactly; AdapterHub's Average divides by N twice"
            else:
                try:
                    got = ah.deltahub_output(registry, case)
                    diff = ah.max_abs(got, ah.io(case)[1]["adapted"])
                    result = "**exact**" if diff <= ah.TOL else "DIFFERS"
                    back, theirs = export_gaps(case, registry, Path(home))
                    v1 = legacy_gap(case, Path(home))
                    if v1 is not None:
                        note = f"placement_version 1 (old deltahub) on the same weights: {v1:.2f} off"
                except InvalidArtifact as e:
                    result, diff = f"refused at publish [{e.rule}]", None
                    if "prefix" in case:
                        diff = prefix_as_peft(case)
                        note = "max abs shown: deltahub's (PEFT) prefix runtime on the same prefixes"
                    elif case == "bert-head":
                        note = "2-layer head on [CLS]; ours is 1 linear layer on mean/last pooling"
                    else:
                        note = "pickle: never opened"
        rows.append((case, c["arch"], describe(case), result, diff, back, theirs, note))
    print(
        "| case | arch | AdapterHub config | deltahub import | max abs | export -> import | export -> adapters | note |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case, arch, what, result, diff, back, theirs, note in rows:
        print(f"| {case} | {arch} | {what} | {result} | {fmt(diff)} | {fmt(back)} | {fmt(theirs)} | {note} |")
    exact = sum(r[3] == "**exact**" for r in rows)
    print(f"\n{exact} of {len(rows)} cases exact (max abs <= {ah.TOL}), tolerance fp32;", end=" ")
    print(
        "`adapters` " + ("loaded every export" if ahlib is not None else "not installed: last column not run")
    )


if __name__ == "__main__":
    main()
