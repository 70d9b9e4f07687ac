"""Slot buffers for per-row routing: many LoRAs in one gathered computation per site.

Punica / S-LoRA's BGMV layout (and vLLM's punica wrapper): at each adapted module
(a "site") the LoRA factors of the routed adapters live stacked in two buffers,

    A[slot, r_max, d_in]        lora_A, zero-padded to the largest rank seen
    B[slot, d_out, r_max]       s * lora_B (the scaling folded in), zero-padded

(stored transposed, `At[slot, d_in, r_max]` and `Bt[slot, r_max, d_out]`, so that the
batched matmuls read them contiguously),

and a batch carries one slot index per row. Slot 0 is all zeros (rows with no adapter,
or whose adapter is not gathered at this site), so every row goes through the same
two batched matmuls and the zero rows add exactly 0.

`gathered_delta(x, slots, bank)` computes, in one `torch.bmm` pair over gathered
factors, what this plain loop computes (the reference the tests keep):

    for i in range(n_rows):
        s = slots[i]
        out[i] = (x[i] @ A[s].T) @ B[s].T        # = s_i * x[i] A_i^T B_i^T for row i's LoRA

Padding is exact: padded rows of A give zero columns of the intermediate, met by zero
columns of B.

On a CPU without gradients the same loop runs as written instead, over runs of
consecutive rows with the same slot (`segmented_add_`): two matmuls per run on views of
x, y and the slots, added into y in place, and one bmm pair on a view of the slots for
adjacent runs whose slots follow each other (the order the slot table gives adapters
paged in together). The gather copies every row's factors, as many elements as the
row's activations when the rank equals the row's tokens; the runs copy nothing and pay
a few microseconds of dispatch per piece, which is cheaper on a CPU while pieces are
few per adapter (`segmented_pays`); a single adapter's rows run this way too.
Figures: bench/RESULTS.md, "compose, issue 19: routing by runs of rows".

Which adapter occupies which slot is decided once per forward, for the whole model,
by `SlotTable` (the same slot at every site): an adapter used by the batch that is not
in a slot is paged in (its factors copied into that slot at each site; nothing is
reallocated), evicting the least recently used adapter not in the batch. Resident
adapters beyond the slots stay where they are (their own parameters: for one loaded from
the registry, views of its blob's memory map, `compose.mapped`, which paging in reads)
until a batch needs them, so thousands can be resident with `capacity` slots. A batch with more distinct adapters than slots runs the
overflow through the per-adapter path (same results, a loop).

A bank's slot dimension is allocated on demand, doubling up to `capacity` (so a model
that only ever routes 4 adapters holds 4 slots, not 64); its rank dimension grows when
a larger rank arrives. Both are rare, amortized events; activation itself copies into
existing storage.

What is gathered: a plain `LoraLayer` (LoRA or rsLoRA, any rank) whose factors need no
gradient. DoRA, `lora_bias`, saved heads / biases (`SavedParams`), embedding LoRA and
every other method keep the per-adapter path for their rows at that site.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

DEFAULT_SLOTS = 64
# On a CPU the gather copies each row's factors (rows * r_max * (d_in + d_out) elements)
# while the per-adapter loop pays a fixed cost per adapter (4 small ops, ~15-20 us): the
# gather pays from about one adapter per this many gathered elements (bench/compose_bench.py
# section 0: 64 rows, 512 -> 512, r 16 crosses over near K = 28). On CUDA every op is a
# kernel launch, so gathering pays from two adapters on.
CPU_ELEMENTS_PER_ADAPTER = 36_000
# `segmented_add_` (CPU, no gradients) while the batch's rows come in at most this many
# pieces (`run_pieces`) per gathered adapter; beyond, the per-adapter loop
# (bench/compose_bench.py, section 0: one run per adapter 0.58x the loop, 8 runs 1.07x).
SEGMENTED_PIECES_PER_ADAPTER = 2


def gatherable(delta: Any) -> bool:
    """Whether a site delta can live in a slot (see the module docstring)."""
    from deltahub.methods.lora.layer import LoraLayer

    if type(delta) is not LoraLayer or delta.use_dora or delta.lora_B_bias is not None:
        return False
    A, B = delta.lora_A, delta.lora_B
    if not A.is_floating_point():
        return False
    return not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad))


def _signature(layer: Any) -> tuple[Any, ...] | None:
    """What a slot's copy of `layer` depends on; None (copy again at every use) for
    trainable factors, which an optimizer may update in place without bumping their
    version counter (torch's fused AdamW, transformers' Trainer default)."""
    A, B = layer.lora_A, layer.lora_B
    if A.requires_grad or B.requires_grad:
        return None
    return (id(layer), id(A), id(B), A._version, B._version, layer.scaling)


class SlotBank:
    """The stacked factors of one site, `At[1 + n, d_in, r_max]` (A transposed) and
    `Bt[1 + n, r_max, d_out]` (s B transposed), slot 0 all zeros, plus what each slot
    holds (a signature of the layer copied in)."""

    def __init__(self, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device) -> None:
        self.d_in, self.d_out, self.dtype, self.device = d_in, d_out, dtype, device
        self.r_max = 0
        self.At = torch.zeros(1, d_in, 0, dtype=dtype, device=device)
        self.Bt = torch.zeros(1, 0, d_out, dtype=dtype, device=device)
        self.held: list[tuple[Any, ...] | None] = [None]
        self.ranks: list[int] = [0]  # the rank in each slot (0: empty), for `segmented_add_`
        self._views: list[tuple[Tensor, Tensor]] | None = None

    @property
    def n_slots(self) -> int:
        return self.At.shape[0] - 1

    def views(self) -> list[tuple[Tensor, Tensor]]:
        """Per slot, (A^T (d_in, r), s B^T (r, d_out)) over its own rank: views of the buffers."""
        if self._views is None:
            self._views = [(self.At[s, :, :r], self.Bt[s, :r]) for s, r in enumerate(self.ranks)]
        return self._views

    def fits(self, layer: Any) -> bool:
        A = layer.lora_A
        return A.dtype == self.dtype and A.device == self.device and A.shape[1] == self.d_in

    def _grow(self, n_slots: int, r: int) -> None:
        n = max(self.n_slots, n_slots)
        r = max(self.r_max, r)
        if n == self.n_slots and r == self.r_max:
            return
        At = torch.zeros(1 + n, self.d_in, r, dtype=self.dtype, device=self.device)
        Bt = torch.zeros(1 + n, r, self.d_out, dtype=self.dtype, device=self.device)
        At[: self.At.shape[0], :, : self.r_max] = self.At
        Bt[: self.Bt.shape[0], : self.r_max] = self.Bt
        self.At, self.Bt, self.r_max = At, Bt, r
        self.held += [None] * (1 + n - len(self.held))
        self.ranks += [0] * (1 + n - len(self.ranks))
        self._views = None

    def ensure(self, slot: int, capacity: int, r: int = 0) -> None:
        """Room for slots 1..`slot` (doubling, at most `capacity`) and rank `r`."""
        if slot > self.n_slots or r > self.r_max:
            want = self.n_slots
            while want < slot:
                want = max(1, 2 * want)
            self._grow(min(max(want, slot), capacity), r)

    def put(self, slot: int, layer: Any, capacity: int) -> None:
        """Copy `layer`'s factors into `slot` (1-based) unless it already holds them."""
        sig = _signature(layer)
        if sig is not None and slot < len(self.held) and self.held[slot] == sig:
            return
        self.ensure(slot, capacity, layer.lora_A.shape[0])
        r = layer.lora_A.shape[0]
        with torch.no_grad():
            self.At[slot].zero_()
            self.At[slot, :, :r].copy_(layer.lora_A.T)
            self.Bt[slot].zero_()
            self.Bt[slot, :r].copy_(layer.lora_B.T)
            self.Bt[slot, :r].mul_(layer.scaling)
        self.held[slot] = sig if sig is not None else ("trainable", id(layer))  # never matches
        self.ranks[slot] = r
        self._views = None

    def clear(self, slot: int) -> None:
        """Make `slot` add nothing at this site."""
        if slot < len(self.held) and self.held[slot] is not None:
            self.At[slot].zero_()
            self.Bt[slot].zero_()
            self.held[slot] = None
            self.ranks[slot] = 0
            self._views = None


