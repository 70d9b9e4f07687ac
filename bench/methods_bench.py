"""Every adapter method on one model: trainable parameters, artifact size, forward overhead.

Model: LlamaForCausalLM(hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8000),
random weights, fp32, 2 threads; batch 8 x 128 tokens, inference (no_grad).

    python bench/methods_bench.py [--repeats N]

For each method (LoRA r=8 on all linear layers, Pfeiffer bottleneck (reduction 16),
IA3 (PEFT's default k/v/down targets), BitFit (new biases on all linear layers: Llama
has none), SSF (all linear layers and norms), prompt tuning, prefix tuning and P-tuning
v2 with 20 virtual tokens) the script reports the trainable parameters (training form:
prefix tuning's MLP included) and their share of the base, the artifact's weights file
size, and the forward time over the bare base's. Where PEFT has the method (LoRA, IA3,
prompt, prefix), PEFT's forward with the same weights runs in the same interleaved loop
and the ratio ours / PEFT is reported. Times: median over repeats, rounds interleaved
(one forward of every configuration per round) so machine load hits all alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = {
    "lora": {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    "bottleneck": {"method": "bottleneck", "variant": "pfeiffer", "reduction_factor": 16},
    "ia3": {"method": "ia3"},
    "bitfit": {"method": "bitfit"},
    "ssf": {"method": "ssf"},
    "prompt": {"method": "prompt", "num_virtual_tokens": 20},
    "prefix": {"method": "prefix", "num_virtual_tokens": 20, "prefix_projection": True},
    "ptuning-v2": {"method": "ptuning-v2", "num_virtual_tokens": 20},
}


def base_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=8000, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def peft_model(base: torch.nn.Module, name: str, directory: Path) -> torch.nn.Module | None:
    """PEFT loading our saved artifact (LoRA/IA3/prompt/prefix share PEFT's format)."""
    if name not in ("lora", "ia3", "prompt", "prefix"):
        return None
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from deltahub import AdaptedModel

    base = base_model()
    pristine = copy.deepcopy(base)  # PEFT's copies start from the unpatched base
    n_base = sum(p.numel() for p in base.parameters())
    model = AdaptedModel(base)
    x = torch.randint(0, 8000, (8, 128), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    rows, runs = [], {}
    tmp = Path(tempfile.mkdtemp(prefix="methods-bench-"))
    g = torch.Generator().manual_seed(2)
    for name, config in METHODS.items():
        model.add_adapter(name, config)
        trainable = sum(p.numel() for p in model.adapter_parameters(name))
        with torch.no_grad():  # non-trivial weights, so nothing takes a shortcut
            for p in model.adapter_parameters(name):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        model.get_adapter(name).requires_grad_(False)
        out = model.save_adapter(name, tmp / name)
        size = (out / "adapter_model.safetensors").stat().st_size
        rows.append([name, trainable, size])
        runs[name] = lambda n=name: (model.activate(n), model(input_ids=x, attention_mask=mask))
        peft = peft_model(pristine, name, out)
        if peft is not None:
            runs[f"peft-{name}"] = lambda m=peft: m(input_ids=x, attention_mask=mask)
    runs["base"] = lambda: (model.deactivate(), model(input_ids=x, attention_mask=mask))

    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for k in runs:  # warm-up
            runs[k]()
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"base: {n_base:,} parameters, forward {med['base'] * 1e3:.1f} ms (batch 8 x 128, 2 threads)")
    print(
        "| method | trainable params | share of base | artifact (weights file) | forward / base | forward / PEFT's |"
    )
    print("|---|---|---|---|---|---|")
    for name, trainable, size in rows:
        peft = f"{med[name] / med['peft-' + name]:.3f}x" if f"peft-{name}" in med else "-"
        print(
            f"| {name} | {trainable:,} | {100 * trainable / n_base:.3f}% | {size / 1024:.1f} KiB | "
            f"{med[name] / med['base']:.3f}x | {peft} |"
        )


if __name__ == "__main__":
    main()
