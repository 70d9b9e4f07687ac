"""Pull adapters from a team hub and activate them by name: alone, summed, per row.

    python examples/pull_and_activate.py

A hub server runs in this process on 127.0.0.1 (as `deltahub serve` would) over a
"team" registry; a "laptop" registry pulls from it with a read token.
"""

import tempfile
from pathlib import Path

import torch

from deltahub import AdaptedModel, Registry, Sum, load_base
from deltahub.hub import HubClient, ServerThread, TokenStore, pull
from deltahub.quickstart import build_small_base

work = Path(tempfile.mkdtemp(prefix="deltahub-example-"))
base_dir = build_small_base(work / "base")
team = Registry(work / "team")

# The team publishes two LoRAs.
maker = AdaptedModel(load_base(base_dir), registry=team)
for i, name in enumerate(("team/alpha", "team/beta")):
    maker.add_adapter(name, {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})
    with torch.no_grad():
        for pname, p in maker.get_adapter(name).named_parameters():
            if "lora_B" in pname:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(i))
    maker.save_adapter(name, work / name.replace("/", "-"))
    team.publish(work / name.replace("/", "-"), name=name)

token, _ = TokenStore(work / "team").create("read", description="example")
with ServerThread(work / "team") as server:
    laptop = Registry(work / "laptop")
    client = HubClient(server.url, token)
    for ref in ("team/alpha", "team/beta"):
        v = pull(ref, client, laptop)
        print(f"pulled {v.ref} {v.digest[:19]}")
    client.close()

model = AdaptedModel(load_base(base_dir), registry=laptop)
alpha, beta = model.load("team/alpha"), model.load("team/beta")
ids = torch.randint(5, 50, (4, 7), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    bare = model(input_ids=ids).last_hidden_state
    model.activate(alpha)
    out_alpha = model(input_ids=ids).last_hidden_state
    model.activate(Sum(alpha, beta, weights=[1.0, 0.5]))
    out_sum = model(input_ids=ids).last_hidden_state
    model.deactivate()
    routed = model(input_ids=ids, adapter_names=[alpha, beta, None, alpha]).last_hidden_state
print(f"alpha changes the output by {float((out_alpha - bare).abs().max()):.4f}")
print(f"Sum(alpha, 0.5 beta) changes it by {float((out_sum - bare).abs().max()):.4f}")
print("per-row routing, row 0 equals alpha alone:", torch.allclose(routed[0], out_alpha[0], atol=1e-5))
print("per-row routing, row 2 (None) equals the base:", torch.allclose(routed[2], bare[2], atol=1e-5))
