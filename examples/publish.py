"""Publish an adapter: make a LoRA, publish two versions, tag one, list, search, export.

    python examples/publish.py

Runs offline in a few seconds: the base is a small BERT built from a config (no
download). Set DELTAHUB_HOME to keep the registry; by default it goes to a temp dir.
"""

import os
import tempfile
from pathlib import Path

import torch

from deltahub import AdaptedModel, Registry, load_base
from deltahub.quickstart import build_small_base

work = Path(tempfile.mkdtemp(prefix="deltahub-example-"))
registry = Registry(os.environ.get("DELTAHUB_HOME") or work / "home")
base_dir = build_small_base(work / "base")

# A LoRA on the attention projections; give B random values so it changes outputs.
model = AdaptedModel(load_base(base_dir), registry=registry)
model.add_adapter("demo", {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]})
for version in (1, 2):
    with torch.no_grad():
        for name, p in model.get_adapter("demo").named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02 * version)
    model.save_adapter("demo", work / f"demo-v{version}")  # adapter_model.safetensors + adapter_config.json
    v = registry.publish(
        work / f"demo-v{version}",
        name="team/demo",
        task="embedding",
        description="an example LoRA on query and value",
        metrics={"score": 0.5 + 0.1 * version},
    )
    print(f"published {v.ref} {v.digest}")

registry.tag("team/demo@1", "prod")
print("prod ->", registry.resolve("team/demo@prod").ref)
print("latest ->", registry.resolve("team/demo").ref)
print("search 'query':", [v.ref for v in registry.search("query")])
out = registry.export("team/demo@prod", work / "exported")
print("exported:", sorted(p.name for p in out.iterdir()))
assert registry.verify().ok
