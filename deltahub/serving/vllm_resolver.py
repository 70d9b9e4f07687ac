"""vLLM's LoRA resolver plugin: request a deltahub ref as the model, get that exact version.

vLLM (with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=true` and this plugin in `VLLM_PLUGINS`)
asks every registered `LoRAResolver` about a model name it does not know. This one takes
the name as a deltahub ref (`team/sentiment@prod`, `team/sentiment@3`,
`team/sentiment@sha256:...`), resolves it (`deltahub.serving.fetch`: the hub in
`$DELTAHUB_REMOTE`, else the local registry in `$DELTAHUB_HOME`), writes the version
verified into a directory named by its digest, checks it against vLLM's rules and the
served base (`deltahub.serving.rules`), and answers a `LoRARequest` with

    lora_name    "<name>@sha256:<64 hex>"   the digest, so two versions never share a name
    lora_int_id  the digest's first 31 bits (never 0): stable across restarts, fits int32
    lora_path    the digest-keyed directory

A name that is not a deltahub ref, or not in the registry, gets None (the next resolver is
asked). An adapter vLLM cannot serve raises `ServingRefused` naming every rule it breaks,
so the client sees why instead of "does not exist".

The interface followed is vLLM's published one (v0.11 - v0.26): `vllm.lora.resolver.LoRAResolver`
(`async resolve_lora(base_model_name, lora_name) -> LoRARequest | None`),
`LoRAResolverRegistry.register_resolver(name, resolver)` and `vllm.lora.request.LoRARequest`
(`lora_name`, `lora_int_id`, `lora_path`, `base_model_name`). vLLM is imported only inside
`register()` and `resolver_class()`, never when deltahub is.

Caveat: vLLM remembers a resolved adapter under the name that was requested, so a request
for a tag keeps the version the tag named the first time; request the digest to pin a
version, or unload the name (`/v1/unload_lora_adapter`) after moving the tag.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from pathlib import Path
from typing import Any

from deltahub.errors import DeltahubError, InvalidRef, NotFound

log = logging.getLogger("deltahub.serving.vllm")

RESOLVER_NAME = "deltahub"
# The model id the served base stands for, when vLLM serves it from a path or under
# --served-model-name (the name vLLM passes to resolvers).
SERVED_BASE_ENV = "DELTAHUB_VLLM_BASE"


class ServingRefused(DeltahubError, ValueError):
    """The adapter breaks a rule of the serving engine (the message names each one)."""

    exit_code = 8


def lora_int_id(digest: str) -> int:
    """vLLM's integer id of a version: the digest's first 31 bits, 0 mapped to 1 (ids must be > 0)."""
    return (int(digest.split(":", 1)[1][:8], 16) & 0x7FFFFFFF) or 1


def lora_name(full_name: str, digest: str) -> str:
    return f"{full_name}@{digest}"


def resolve_for_vllm(base_model_name: str, name: str, registry: Any = None) -> dict[str, Any] | None:
    """The fields of the `LoRARequest` for `name` (blocking), None if it is not a deltahub ref
    this registry or hub has; raises `ServingRefused` if vLLM could not serve it."""
    from deltahub.registry import Registry, parse_ref
    from deltahub.serving.fetch import materialize
    from deltahub.serving.rules import check_servable

    try:
        parse_ref(name)
    except InvalidRef:
        return None
    reg = registry or Registry()
    try:
        try:
            v, path = materialize(name, reg)
        except NotFound:
            return None
        art = reg.open(v)
        served = os.environ.get(SERVED_BASE_ENV) or base_model_name
        fp = None
        if art.manifest is not None and art.manifest.base_fingerprint:
            from deltahub.serving.basecheck import served_fingerprint

            fp = served_fingerprint(served)
        report = check_servable(
            art, "vllm", served_base=served, served_fingerprint=fp, ref=v.ref, digest=v.digest
        )
        if not report.ok:
            reasons = "; ".join(
                f"{f.rule}: {f.message}" + (f" (fix: {f.fix})" if f.fix else "") for f in report.refusals
            )
            raise ServingRefused(f"vLLM cannot serve {v.ref} ({v.digest[:19]}): {reasons}")
        for n in report.notes:
            log.info("%s: %s", v.ref, n.message)
        return {
            "lora_name": lora_name(v.full_name, v.digest),
            "lora_int_id": lora_int_id(v.digest),
            "lora_path": str(Path(path)),
            "base_model_name": base_model_name,
        }
    finally:
        if registry is None:
            reg.close()


def make_request(request_cls: Any, fields: dict[str, Any]) -> Any:
    """A `LoRARequest`; vLLM versions before `base_model_name` existed get the other fields."""
    try:
        return request_cls(**fields)
    except TypeError:
        return request_cls(**{k: v for k, v in fields.items() if k != "base_model_name"})


@functools.cache
def resolver_class() -> type:
    """`DeltahubResolver`, a subclass of vLLM's `LoRAResolver` (built on first use)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class DeltahubResolver(LoRAResolver):  # type: ignore[misc, valid-type]
        """Resolves deltahub refs to digest-pinned LoRA directories."""

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            fields = await asyncio.to_thread(resolve_for_vllm, base_model_name, lora_name)
            return None if fields is None else make_request(LoRARequest, fields)

    return DeltahubResolver


def register() -> None:
    """The `vllm.general_plugins` entry point: register the resolver with vLLM."""
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, resolver_class()())


__all__ = ["RESOLVER_NAME", "ServingRefused", "lora_int_id", "register", "resolve_for_vllm", "resolver_class"]
