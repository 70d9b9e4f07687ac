"""Diff two versions of an adapter: verdict, overall change, the modules that moved most.

    python examples/diff.py

Version 2 changes one module's B and doubles another's; the diff finds exactly those,
computed from the LoRA factors without building any d x d matrix.
"""

import os
import tempfile
from pathlib import Path

import torch

import deltahub
from deltahub import AdaptedModel, Registry, load_base
from deltahub.quickstart import build_small_base

work = Path(tempfile.mkdtemp(prefix="deltahub-example-"))
registry = Registry(os.environ.get("DELTAHUB_HOME") or work / "home")
model = AdaptedModel(load_base(build_small_base(work / "base")), registry=registry)
model.add_adapter("demo", {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]})
adapter = dict(model.get_adapter("demo").named_parameters())
with torch.no_grad():
    for name, p in adapter.items():
        if "lora_B" in name:
            p.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
model.save_adapter("demo", work / "v1")
v1 = registry.publish(work / "v1", name="team/demo")

with torch.no_grad():
    b_names = sorted(n for n in adapter if "lora_B" in n)
    adapter[b_names[0]].mul_(2.0)  # one module: B doubled -> relative change exactly 1
    adapter[b_names[1]].add_(0.01)  # another: a small shift
model.save_adapter("demo", work / "v2")
v2 = registry.publish(work / "v2", name="team/demo")

report = deltahub.diff(v1.ref, v2.ref, registry=registry)
print(f"verdict: {report.verdict}, overall relative change {report.relative_change:.4f}")
for m in report.to_dict()["modules"][:3]:
    print(f"  {m['module']:<45} relative change {m['relative_change']:.4f}  cosine {m['cosine']:.4f}")
print("unchanged tensors:", len(report.to_dict()["tensors"]["unchanged"]))
