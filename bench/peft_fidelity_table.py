"""The "Fidelity against PEFT" table of bench/RESULTS.md.

For every (PEFT option, architecture) of tests/test_peft_fidelity.py: save the adapter with
PEFT (seeded noise on every trainable tensor), publish the directory, load it by name and
compare with PEFT's own `PeftModel.from_pretrained` of it; export it (and `save_adapter`)
and compare in PEFT again; merge where the method merges. Options deltahub cannot run are
published to show they are refused at the door. Prints markdown rows (max abs, fp32).

    python bench/peft_fidelity_table.py            # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def main() -> None:
    warnings.simplefilter("ignore")
    import peft
    import torch
    import transformers

    from deltahub.errors import DeltahubError
    from deltahub.registry import Registry
    from tests import test_peft_fidelity as t

    torch.set_num_threads(2)
    print(
        f"PEFT {peft.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, fp32\n"
    )
    print("| option | architecture | result | load vs PEFT | export, in PEFT | merged |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for case in t.CASES:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["DELTAHUB_HOME"] = str(Path(tmp) / "home")
            try:
                r = t.check_case(case, Path(tmp))
            except (AssertionError, DeltahubError) as e:
                print(f"| {case.option} | {case.kind} | **FAILS**: {str(e).splitlines()[0][:120]} | | | |")
                continue
        merged = (
            fmt(r["merge"])
            if case.merge
            else "refused (tied to lm_head)"
            if "embedding" in case.option
            else "—"
        )
        worst = max(worst, r["load"], r["export"], r["merge"] or 0.0)
        print(f"| {case.option} | {case.kind} | exact | {fmt(r['load'])} | {fmt(r['export'])} | {merged} |")
    for option, kw, save in t.REFUSED:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["DELTAHUB_HOME"] = str(Path(tmp) / "home")
            t.peft_save(Path(tmp) / "p", t.plain("gpt2"), t._lora(**kw)("gpt2"), **save)
            try:
                Registry().publish(Path(tmp) / "p", "x")
                result = "**published** (should be refused)"
            except DeltahubError as e:
                result = f"refused at publish: `{type(e).__name__}` [{getattr(e, 'rule', '')}]"
        print(f"| {option} | gpt2 | {result} | | | |")
    print(f"\nworst difference over exact rows: {worst:.1e} (tolerance {t.TOL:.0e})")


if __name__ == "__main__":
    main()
