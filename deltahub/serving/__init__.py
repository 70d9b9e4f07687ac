"""Bridges to serving engines: vLLM's resolver plugin, servability per target, conversions.

    rules.py          what vLLM / LoRAX / PEFT refuse, found before serving time (torch-free)
    fetch.py          a ref resolved (local registry or hub) into a digest-keyed directory
    basecheck.py      the served base's fingerprint, from its config alone (meta device)
    vllm_resolver.py  the `vllm.general_plugins` entry point and its `LoRAResolver`
    convert.py        DoRA / IA3 / high-rank LoRA -> plain LoRA by SVD of the exact update
    export.py         `export --target`: a directory the engine loads, or a refusal naming the rule

vLLM and torch are imported only by the functions that need them.
"""

from __future__ import annotations

from deltahub.serving.rules import TARGETS, Finding, Servability, check_servable

__all__ = ["TARGETS", "Finding", "Servability", "check_servable"]
