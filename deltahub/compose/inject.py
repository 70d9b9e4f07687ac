"""Finding where adapters go: module-name patterns and linear-layer shapes.

Matching follows PEFT's `check_target_module_exists` exactly, so one config selects the
same modules in both libraries:

- `target_modules` a list: a module matches when its full name equals an entry or ends
  with `"." + entry` (suffix match on whole name components);
- a string: `re.fullmatch(pattern, name)`;
- `"all-linear"`: every `nn.Linear` / GPT-2 `Conv1D` / bitsandbytes linear except the
  output head (the output embeddings, or a top-level `classifier`/`score` head);
- `exclude_modules` (list or regex) and `layers_to_transform`/`layers_pattern` as PEFT.

Adapters never replace modules: a `Site` swaps the module's `forward` (an instance
attribute over the class method), so parameter names, `state_dict()` and the base
fingerprint stay those of the plain base, and removing the attribute restores the base
with zero residual cost.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from deltahub.errors import IncompatibleBase, InvalidConfig

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
BNB_LINEAR = ("Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D`: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_bnb_linear(module: nn.Module) -> bool:
    return type(module).__name__ in BNB_LINEAR


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_bnb_linear(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, Conv1D or bitsandbytes linear."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return int(module.in_features), int(module.out_features)


def head_names(model: nn.Module) -> set[str]:
    """Names of output heads that `all-linear` leaves alone (PEFT does the same)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.update(n for n, m in model.named_modules() if m is out)
    else:
        for name in SEQ_CLS_HEAD_NAMES:
            head = getattr(model, name, None)
            if isinstance(head, nn.Module):
                heads.update(n for n, m in model.named_modules() if m is head)
                break
    return heads


def _layer_index_ok(name: str, layers: Any, layers_pattern: Any) -> bool:
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if not match:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def name_matches(config: dict[str, Any], name: str) -> bool:
    """Whether module `name` is a target of a PEFT-style config (no type check)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith(f".{t}") for t in targets):
        return False
    return _layer_index_ok(name, config.get("layers_to_transform"), config.get("layers_pattern"))


def find_targets(
    model: nn.Module,
    config: dict[str, Any],
    accept: Callable[[nn.Module], bool] = is_linear,
    what: str | None = None,
) -> list[str]:
    """Module names selected by `config["target_modules"]` that `accept` takes.

    With `what` (the method's name), a module that the names select but `accept` refuses
    is an error naming it, as PEFT raises for a target it cannot adapt; without it such
    modules are skipped.
    """
    targets = config.get("target_modules")
    if targets is None:
        raise InvalidConfig("target_modules is required: a list of module names, a regex, or 'all-linear'")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = head_names(model)
        names = [n for n, m in model.named_modules() if n and is_linear(m) and n not in heads]
        config = {**config, "target_modules": names}
    elif not isinstance(targets, (str, list, tuple, set)):
        raise InvalidConfig(f"target_modules must be a list, a regex or 'all-linear', got {targets!r}")
    else:
        config = {**config, "target_modules": targets if isinstance(targets, str) else list(targets)}
    matched = [(n, m) for n, m in model.named_modules() if n and name_matches(config, n)]
    if what is not None:
        for n, m in matched:
            if not accept(m):
                raise IncompatibleBase(
                    f"target_modules {targets!r} selects {n!r}, a {type(m).__name__}, which {what} cannot "
                    "adapt; name only the modules it adapts (or use exclude_modules)"
                )
    found = [n for n, m in matched if accept(m)]
    if not found:
        raise IncompatibleBase(
            f"target_modules {targets!r} matches no supported module of {type(model).__name__}; "
            f"module names look like {_examples(model)}"
        )
    return found


def _examples(model: nn.Module, k: int = 4) -> str:
    names = [n for n, m in model.named_modules() if is_linear(m)][:k]
    return ", ".join(names) or "(no linear layers)"


def get_module(model: nn.Module, path: str, adapter: str) -> nn.Module:
    """`model.get_submodule(path)` with an `IncompatibleBase` that names the module."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise IncompatibleBase(
            f"adapter {adapter!r} targets module {path!r}, which {type(model).__name__} does not have "
            f"(is it for another base model? module names look like {_examples(model)})"
        ) from None


class Site:
    """One module of the base whose output adapters change.

    `base_forward` is the module's own forward, captured before any patching. `set(fn)`
    installs `fn` as the module's forward (an instance attribute: a pointer change) and
    `set(None)` removes it, restoring the class forward.
    """

    __slots__ = ("_own", "base_forward", "module", "path")

    def __init__(self, module: nn.Module, path: str) -> None:
        self.module = module
        self.path = path
        # Another library (accelerate's hooks, say) may have patched forward already:
        # keep its patch as the "base" and restore it, not the class method.
        self._own = module.__dict__.get("forward")
        self.base_forward = module.forward

    def set(self, fn: Callable[..., Any] | None) -> None:
        if fn is not None:
            self.module.forward = fn  # type: ignore[method-assign]
        elif self._own is not None:
            self.module.forward = self._own  # type: ignore[method-assign]
        else:
            self.module.__dict__.pop("forward", None)


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
