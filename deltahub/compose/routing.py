"""Per-row routing: a different adapter for each row of one batch, in one forward pass.

`model(**batch, adapter_names=["a", "b", None, ...])` groups the rows by adapter once,
at the top level (`Route`), and every site reuses that grouping: it runs the base module
on the whole batch, then, for each adapter, its delta on that adapter's rows only and
adds it into those rows. Rows of one adapter that are contiguous are a slice (a view: no
copy); otherwise an index tensor (`index_select` / `index_add_`). The base matmuls run
once on the full batch, so the extra cost is the adapters' own small matmuls, split
into per-adapter pieces.

Plain LoRAs run through stacked slot buffers instead (`deltahub.compose.slots`): each
row carries a slot index, and a site costs two batched matmuls over gathered factors
whatever the number of adapters (CUDA, autograd), or, on a CPU without gradients, two
matmuls per run of rows on views of the slots, added in place (`slots.segmented_add_`).
The per-adapter loop above stays for what cannot be gathered (DoRA, `lora_bias`, saved
heads and biases, embedding LoRA, other methods) and where the slot paths do not pay
(`slots.gathered_pays`, `slots.segmented_pays`: a single adapter on CUDA or under
autograd; on a CPU, adapters whose rows are scattered in many runs).

Generation may repeat each row k times (`num_beams`, `num_return_sequences`, as
`repeat_interleave`); a site that sees k * n rows expands the grouping to match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from deltahub.compose.blocks import DeltaFn
from deltahub.compose.slots import (
    SlotBank,
    gathered_delta,
    gathered_pays,
    run_pieces,
    segmented_add_,
    segmented_pays,
    slot_runs,
)
from deltahub.errors import InvalidConfig

Rows = slice | Tensor


class Route:
    """Rows grouped by adapter: `keys[i]` is an adapter name, `groups(n)` its rows."""

    def __init__(self, names: Sequence[str | None]) -> None:
        if not isinstance(names, (list, tuple)) or not names:
            raise InvalidConfig(
                "adapter_names must be a non-empty list with one adapter name (or None) per row"
            )
        self.names = list(names)
        self.keys: list[str] = [n for n in dict.fromkeys(names) if n is not None]
        self._cache: dict[tuple[int, torch.device], list[tuple[int, Rows]]] = {}
        self.slots: dict[str, int] = {}  # adapter -> slot (`slots.SlotTable`), set by the model
        self._slot_cache: dict[tuple[int, torch.device], Tensor] = {}
        self._run_cache: dict[int, list[tuple[int, int, int]]] = {}
        self._piece_cache: dict[tuple[int, int], Any] = {}

    def _repeat(self, batch: int) -> int:
        """How many times each entry of `names` repeats in a batch of `batch` rows."""
        n = len(self.names)
        if batch % n:
            raise InvalidConfig(f"adapter_names has {n} entries but the batch has {batch} rows")
        return batch // n

    def _slot_per_name(self) -> list[int]:
        return [self.slots.get(m, 0) if m is not None else 0 for m in self.names]

    def slot_rows(self, batch: int, device: torch.device) -> Tensor:
        """The slot of each of `batch` rows (0: no gathered adapter), repeated as `groups`."""
        key = (batch, device)
        found = self._slot_cache.get(key)
        if found is None:
            k = self._repeat(batch)
            found = torch.tensor(self._slot_per_name(), dtype=torch.long, device=device)
            if k > 1:
                found = found.repeat_interleave(k)
            self._slot_cache[key] = found
        return found

    def slot_runs(self, batch: int) -> list[tuple[int, int, int]]:
        """Runs of rows with the same slot (`slots.slot_runs`) in a batch of `batch` rows."""
        found = self._run_cache.get(batch)
        if found is None:
            found = self._run_cache[batch] = slot_runs(self._slot_per_name(), self._repeat(batch))
        return found

    def run_pieces(self, batch: int, tokens: int) -> Any:
        """`slots.run_pieces` of this batch's runs, for rows of `tokens` tokens (cached)."""
        key = (batch, tokens)
        found = self._piece_cache.get(key)
        if found is None:
            found = self._piece_cache[key] = run_pieces(self.slot_runs(batch), batch, tokens)
        return found

    def groups(self, batch: int, device: torch.device) -> list[tuple[int, Rows]]:
        """[(index into keys, rows)] for a batch of `batch` rows on `device`."""
        key = (batch, device)
        found = self._cache.get(key)
        if found is not None:
            return found
        k = self._repeat(batch)
        out: list[tuple[int, Rows]] = []
        for i, name in enumerate(self.keys):
            rows = [j for j, m in enumerate(self.names) if m == name]
            if rows[-1] - rows[0] + 1 == len(rows):
                out.append((i, slice(rows[0] * k, (rows[-1] + 1) * k)))
            else:
                idx = torch.tensor(rows, device=device)
                if k > 1:
                    idx = (idx[:, None] * k + torch.arange(k, device=device)).flatten()
                out.append((i, idx))
        self._cache[key] = out
        return out


def routed_forward(
    base_forward: Callable[..., Tensor],
    fns: list[DeltaFn | None],
    route: Route,
    bank: SlotBank | None = None,
    gathered: list[bool] | None = None,
) -> Callable[..., Tensor]:
    """A site forward that adds each adapter's delta to its own rows: the adapters
    `gathered` marks in one computation over `bank` (rows by `route.slot_rows`) when
    that pays (`slots.gathered_pays`), the others (`fns[i]` not None) one by one."""
    marks = gathered or [False] * len(fns)
    n_gathered = sum(marks)
    rest = [None if m else fn for fn, m in zip(fns, marks, strict=True)]

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = base_forward(x, *args, **kwargs)
        todo = fns
        if bank is not None and _in_place(x, y, bank) and bank.device.type == "cpu":
            pieces = route.run_pieces(x.shape[0], y.numel() // (x.shape[0] * y.shape[-1]))
            if segmented_pays(pieces, n_gathered, bank):
                todo = rest
                segmented_add_(y, x, pieces, bank)
        if todo is fns and bank is not None and gathered_pays(x.shape[0], n_gathered, bank):
            todo = rest
            d = gathered_delta(x, route.slot_rows(x.shape[0], x.device), bank)
            if y.requires_grad or d.requires_grad or y.dtype != d.dtype or not y.is_contiguous():
                y = y + d.to(y.dtype)
            else:
                y.add_(d)
        if all(fn is None for fn in todo):
            return y
        groups = route.groups(x.shape[0], x.device)
        for i, rows in groups:
            fn = todo[i]
            if fn is None:
                continue
            if isinstance(rows, slice):
                xg, yg = x[rows], y[rows]
            else:
                xg = x.index_select(0, rows)
                # A plain LoRA (what `gathered` marks) reads only x: no copy of y's rows.
                yg = xg if marks[i] else y.index_select(0, rows)
            d = fn(xg, yg, yg, 1.0, rows)
            if not (y.requires_grad or d.requires_grad):
                if isinstance(rows, slice):
                    yg.add_(d)  # a view of y
                else:
                    y.index_add_(0, rows, d.to(y.dtype))
            else:
                if isinstance(rows, slice):
                    rows = torch.arange(rows.start, rows.stop, device=y.device)
                y = y.index_add(0, rows, d.to(y.dtype))
        return y

    return forward


def _in_place(x: Tensor, y: Tensor, bank: SlotBank) -> bool:
    """Whether the gathered adapters' outputs can be added into y in place (no autograd)."""
    grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    return not grad and y.dtype == bank.dtype and y.is_contiguous()