def gathered_pays(n_rows: int, k: int, bank: SlotBank) -> bool:
    """Whether `k` gathered adapters over `n_rows` rows beat the per-adapter loop here."""
    if k < 2:
        return False
    if bank.device.type != "cpu":
        return True
    return k * CPU_ELEMENTS_PER_ADAPTER >= n_rows * bank.r_max * (bank.d_in + bank.d_out)


def gathered_delta(x: Tensor, slots: Tensor, bank: SlotBank) -> Tensor:
    """Each row's LoRA output: row i gets (x[i] A[slots[i]]^T) B[slots[i]]^T (module docstring).

    x: (n, ..., d_in); slots: (n,) long on x's device. Returns (n, ..., d_out) in the
    bank's dtype.
    """
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1])
    if x3.dtype != bank.dtype:
        x3 = x3.to(bank.dtype)
    h = torch.bmm(x3, bank.At.index_select(0, slots))  # (n, t, r): x A^T per row
    out = torch.bmm(h, bank.Bt.index_select(0, slots))  # (n, t, d_out): h (s B)^T per row
    return out.reshape(*x.shape[:-1], bank.d_out)


Pieces = tuple[list[int], list[tuple[int, int, int]]]  # `run_pieces`


def slot_runs(slots: Sequence[int], repeat: int = 1) -> list[tuple[int, int, int]]:
    """Runs of consecutive rows with the same slot, slot 0 (nothing gathered) left out:
    [(first row, end row, slot)], in rows of a batch where each entry repeats `repeat`
    times (`repeat_interleave`, as generation's beams)."""
    out = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start]:
                out.append((start * repeat, i * repeat, int(slots[start])))
            start = i
    return out


