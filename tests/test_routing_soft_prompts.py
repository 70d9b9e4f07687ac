"""Per-row routing while a soft prompt is active: the prompt must not reach routed rows."""

from __future__ import annotations

import pytest
import torch

from deltahub import AdaptedModel, load_base
from tests.compose_helpers import ids, tiny
from tests.methods_helpers import perturb, run


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_active_soft_prompt_does_not_leak_into_routed_rows(method: str) -> None:
    model = AdaptedModel(load_base(tiny("llama"), device="cpu"))
    model.add_adapter("p", {"method": method, "num_virtual_tokens": 3})
    model.add_adapter("l", {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]})
    perturb(model.get_adapter("l"), seed=3)
    x = ids(batch=3)

    base_out = run(model, x)  # nothing active yet
    model.activate("l")
    lora_out = run(model, x)
    model.activate("p")
    prompt_out = run(model, x)
    assert (prompt_out - base_out).abs().max() > 1e-3  # the prompt changes the outputs

    routed = run(model, x, adapter_names=["l", None, "l"])
    torch.testing.assert_close(routed[[0, 2]], lora_out[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(routed[1], base_out[1], rtol=0, atol=1e-5)
    # and the prompt is back once the routed call returns
    torch.testing.assert_close(run(model, x), prompt_out, rtol=0, atol=1e-6)
