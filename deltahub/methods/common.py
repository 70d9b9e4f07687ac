"""What every adapter method provides to the runtime.

An adapter is an `AdapterModule`: an `nn.Module` holding one `SiteDelta` per base module
it changes (its "sites", named by module path). A site delta computes how much the
adapter adds to that module's output:

    delta(x, y_base, y_cur, scale, rows=None) -> Tensor   shaped like the module's output

`x` is the module's input, `y_base` the base module's output, `y_cur` the output as
changed by adapters applied before this one (only `sequential` deltas such as a serial
bottleneck adapter read it; LoRA reads `x`, DoRA also `y_base`), and `scale` a weight
that composition blocks fold in (`Sum`, `Average`). `rows` (a slice or an index
tensor) says which rows of the full batch `x` holds under per-row routing; only a delta
that reads tensors captured elsewhere in the model needs it. `single(base_forward)` returns the
forward a site runs when this adapter alone is active; methods override it with a
fused fast path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from deltahub.errors import IncompatibleBase


def copy_checked(param: Tensor, stored: Tensor, what: str) -> None:
    """Copy an artifact tensor into a fresh adapter parameter; a shape that does not fit the
    base is an `IncompatibleBase` naming both shapes."""
    if tuple(stored.shape) != tuple(param.shape):
        raise IncompatibleBase(f"{what} is {list(stored.shape)}, the base needs {list(param.shape)}")
    param.copy_(stored)


class SiteDelta(nn.Module):
    """One adapter's contribution at one module of the base."""

    sequential: bool = False

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        raise NotImplementedError

    def single(self, base_forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """The module forward with only this adapter active."""

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            y = base_forward(x, *args, **kwargs)
            return y + self.delta(x, y, y, 1.0)

        return forward


class AdapterModule(nn.Module):
    """An adapter: site deltas by module path, its config, and its artifact tensors."""

    method: str = ""
    mergeable: bool = False
    # Which compositions have a meaning for this method (checked by `blocks.check_composition`).
    supports: frozenset[str] = frozenset({"stack", "sum", "average", "fuse", "route"})

    def __init__(self, config: dict[str, Any], paths: list[str], layers: list[SiteDelta]) -> None:
        super().__init__()
        self.config = config
        self.paths = list(paths)
        self.layers = nn.ModuleList(layers)
        self._by_path: dict[str, SiteDelta] = dict(zip(self.paths, layers, strict=True))

    def delta_at(self, path: str) -> SiteDelta | None:
        return self._by_path.get(path)

    def tensors(self) -> dict[str, Tensor]:
        """The artifact's tensors, under the artifact's key names."""
        raise NotImplementedError

    def attach(self, base: nn.Module) -> None:
        """Install whatever the adapter needs beyond its sites (input-capture hooks)."""

    def detach(self) -> None:
        """Undo `attach`."""

    def set_active(self, base: nn.Module, active: bool) -> None:
        """Called when the adapter becomes active or inactive: methods that change the
        model's inputs rather than module outputs (prompt and prefix tuning) install
        their forward hooks here."""
