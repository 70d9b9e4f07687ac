"""Saved modules and saved parameters of a PEFT adapter, applied while it is active.

Two site deltas (keys sorted by `deltahub.methods.lora.extras`):

- `SavedModule`: a `modules_to_save` module (a classification head, say). The adapter
  owns a trained copy; while active the site runs the copy, so its output is exactly
  what PEFT's `ModulesToSaveWrapper` computes. As a delta (composition, per-row
  routing): d = copy(x) - y_base.
- `SavedParams`: base parameters the artifact replaces (`bias="all" | "lora_only"`,
  PEFT's saved embedding weights). While active the module's own forward runs with the
  saved tensors swapped in (a pointer change, no copy), optionally wrapped around the
  method's own delta at that module (a LoRA layer whose bias PEFT also trained). PEFT
  writes such tensors into the shared base parameter, so every module holding it (tied
  embeddings) gets a `SavedParams` site; one of them owns the merge.

Merging folds them in as PEFT's `merge_and_unload` leaves the model: a saved module's
tensors replace the base module's (new parameters, so a tie to another module is cut as
PEFT's copy cuts it), saved parameters are written into the base's in place. Both are
undone exactly by `unmerge`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from deltahub.compose.inject import get_module
from deltahub.errors import IncompatibleBase, InvalidArtifact, InvalidConfig
from deltahub.methods.common import SiteDelta
from deltahub.methods.lora.extras import PREFIX, Extra, bias_mode, modules_to_save_of


def _plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose modules run their class forward (any site patch is dropped)."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        m.__dict__.pop("forward", None)
    return twin


class SavedModule(SiteDelta):
    """A `modules_to_save` module: the adapter's own trained copy of a base module."""

    def __init__(
        self,
        base_module: nn.Module,
        path: str,
        state: dict[str, Tensor] | None,
        adapter: str,
        prefix: str = PREFIX,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", base_module)
        self.path, self.prefix = path, prefix
        self.module = _plain_copy(base_module)
        if state is not None:
            want = self.module.state_dict()
            if set(want) != set(state):
                raise IncompatibleBase(
                    f"adapter {adapter!r}: saved module {path!r} has tensors {sorted(state)}, this base's "
                    f"module has {sorted(want)}"
                )
            for name, t in state.items():
                if tuple(t.shape) != tuple(want[name].shape):
                    raise IncompatibleBase(
                        f"adapter {adapter!r}: saved {path}.{name} is {list(t.shape)}, this base needs "
                        f"{list(want[name].shape)}"
                    )
            with torch.no_grad():
                self.module.load_state_dict(state, strict=True)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        return (self.module(x) - y_base) * scale

    def single(self, base_forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        module = self.module

        def forward(*args: Any, **kwargs: Any) -> Tensor:  # a function: a Module would register
            return module(*args, **kwargs)

        return forward

    def tensors(self) -> dict[str, Tensor]:
        return {f"{self.prefix}{self.path}.{k}": v.detach() for k, v in self.module.state_dict().items()}

    @torch.no_grad()
    def merge(self) -> Any:
        backup = []
        twins = dict(self.module.named_modules())
        for name, m in self.base_layer.named_modules():
            twin = twins[name]
            for store in ("_parameters", "_buffers"):
                for key, t in getattr(twin, store).items():
                    if t is None:
                        continue
                    old = getattr(m, store)[key]
                    backup.append((m, store, key, old))
                    new = t.detach().clone()
                    getattr(m, store)[key] = (
                        nn.Parameter(new, requires_grad=False) if store == "_parameters" else new
                    )
        return backup

    @torch.no_grad()
    def unmerge(self, backup: Any) -> None:
        for m, store, key, old in reversed(backup):
            getattr(m, store)[key] = old


class SavedParams(SiteDelta):
    """Saved tensors that replace parameters of one base module while the adapter is
    active, around the method's own delta at that module (`inner`), if any."""

    def __init__(
        self,
        base_module: nn.Module,
        values: dict[str, nn.Parameter],
        keys: dict[str, str],
        inner: SiteDelta | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "base_layer", base_module)
        self.values = nn.ParameterDict(values)
        # parameter name -> artifact key; "" where the value is shared with the site that
        # owns it (tied weights), which alone exports and merges it
        self.keys = dict(keys)
        self.inner = inner
        self.sequential = bool(getattr(inner, "sequential", False))

    @property
    def merge_error(self) -> float:
        return float(getattr(self.inner, "merge_error", 0.0))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        params = self.base_layer._parameters
        old = {n: params[n] for n in self.values}
        params.update(self.values.items())
        try:
            yield
        finally:
            params.update(old)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        with self.swapped():
            y1 = type(self.base_layer).forward(self.base_layer, x)
            d = (y1 - y_base) * scale
            if self.inner is not None:
                d = d + self.inner.delta(x, y1, y_cur + d, scale, rows)
        return d

    def single(self, base_forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        fn = base_forward if self.inner is None else self.inner.single(base_forward)

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            with self.swapped():
                return fn(x, *args, **kwargs)

        return forward

    def tensors(self) -> dict[str, Tensor]:
        return {self.keys[n]: v.detach() for n, v in self.values.items() if self.keys[n]}

    @torch.no_grad()
    def merge(self) -> Any:
        owned = [n for n in self.values if self.keys[n]]
        own = {n: self.base_layer._parameters[n].detach().clone() for n in owned}
        for n in owned:
            self.base_layer._parameters[n].copy_(self.values[n])
        inner = self.inner.merge() if self.inner is not None else None  # type: ignore[operator]
        return own, inner

    @torch.no_grad()
    def unmerge(self, backup: Any) -> None:
        own, inner = backup
        if self.inner is not None:
            self.inner.unmerge(inner)  # type: ignore[operator]
        for n, v in own.items():
            self.base_layer._parameters[n].copy_(v)


def _holders(base: nn.Module, param: Tensor) -> list[tuple[str, str]]:
    """Every (module path, parameter name) of the base that holds `param` (tied weights)."""
    out = []
    for path, m in base.named_modules(remove_duplicate=False):
        for name, p in m._parameters.items():
            if p is param:
                out.append((path, name))
    return list(dict.fromkeys(out))


def build_sites(
    base: nn.Module,
    extras: list[Extra],
    get: Callable[[str], Tensor] | None,
    adapter: str,
    sites: dict[str, SiteDelta],
    trainable: bool = False,
    prefix: str = PREFIX,
) -> dict[str, Tensor]:
    """Add the sites of `extras` to `sites` (path -> delta; an existing delta at a path
    with saved parameters becomes their `inner`). `get` reads an artifact tensor; None
    (a fresh adapter) copies the base's. Returns the tensors kept for export only."""
    kept: dict[str, Tensor] = {}
    modules: dict[str, dict[str, Tensor]] = {}
    params: dict[str, dict[str, tuple[str, nn.Parameter]]] = {}
    claimed: set[int] = set()  # base parameters already replaced (a tied weight saved twice)
    for e in extras:
        if e.kind == "ignored":
            if get is not None:
                kept[e.key] = get(e.key)
            continue
        if e.kind == "module":
            if get is not None:
                modules.setdefault(e.module, {})[e.name] = get(e.key)
            else:
                modules.setdefault(e.module, {})
            continue
        module = get_module(base, e.module, adapter)
        current = module._parameters.get(e.name)
        if current is None:
            raise IncompatibleBase(
                f"adapter {adapter!r} saves {e.key!r}, but module {e.module!r} of this base has no {e.name}"
            )
        if get is None:
            value = current.detach().clone()
        else:
            value = get(e.key)
            if tuple(value.shape) != tuple(current.shape):
                hint = (
                    "; the adapter was trained on a resized vocabulary: resize the base's token embeddings "
                    "(resize_token_embeddings) to match before loading"
                    if e.name == "weight"
                    else ""
                )
                raise IncompatibleBase(
                    f"adapter {adapter!r}: saved {e.key!r} is {list(value.shape)}, this base's "
                    f"{e.module}.{e.name} is {list(current.shape)}{hint}"
                )
            value = value.to(dtype=current.dtype, device=current.device)
            if torch.equal(value, current):  # PEFT's copy of an unchanged base tensor: nothing to apply
                kept[e.key] = value
                continue
        if id(current) in claimed:
            kept[e.key] = value
            continue
        claimed.add(id(current))
        shared = nn.Parameter(value, requires_grad=trainable)
        for path, name in _holders(base, current):
            # The key's own module exports and merges the value; tied holders only swap it in.
            own = (path, name) == (e.module, e.name)
            params.setdefault(path, {})[name] = (e.key if own else "", shared)
    for path, state in modules.items():
        base_module = get_module(base, path, adapter)
        if path in sites:
            raise IncompatibleBase(f"adapter {adapter!r} both saves module {path!r} and adapts it")
        sites[path] = SavedModule(base_module, path, state if get is not None else None, adapter, prefix)
    for path, named in params.items():
        sites[path] = SavedParams(
            base.get_submodule(path),
            {n: p for n, (_, p) in named.items()},
            {n: key for n, (key, _) in named.items()},
            inner=sites.get(path),
        )
    return kept


def factor_layer(layer: SiteDelta) -> SiteDelta:
    """The method's own delta inside a `SavedParams` wrapper (the layer itself otherwise)."""
    while isinstance(layer, SavedParams) and layer.inner is not None:
        layer = layer.inner
    return layer


def has_saved(layers: list[SiteDelta]) -> bool:
    return any(isinstance(layer, (SavedModule, SavedParams)) for layer in layers)


def saved_module_paths(base: nn.Module, config: dict[str, Any]) -> list[str]:
    """The modules `modules_to_save` selects in `base` (PEFT's `endswith` match; the
    outermost one where they nest)."""
    try:
        mts = modules_to_save_of(config)
    except InvalidArtifact as e:
        raise InvalidConfig(str(e)) from None
    saved: list[str] = []
    for name, _ in base.named_modules():
        if name and not any(name.startswith(s + ".") for s in saved) and any(name.endswith(t) for t in mts):
            saved.append(name)
    return saved


def outside_saved(names: list[str], saved: list[str]) -> list[str]:
    """`names` less those inside a saved module: PEFT trains a saved module as one copy,
    so the method adapts nothing in it."""
    return [n for n in names if not any(n == s or n.startswith(s + ".") for s in saved)]


def fresh_extras(base: nn.Module, config: dict[str, Any], adapted: set[str]) -> list[Extra]:
    """What PEFT would save besides the factors for a fresh adapter with this config:
    every `modules_to_save` module, and the biases `bias` names."""
    try:
        bias = bias_mode(config) if config.get("peft_type", "LORA") == "LORA" else "none"
    except InvalidArtifact as e:
        raise InvalidConfig(str(e)) from None
    saved = saved_module_paths(base, config)
    out = [Extra("", "module", name, "") for name in saved]
    if bias != "none":
        for name, _ in base.named_parameters():
            module, _, leaf = name.rpartition(".")
            if leaf != "bias" or any(module == s or module.startswith(s + ".") for s in saved):
                continue
            if bias == "lora_only" and module not in adapted:
                continue
            key = f"{PREFIX}{module}.base_layer.bias" if module in adapted else f"{PREFIX}{module}.bias"
            out.append(Extra(key, "param", module, "bias"))
    return out