def segmented_pays(pieces: Pieces, k: int, bank: SlotBank) -> bool:
    """Whether `segmented_add_` over `pieces` (`run_pieces`) beats the per-adapter loop
    for `k` adapters (on a CPU, without gradients): two small ops per piece against
    about five per adapter plus copies of the rows of adapters whose rows are not
    contiguous."""
    return k >= 1 and len(pieces[1]) <= SEGMENTED_PIECES_PER_ADAPTER * k


def run_pieces(runs: list[tuple[int, int, int]], n_rows: int, tokens: int) -> Pieces:
    """How `segmented_add_` splits a batch of `n_rows` rows of `tokens` tokens each:
    (the sizes of consecutive pieces in tokens, covering every row: the runs and the gaps
    between them; [(index of a piece, its first slot, how many runs it holds)]).

    Adjacent runs of equal length whose slots follow each other (s, s + 1, ...: the
    order the slot table gives adapters paged in together) form one piece, which
    `segmented_add_` runs as one batched matmul pair on a view of the slots."""
    sizes: list[int] = []
    picks: list[tuple[int, int, int]] = []
    pos = 0
    for a, b, slot in runs:
        if picks and a == pos and sizes[-1] // picks[-1][2] == (b - a) * tokens:
            i, first, count = picks[-1]
            if slot == first + count and i == len(sizes) - 1:
                picks[-1] = (i, first, count + 1)
                sizes[-1] += (b - a) * tokens
                pos = b
                continue
        if a > pos:
            sizes.append((a - pos) * tokens)
        picks.append((len(sizes), slot, 1))
        sizes.append((b - a) * tokens)
        pos = b
    if pos < n_rows:
        sizes.append((n_rows - pos) * tokens)
    return sizes, picks


def segmented_add_(y: Tensor, x: Tensor, pieces: Pieces, bank: SlotBank) -> None:
    """y += each row's LoRA output, in place, one run of rows at a time.

    For each run (a, b, s) of `slot_runs` (split as `run_pieces`):
    y[a:b] += (x[a:b] A[s]^T) B[s]^T, two matmuls on views of x, y and the slot buffers,
    over the slot's own rank (the padding skipped); k adjacent runs of equal length on
    slots s .. s + k - 1 as one bmm pair on the view A[s : s + k] (padded ranks: exact
    zeros). That is the loop `looped_delta` writes, over runs of rows instead of rows. It
    copies nothing, where `gathered_delta` copies every row's factors (as many elements
    as the row's activations when the rank equals its tokens), so on a CPU it is the
    faster of the two at every row length measured (bench/compose_bench.py, section 0).
    On CUDA each op is a kernel launch and the gather (one bmm pair) is the one to use.

    y: (n, ..., d_out), contiguous, in the bank's dtype, no gradient; x: (n, ..., d_in).
    """
    sizes, picks = pieces
    x2 = x.reshape(-1, bank.d_in)
    if x2.dtype != bank.dtype:
        x2 = x2.to(bank.dtype)
    xs = x2.split(sizes)
    ys = y.view(-1, bank.d_out).split(sizes)
    views = bank.views()
    for i, slot, count in picks:
        if count > 1:
            h = torch.bmm(xs[i].view(count, -1, bank.d_in), bank.At[slot : slot + count])
            ys[i].view(count, -1, bank.d_out).baddbmm_(h, bank.Bt[slot : slot + count])
            continue
        At, Bt = views[slot]
        if At.shape[1]:
            ys[i].addmm_(xs[i].mm(At), Bt)


def looped_delta(x: Tensor, slots: Tensor, bank: SlotBank) -> Tensor:
    """The plain loop `gathered_delta` replaces (kept as the tests' reference)."""
    out = torch.zeros(*x.shape[:-1], bank.d_out, dtype=bank.dtype, device=x.device)
    for i in range(x.shape[0]):
        s = int(slots[i])
        out[i] = (x[i].to(bank.dtype) @ bank.At[s]) @ bank.Bt[s]
    return out


class SlotTable:
    """Which adapter occupies which slot (the same at every site), least recently used first."""

    def __init__(self, capacity: int = DEFAULT_SLOTS) -> None:
        if capacity < 1:
            raise ValueError("a slot table needs at least one slot")
        self.capacity = capacity
        self.lru: OrderedDict[str, int] = OrderedDict()  # name -> slot (1-based)
        self.banks: dict[str, SlotBank] = {}
        self.page_ins = 0  # adapters copied into a slot (for tests and benchmarks)

    def assign(self, names: Sequence[str]) -> dict[str, int]:
        """Slots for the adapters of one batch (paging in, evicting the LRU ones not in it).

        Adapters beyond `capacity` get none (the caller runs them per adapter).
        """
        want = list(dict.fromkeys(names))
        out: dict[str, int] = {}
        for n in want:
            if n in self.lru:
                self.lru.move_to_end(n)
                out[n] = self.lru[n]
        free = sorted(set(range(1, self.capacity + 1)) - set(self.lru.values()), reverse=True)
        for n in want:
            if n in out:
                continue
            if free:
                slot = free.pop()
            else:
                victim = next((m for m in self.lru if m not in out), None)
                if victim is None:
                    continue  # more distinct adapters than slots: this one runs per adapter
                slot = self.lru.pop(victim)
            self.lru[n] = slot
            out[n] = slot
            self.page_ins += 1
        return out

    def forget(self, name: str) -> None:
        """Drop an adapter's slot (unloaded); its factors are cleared lazily by signature."""
        slot = self.lru.pop(name, None)
        if slot is not None:
            for bank in self.banks.values():
                bank.clear(slot)

    def bank(self, path: str, layer: Any) -> SlotBank | None:
        """The bank at `path` for `layer`'s dims, dtype and device (None if it does not fit one)."""
        bank = self.banks.get(path)
        if bank is None:
            A, B = layer.lora_A, layer.lora_B
            bank = SlotBank(A.shape[1], B.shape[0], A.dtype, A.device)
            self.banks[path] = bank
        return bank if bank.fits(layer) else None
