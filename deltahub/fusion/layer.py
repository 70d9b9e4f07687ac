"""AdapterFusion over frozen adapters: bottleneck outputs and LoRA delta outputs.

Pfeiffer, Kamath, Rücklé, Cho, Gurevych, 2021, "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning" (EACL). At every fused module ("site") of the base,
with h the query (shape (B, T, d)) and z_n the change adapter n alone makes there:

    q   = Q h + b_Q                                   query,  Q: (d, d)
    k_n = K z_n                                       keys,   K: (d, d)
    s   = softmax_n( q . k_n / T )                    attention over the N adapters
    out = sum_n s_n V z_n                             values, V: (d, d), V = I at init

and the module outputs y + out (y its output without the fused adapters). The query h
is what the fused adapters read when they all read the same thing (bottleneck adapters
of one placement: the FFN output for Houlsby, LN(x + y) for Pfeiffer, the stream x for
parallel ones), exactly as AdapterHub's `adapters` 1.3 (whose query is the last adapter's
input, `query_before_ln=False`), and the module's output y otherwise (LoRA deltas, mixed
methods). V starts at the identity (plus ~1e-6 noise) and an L2
penalty `lambda * sum ||V - I||^2` (`Fusion.regularization`) keeps it near it, so at
init fusion is a softmax-weighted average of the adapters. A key bias would add q.b_K,
the same for every n, which the softmax cancels, so K has none; a value bias would be a
free shift of the module output, so V has none either. Per site that is 3 d^2 + d
parameters (AdapterHub's `adapters` library: 3 d^2 + 2 d, with a key bias that the softmax
cancels; an imported fusion drops it, an exported one writes zeros).

What z_n is:

- bottleneck adapter: z_n = s_n (W_up act(W_down h_n + b_down) + b_up), its output
  without the residual (h_n its input: see `deltahub.methods.bottleneck.runtime`);
- LoRA: z_n = s_n B_n A_n x, its delta output at the target module (x the module's
  input). Here the query is the base module's output.

Both are affine in a small vector a_n (width r_n: the bottleneck size or the LoRA rank):
z_n = W_n a_n + c_n with W_n = s_n W_up, a_n = act(W_down h_n + b_down), c_n = s_n b_up
for a bottleneck adapter, and W_n = s_n B_n, a_n = A_n x, c_n = 0 for LoRA.

Folded computation. Evaluating the formula directly costs (1 + 2N) d^2 per token: every
z_n goes through K and V. Instead, once (cached while nothing changes them),

    G_n = Q^T (K W_n)  (d, r_n)      g_n = Q^T K c_n  (d,)
    r_n = (K W_n)^T b_Q  (r_n,)      e_n = b_Q . K c_n
    U_n = V W_n  (d, r_n)            u_n = V c_n  (d,)

and then per token

    q . k_n = (h^T G_n + r_n) . a_n + h . g_n + e_n
    out     = sum_n s_n (U_n a_n + u_n) = [s_1 a_1, ..., s_N a_N, s] @ [U_1 ... U_N u_1 ... u_N]^T

so the per-token cost is O(d * sum_n r_n): it grows with the adapters' rank or
bottleneck width, never with d x d. For serial bottlenecks, which all read the query h,
a site runs exactly 3 GEMMs per token: one on h for [W_down | G_n^T | g_n^T] (their
down-projections and the scores' factors together), one for the values, and the
softmax and segment sums between (`Folded`, `FusionLayer._run`): 3 d R multiply-adds per
token, R = sum_n r_n, which is the floor of any exact computation (each of the three is a
generic d x R map). `FusionLayer.direct` is the formula as written, kept as the
reference the tests compare against.

In training nothing is cached (Q, K, V change every step), and folding costs O(d^2 R)
per step, which for many adapters exceeds what it saves per token; each half (scores,
values) then folds or goes through q = Q h and V (sum_n s_n z_n) by cost
(`_train_plan`). Every association is the same exact formula.

An adapter the fusion cannot see inside (DoRA, a nested block) enters with W_n = I and
a_n = z_n, which is the direct formula for that adapter.

Scope: where Q, K, V live (`FusionConfig.scope`).

- "layer" (the default for new fusions, as AdapterHub, which fuses once per transformer
  layer): one Q, K, V of the layer's hidden size d per transformer layer (the module path
  up to its first numbered part, `encoder.layer.3`, `model.layers.3`, `transformer.h.3`),
  shared by every site of that layer the adapters change. Q, K, V are d x d, so at each
  site they act on the side of the site that is d wide:

  * output side (the site writes d wide: attention output, FFN output, the query/key/value
    projections of multi-head attention, every bottleneck adapter): the paper's formula
    above, h = the site's output y and z_n what each adapter writes there;
  * input side (the site reads d wide but writes another width d': the FFN's
    up/gate/intermediate projection, grouped-query attention's key/value, GPT-2's fused
    c_attn; only LoRA adapters, which is all `all-linear` puts there): the fusion acts on
    what each adapter reads. With x the site's input (d) and Delta W_n = s_n B_n A_n,

        q   = Q x + b_Q
        k_n = K A_n^T A_n x           what LoRA n reads of x, back in d space
        s   = softmax_n( q . k_n / T )
        out = sum_n s_n Delta W_n (V x)   the value matrix transforms what they read

    so at init (V = I) it is again the softmax-weighted sum of the deltas
    sum_n s_n Delta W_n x, and with one adapter and V = I it is that adapter. Folded:
    G_n = Q^T K A_n^T, r_n = A_n K^T b_Q, and per token A_n V x and s_n B_n (O(d R)).

  Size: L (3 d^2 + d) for L layers: about 12% of a BERT-style encoder, whatever the
  number of adapted modules or adapters.

- "module" (earlier fusions, and `scope="module"`): one Q, K, V per fused module, of that
  module's output width, the output-side formula at every site. Size: the sum over sites
  of 3 d_out^2 + d_out, larger than the base itself for LoRA on every linear (a d_ff-wide
  FFN projection alone costs 3 d_ff^2). A fusion config without `scope` is "module".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltahub.compose.blocks import Fuse
from deltahub.compose.inject import is_linear, linear_dims
from deltahub.errors import IncompatibleBase, InvalidArtifact, InvalidConfig, Unsupported
from deltahub.methods.common import AdapterModule, SiteDelta, copy_checked
from deltahub.methods.fusion.schema import FUSION_PARTS, FusionConfig

DeltaFn = Callable[[Tensor, Tensor, Tensor, float, Any], Tensor]


@dataclass
class Part:
    """One adapter's contribution at a site, in the affine form z = W a + c.

    `a(x, y_base, y_cur, rows)` computes the small vector a (..., r). `affine()` returns
    (W (d, r) or None for the identity, c (d,) or None), read at every forward so that a
    trained (unfrozen) adapter is seen as it is now; `sources` are the tensors W and c
    are made of (the inference cache's key).
    """

    a: Callable[[Tensor, Tensor, Tensor, Any], Tensor]
    affine: Callable[[], tuple[Tensor | None, Tensor | None]]
    sources: tuple[Tensor, ...] = ()
    down: nn.Linear | None = None  # a bottleneck's W_down: a = act(down(z)), z its input
    act: Any = None
    # A bottleneck's input z (x, y_cur, rows) -> (..., d), and what identifies where z comes
    # from: when every fused adapter reads the same z, z is also the query (AdapterHub's).
    query: Callable[[Tensor, Tensor, Any], Tensor] | None = None
    reads: Any = None
    # A LoRA's A (r, d_in), and the site's output width: the input side of a per-layer fusion.
    lora_A: Callable[[], Tensor] | None = None
    width_out: int | None = None


def _lora_part(layer: Any) -> Part:
    def a(x: Tensor, y_base: Tensor, y_cur: Tensor, rows: Any) -> Tensor:
        return F.linear(x.to(layer.lora_A.dtype), layer.lora_A)  # (..., r)

    return Part(
        a,
        lambda: (layer.lora_B * layer.scaling, None),
        (layer.lora_B, layer.lora_A),
        lora_A=lambda: layer.lora_A,
        width_out=int(layer.lora_B.shape[0]),
    )


def _bottleneck_part(layer: Any) -> Part:
    def a(x: Tensor, y_base: Tensor, y_cur: Tensor, rows: Any) -> Tensor:
        return layer.act(layer.adapter_down(layer.adapter_input(x, y_cur, rows)))  # (..., b)

    up = layer.adapter_up
    return Part(
        a,
        lambda: (up.weight * layer.scaling, up.bias * layer.scaling),
        (up.weight, up.bias, layer.adapter_down.weight, layer.adapter_down.bias),
        layer.adapter_down,
        layer.act,
        query=lambda x, y_cur, rows: layer.adapter_input(x, y_cur, rows),
        reads=(layer.reads, id(layer.stream_module), id(layer.ln)),
    )


def _opaque_part(fn: DeltaFn) -> Part:
    def a(x: Tensor, y_base: Tensor, y_cur: Tensor, rows: Any) -> Tensor:
        return fn(x, y_base, y_cur, 1.0, rows)  # z itself, (..., d)

    return Part(a, lambda: (None, None))


def part_of(fn: DeltaFn) -> Part:
    """The affine form of a child's delta: folded for LoRA and bottleneck layers."""
    layer = getattr(fn, "__self__", None)
    kind = type(layer).__name__
    if kind == "LoraLayer" and not layer.use_dora:  # type: ignore[union-attr]
        return _lora_part(layer)
    if kind == "BottleneckLayer":
        return _bottleneck_part(layer)
    return _opaque_part(fn)


@dataclass
class Folded:
    """What the output-side computation uses at one step (cached while nothing trains).

    R = sum of the adapters' widths, N their number, WC = [W_1 .. W_N | c_1 .. c_N]
    (d, R + N). Per token the site runs one GEMM on the query h, P = h Pw^T + Pb, whose
    columns are [W_down h + b_down (the first `down` = R, serial bottlenecks)] then

    - scores "fold": [h^T G_n + r_n]_n (R) and [h . g_n + e_n]_n (N), i.e. Pw holds
      (K WC)^T Q and Pb (K WC)^T b_Q;
    - scores "query": q = Q h + b_Q (d); the bilinear factors are then (q K) WC.

    and the values are w = [s_n a_n ..., s_1 .. s_N] (R + N) times U^T, U = V WC (d, R + N)
    ("fold"), or (w WC^T) V^T ("direct": never forms V WC).
    """

    Pw: Tensor  # (down + R + N, d) or (down + d, d)
    Pb: Tensor
    M: Tensor  # (R, N): 0/1, sums each adapter's columns into its score
    width: int | None  # every adapter's width when they are equal: segment sums by reshape
    down: int  # R when the a_n come from stacked down-projections (in P, or `separate`), else 0
    separate: tuple[Tensor, Tensor] | None = None  # the stacked W_down, b_down when not in P
    K: Tensor | None = None  # scores "query": the key matrix
    WC: Tensor | None = None  # scores "query" or values "direct": (d, R + N)
    U: Tensor | None = None  # values "fold": V WC (d, R + N)
    V: Tensor | None = None  # values "direct": the value matrix


@dataclass
class FoldedInput:
    """The per-step matrices of the input-side computation (LoRAs read x, d wide)."""

    G: Tensor  # (d, R): [Q^T K A_n^T]_n
    rv: Tensor  # (R,): [A_n K^T b_Q]_n
    AV: Tensor  # (R, d): [A_n V]_n
    B: Tensor  # (d_out, R): [s_n B_n]_n
    M: Tensor  # (R, N)


def _member_matrix(sizes: list[int], like: Tensor) -> Tensor:
    """(sum sizes, N) of 0/1: column n sums adapter n's block of a concatenated (..., R)."""
    M = torch.zeros(sum(sizes), len(sizes), dtype=like.dtype, device=like.device)
    start = 0
    for n, size in enumerate(sizes):
        M[start : start + size, n] = 1.0
        start += size
    return M


def layer_of(path: str) -> str:
    """The transformer layer a module belongs to: its path up to the first numbered part
    (`encoder.layer.3.attention.self.query` -> `encoder.layer.3`); a module outside the
    numbered layers (a pooler) is its own group."""
    m = re.match(r"^(.*?\.\d+)(?=\.|$)", path)
    return m.group(1) if m else path


class FusionLayer(SiteDelta):
    """Q, K, V of one site (module names as AdapterHub's: query, key, value)."""

    def __init__(self, d: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.d = d
        self.temperature = float(temperature)
        self.fusion_query = nn.Linear(d, d)
        self.fusion_key = nn.Linear(d, d, bias=False)
        self.fusion_value = nn.Linear(d, d, bias=False)
        nn.init.normal_(self.fusion_query.weight, std=0.02)  # BERT's init, as the paper's code
        nn.init.zeros_(self.fusion_query.bias)
        nn.init.normal_(self.fusion_key.weight, std=0.02)
        with torch.no_grad():
            self.fusion_value.weight.copy_(torch.eye(d) + 1e-6 * torch.randn(d, d))
        self.record = False
        self.last_attention: Tensor | None = None  # (..., N) when `record` is on
        self.last_names: list[str] | None = None  # whose attention each of the N columns is

    # ------------------------------------------------------------------ the formula

    def direct(self, h: Tensor, zs: list[Tensor]) -> tuple[Tensor, Tensor]:
        """out = sum_n s_n V z_n, s = softmax((Q h) . (K z_n) / T); returns (out, s)."""
        q = self.fusion_query(h)  # (B, T, d)
        k = torch.stack([self.fusion_key(z) for z in zs], dim=-2)  # (B, T, N, d)
        v = torch.stack([self.fusion_value(z) for z in zs], dim=-2)  # (B, T, N, d)
        s = torch.softmax((q.unsqueeze(-2) * k).sum(-1) / self.temperature, dim=-1)  # (B, T, N)
        return (s.unsqueeze(-1) * v).sum(-2), s

    def direct_input(self, x: Tensor, A: list[Tensor], deltas: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The input side as written: k_n = K A_n^T A_n x, out = sum_n s_n Delta W_n (V x)."""
        q = self.fusion_query(x)  # (B, T, d)
        k = torch.stack([self.fusion_key((x @ A_n.T) @ A_n) for A_n in A], dim=-2)  # (B, T, N, d)
        s = torch.softmax((q.unsqueeze(-2) * k).sum(-1) / self.temperature, dim=-1)  # (B, T, N)
        vx = self.fusion_value(x)  # (B, T, d)
        out = sum(s[..., n : n + 1] * (vx @ dW.T) for n, dW in enumerate(deltas))  # (B, T, d_out)
        return out, s  # type: ignore[return-value]

    # ------------------------------------------------------------------ folded

    def _stacked(self, parts: list[Part]) -> tuple[Tensor, list[int]]:
        """WC = [W_1 .. W_N | c_1 .. c_N] (d, R + N) and the widths r_n (W_n = I for an
        adapter seen from outside, c_n = 0 where it has none)."""
        K = self.fusion_key.weight
        Ws, cs, sizes = [], [], []
        for p in parts:
            W, c = p.affine()
            W = torch.eye(self.d, dtype=K.dtype, device=K.device) if W is None else W.to(K.dtype)
            Ws.append(W)
            sizes.append(W.shape[1])
            cs.append(K.new_zeros(self.d) if c is None else c.to(K.dtype))
        return torch.cat([*Ws, torch.stack(cs, dim=1)], dim=1), sizes

    def _folded_weights(
        self, parts: list[Part], down: bool = False, scores: str = "fold", values: str = "fold"
    ) -> Folded:
        """The matrices of `Folded` for `parts`; `down` stacks the bottlenecks' W_down in front."""
        Q, bq = self.fusion_query.weight, self.fusion_query.bias
        K, V = self.fusion_key.weight, self.fusion_value.weight
        WC, sizes = self._stacked(parts)
        dtype, work = K.dtype, _fold_dtype(K.dtype)
        rows, bias = [], []
        if down:  # serial bottlenecks all read the query: one GEMM gives every a_n's input
            rows += [p.down.weight.to(K.dtype) for p in parts]  # type: ignore[union-attr]
            bias += [p.down.bias.to(K.dtype) for p in parts]  # type: ignore[union-attr]
        if scores == "fold":
            KWC = K.to(work) @ WC.to(work)  # (d, R + N)
            rows.append((KWC.t() @ Q.to(work)).to(dtype))  # (R + N, d): [G_n^T]_n then [g_n^T]_n
            bias.append((KWC.t() @ bq.to(work)).to(dtype))  # [r_n]_n then [e_n]_n
        else:
            rows.append(Q)
            bias.append(bq)
        width = sizes[0] if all(r == sizes[0] for r in sizes) else None
        separate = None
        if down and rows[-1].requires_grad and not any(r.requires_grad for r in rows[:-1]):
            # Training the fusion: a stacked matrix would get a gradient for the frozen
            # W_down rows too (T d R wasted per step); two GEMMs on h cost the same forward.
            separate = (torch.cat(rows[:-1], dim=0), torch.cat(bias[:-1], dim=0))
            rows, bias = rows[-1:], bias[-1:]
        return Folded(
            torch.cat(rows, dim=0) if len(rows) > 1 else rows[0],
            torch.cat(bias, dim=0) if len(bias) > 1 else bias[0],
            _member_matrix(sizes, K),
            width,
            sum(sizes) if down else 0,
            separate,
            K=K if scores == "query" else None,
            WC=WC if scores == "query" or values == "direct" else None,
            U=(V.to(work) @ WC.to(work)).to(dtype) if values == "fold" else None,
            V=V if values == "direct" else None,
        )

    def _folded_input_weights(self, parts: list[Part]) -> FoldedInput:
        Q, bq = self.fusion_query.weight, self.fusion_query.bias
        K, V = self.fusion_key.weight, self.fusion_value.weight
        dtype, work = K.dtype, _fold_dtype(K.dtype)
        As = [p.lora_A().to(work) for p in parts]  # type: ignore[misc]  # (r_n, d) each
        A = torch.cat(As, dim=0)  # (R, d)
        KAt = K.to(work) @ A.t()  # (d, R)
        B = torch.cat([p.affine()[0].to(K.dtype) for p in parts], dim=1)  # type: ignore[union-attr]
        return FoldedInput(
            (Q.to(work).t() @ KAt).to(dtype),
            (KAt.t() @ bq.to(work)).to(dtype),
            (A @ V.to(work)).to(dtype),
            B,
            _member_matrix([a.shape[0] for a in As], K),
        )

    @staticmethod
    def _cached(cache: dict[str, Any] | None, key: Any, make: Callable[[], Any]) -> Any:
        # The folded matrices depend only on unchanged tensors: reuse them unless a gradient
        # must flow through them (the caller passes key None while Q, K, V or an adapter train).
        if cache is None or key is None:
            if cache is not None:
                cache.pop("key", None)
                cache.pop("value", None)
            return make()
        if cache.get("key") != key:
            cache["key"], cache["value"] = key, make()
        return cache["value"]

    def folded(
        self,
        h: Tensor,
        parts: list[Part],
        a: list[Tensor] | None,
        key: Any = None,
        cache: dict[str, Any] | None = None,
        plan: tuple[str, str] = ("fold", "fold"),
    ) -> tuple[Tensor, Tensor]:
        """The same as `direct` on z_n = W_n a_n + c_n, at O(d R) per token; returns (out, s).

        `a` holds each a_n; None computes them here (serial bottlenecks, in the same GEMM as
        the scores). `plan` (scores, values): "fold" or "query" / "direct" (see `Folded`);
        only ("fold", "fold") is cached.
        """
        down = a is None
        if plan == ("fold", "fold"):
            f = self._cached(cache, key, lambda: self._folded_weights(parts, down))
        else:
            f = self._folded_weights(parts, down, *plan)
        return self._run(f, h, parts, a)

    def _run(self, f: Folded, h: Tensor, parts: list[Part], a: list[Tensor] | None) -> tuple[Tensor, Tensor]:
        """Per token: one GEMM on h, the scores, softmax, one (or two) GEMMs for the values."""
        R, N = f.M.shape
        h = h if h.dtype == f.Pw.dtype else h.to(f.Pw.dtype)
        P = F.linear(h, f.Pw, f.Pb)  # (..., down + R + N) or (..., down + d)
        if f.separate is not None:
            A = parts[0].act(F.linear(h, *f.separate))  # type: ignore[misc]  # (..., R): every a_n
            rest = P
        elif f.down:
            A = parts[0].act(P[..., :R])  # type: ignore[misc]
            rest = P[..., R:]
        else:
            A = torch.cat([a_n.to(h.dtype) for a_n in a], dim=-1) if len(a) > 1 else a[0].to(h.dtype)  # type: ignore[arg-type,index]
            rest = P
        HG = rest if f.K is None else (rest @ f.K) @ f.WC  # (..., R + N): q^T K [W_n a_n + c_n]
        grad = torch.is_grad_enabled() and (HG.requires_grad or A.requires_grad)
        t = HG[..., :R] * A if grad else HG[..., :R].mul_(A)  # (..., R)
        if f.width is not None:
            scores = t.unflatten(-1, (N, f.width)).sum(-1) + HG[..., R:]  # (..., N): q . k_n
        else:
            scores = t @ f.M + HG[..., R:]
        if self.temperature != 1.0:
            scores = scores / self.temperature
        s = torch.softmax(scores, dim=-1)  # (..., N)
        if grad:
            sa = (
                (A.unflatten(-1, (N, f.width)) * s.unsqueeze(-1)).flatten(-2)
                if f.width
                else A * (s @ f.M.t())
            )
            w = torch.cat([sa, s], dim=-1)  # (..., R + N): [s_n a_n]_n, s
        else:  # written in place into one buffer: no cat
            w = A.new_empty(*A.shape[:-1], R + N)
            if f.width is not None:
                torch.mul(
                    A.unflatten(-1, (N, f.width)), s.unsqueeze(-1), out=w[..., :R].unflatten(-1, (N, f.width))
                )
            else:
                torch.mul(A, s @ f.M.t(), out=w[..., :R])
            w[..., R:] = s
        # (..., d): sum_n s_n V z_n, as U w or as V (sum_n s_n z_n)
        out = F.linear(w, f.U) if f.U is not None else F.linear(F.linear(w, f.WC), f.V)  # type: ignore[arg-type]
        return out, s

    def folded_input(
        self,
        x: Tensor,
        parts: list[Part],
        a: list[Tensor],
        key: Any = None,
        cache: dict[str, Any] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The same as `direct_input` for LoRAs (a_n = A_n x), at O(d R) per token."""
        f = self._cached(cache, key, lambda: self._folded_input_weights(parts))
        a_all = torch.cat([a_n.to(x.dtype) for a_n in a], dim=-1)  # (..., R): A_n x
        scores = ((x @ f.G + f.rv) * a_all) @ f.M  # (..., N): q . k_n
        s = torch.softmax(scores / self.temperature, dim=-1)  # (..., N)
        out = ((x @ f.AV.t()) * (s @ f.M.t())) @ f.B.t()  # (..., d_out): sum_n s_n s B_n A_n V x
        return out, s

    # ------------------------------------------------------------------ as a site delta

    def _fold_cache(self, tensors: list[Tensor]) -> dict[str, Any]:
        """The folded-matrix cache of one set of fused adapters at this layer, kept across
        activations (re-activating a fusion does not refold); it holds the tensors, so
        their ids stay theirs. At most 16 sets are kept, the oldest dropped."""
        caches: dict[tuple[int, ...], dict[str, Any]] = self.__dict__.setdefault("_fold_caches", {})
        ident = tuple(id(t) for t in tensors)
        cache = caches.pop(ident, None) or {"refs": list(tensors)}
        caches[ident] = cache
        while len(caches) > 16:
            caches.pop(next(iter(caches)))
        return cache

    def bind(self, parts: list[Part], names: list[str] | None = None, sink: Any = None) -> DeltaFn:
        """The site's delta function fusing `parts` (the children present here, `names`).

        `sink` records the attention when its `record` is on (this layer, or the site of a
        per-layer fusion)."""
        sink = self if sink is None else sink
        key_tensors = [t for p in parts for t in p.sources]
        cache = self._fold_cache(key_tensors)  # this site's folded matrices (inference)
        if any(p.width_out is not None and p.width_out != self.d for p in parts):
            return self._bind_input_side(parts, names, sink, key_tensors, cache)
        # Bottlenecks that all read the same z: z is the query and one stacked matmul gives
        # every a_n. Otherwise (LoRA, mixed inputs) the query is the module's output.
        shared = all(p.query is not None and p.reads == parts[0].reads for p in parts)
        fast = shared and all(p.down is not None and p.act is parts[0].act for p in parts)
        sizes = [self.d if W is None else int(W.shape[1]) for W in (p.affine()[0] for p in parts)]

        def delta(x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any) -> Tensor:
            h = parts[0].query(x, y_cur, rows) if shared else y_cur  # type: ignore[misc]
            if h.shape[-1] != self.d:
                raise Unsupported(
                    f"this fusion's Q, K, V are {self.d} wide, the fused module writes {h.shape[-1]}; "
                    "fuse per module (scope='module', `deltahub fuse --scope module`)"
                )
            a = None if fast else [p.a(x, y_base, y_cur, rows) for p in parts]
            key = _cache_key(key_tensors, self)
            plan = ("fold", "fold") if key is not None else _train_plan(h, sizes, self.d)
            out, s = self.folded(h, parts, a, key, cache, plan)
            if sink.record:
                sink.last_attention, sink.last_names = s.detach(), names
            return out * scale if scale != 1.0 else out

        return delta

    def _bind_input_side(
        self, parts: list[Part], names: Any, sink: Any, key_tensors: list[Tensor], cache: dict[str, Any]
    ) -> DeltaFn:
        """A site that reads d wide and writes another width: LoRAs only (see the header)."""
        for p, name in zip(parts, names or [None] * len(parts), strict=True):
            if p.lora_A is None or p.lora_A().shape[1] != self.d:
                raise Unsupported(
                    f"a per-layer fusion ({self.d} wide) cannot fuse {name or 'an adapter'} at a module "
                    f"that writes {p.width_out or 'another width'} wide unless it is a LoRA reading "
                    f"{self.d} wide; fuse per module (scope='module', `deltahub fuse --scope module`)"
                )

        def delta(x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any) -> Tensor:
            a = [p.a(x, y_base, y_cur, rows) for p in parts]
            key = _cache_key(key_tensors, self)
            out, s = self.folded_input(x.to(self.fusion_query.weight.dtype), parts, a, key, cache)
            if sink.record:
                sink.last_attention, sink.last_names = s.detach(), names
            return out * scale if scale != 1.0 else out

        return delta

    def fuse(self, children: list[DeltaFn], names: list[str]) -> DeltaFn:
        """`compose.blocks.FusingSite`: what `Fuse.compile` calls at this site."""
        return self.bind([part_of(fn) for fn in children], names)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        raise Unsupported("a fusion runs over its adapters: activate Fuse(*adapters, name=<fusion>)")


def _fold_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the folded products are formed in: fp32 for a half-precision fusion, so
    that each folded matrix is rounded once, as a stored weight is, and not once per
    product. bf16, N = 16 (tests/test_fusion_fast.py): off the fp64 formula by 1.3% of the
    largest output, against 2.9% folded in bf16 and 2.2% for the formula as written in bf16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _cache_key(tensors: list[Tensor], layer: FusionLayer) -> Any:
    """What the folded matrices depend on; None when a gradient must flow through them
    (training Q, K, V or an adapter): then they are folded again at every step."""
    every = [*tensors, *layer.parameters()]
    if torch.is_grad_enabled() and any(t.requires_grad for t in every):
        return None
    return tuple((id(t), t._version) for t in every)


def _train_plan(h: Tensor, sizes: list[int], d: int) -> tuple[str, str]:
    """While something trains (no cache): per half of the computation, folding or not,
    whichever costs fewer multiply-adds for this batch, forward plus backward.

    With T tokens and R' = R + N (R = sum of the adapters' widths), the Q, K, V gradients
    included and the adapters frozen:

    - scores, folded: (K WC)^T Q (2 d^2 R' forward, 3 d^2 R' backward) and T d R' per
      token (3 T d R' with its backward); through the query, (q K) WC: 6 T d^2 + 2 T d R'.
    - values, folded: V WC (d^2 R' forward and backward) and 3 T d R'; direct,
      V (WC w): 3 T d^2 + 2 T d R'.

    So folding pays below R' of about 6 T d / (5 d + T) for the scores and 3 T d / (2 d + T)
    for the values: on bert-base with 256 tokens, up to 5 and 6 Pfeiffer adapters.
    """
    T = h.numel() // max(1, h.shape[-1])
    Rp = sum(sizes) + len(sizes)
    scores = "fold" if 5 * d * d * Rp + 3 * T * d * Rp <= 6 * T * d * d + 2 * T * d * Rp else "query"
    values = "fold" if 2 * d * d * Rp + 3 * T * d * Rp <= 3 * T * d * d + 2 * T * d * Rp else "direct"
    return scores, values


class LayerSite(SiteDelta):
    """One fused module of a per-layer fusion: its layer's Q, K, V (shared), its own record."""

    def __init__(self, layer: FusionLayer) -> None:
        super().__init__()
        self.layer = layer
        self.record = False
        self.last_attention: Tensor | None = None
        self.last_names: list[str] | None = None

    @property
    def d(self) -> int:
        return self.layer.d

    @property
    def fusion_query(self) -> nn.Linear:
        return self.layer.fusion_query

    @property
    def fusion_key(self) -> nn.Linear:
        return self.layer.fusion_key

    @property
    def fusion_value(self) -> nn.Linear:
        return self.layer.fusion_value

    def fuse(self, children: list[DeltaFn], names: list[str]) -> DeltaFn:
        return self.layer.bind([part_of(fn) for fn in children], names, sink=self)

    def delta(self, x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any = None) -> Tensor:
        raise Unsupported("a fusion runs over its adapters: activate Fuse(*adapters, name=<fusion>)")


def hidden_width(base: nn.Module) -> int:
    config = getattr(base, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        width = getattr(config, attr, None)
        if isinstance(width, int):
            return width
    raise IncompatibleBase(
        f"cannot tell the hidden size of {type(base).__name__} for a per-layer fusion; fuse per module"
    )


def _placed(layer: FusionLayer, module: nn.Module) -> FusionLayer:
    ref = next(iter(module.parameters()), None)
    if ref is not None and ref.is_floating_point():
        layer.to(device=ref.device, dtype=ref.dtype)
    return layer


class Fusion(AdapterModule):
    """The fusion parameters, resident in an `AdaptedModel` like an adapter.

    Per module (`scope="module"`): `paths`/`layers` are the fused modules and their
    `FusionLayer`s. Per layer: `groups`/`group_layers` are the transformer layers and their
    `FusionLayer`s, and `paths`/`layers` the fused modules seen so far, each a `LayerSite`
    over its layer's `FusionLayer` (made on first use: a loaded fusion learns its modules
    from the adapters it is activated with).
    """

    method = "fusion"

    @property
    def scope(self) -> str:
        return str(self.config.get("scope", "module"))

    def fusion_layers(self) -> list[FusionLayer]:
        """Each Q, K, V once (per module: one per site; per layer: one per layer)."""
        return list(self.group_layers) if self.scope == "layer" else list(self.layers)  # type: ignore[arg-type]

    def fusion_paths(self) -> list[str]:
        """Where each of `fusion_layers` sits: the prefix of its tensors' names."""
        return list(self.groups) if self.scope == "layer" else list(self.paths)

    def delta_at(self, path: str) -> SiteDelta | None:
        if self.scope != "layer" or path in self._by_path:
            return super().delta_at(path)
        group = self._group_index.get(layer_of(path))
        if group is None:
            return None
        site = LayerSite(self.group_layers[group])  # type: ignore[arg-type]
        self.paths.append(path)
        self.layers.append(site)
        self._by_path[path] = site
        return site

    @classmethod
    def _build_layers(cls, base: nn.Module, cfg: FusionConfig, sites: list[str], groups: list[str]) -> Fusion:
        d = hidden_width(base)
        layers = []
        for group in groups:
            try:
                module = base.get_submodule(group)
            except AttributeError:
                raise IncompatibleBase(
                    f"fusion layer {group!r} does not exist in {type(base).__name__}"
                ) from None
            layers.append(_placed(FusionLayer(d, cfg.temperature), module))
        fusion = cls(cfg.to_dict(), [], [])
        fusion.groups = list(groups)
        fusion.group_layers = nn.ModuleList(layers)
        fusion._group_index = {g: i for i, g in enumerate(groups)}
        for site in sites:
            fusion.delta_at(site)
        return fusion

    @classmethod
    def _build(cls, base: nn.Module, cfg: FusionConfig, sites: list[str]) -> Fusion:
        if cfg.scope == "layer":
            return cls._build_layers(base, cfg, sites, list(dict.fromkeys(layer_of(s) for s in sites)))
        width = getattr(getattr(base, "config", None), "hidden_size", None)
        layers = []
        for path in sites:
            try:
                module = base.get_submodule(path)
            except AttributeError:
                raise IncompatibleBase(
                    f"fusion site {path!r} does not exist in {type(base).__name__}"
                ) from None
            d = linear_dims(module)[1] if is_linear(module) else width
            if not isinstance(d, int):
                raise IncompatibleBase(f"cannot tell the output width of fusion site {path!r}")
            layers.append(_placed(FusionLayer(d, cfg.temperature), module))
        return cls(cfg.to_dict(), sites, layers)

    @classmethod
    def create(cls, base: nn.Module, config: dict[str, Any]) -> Fusion:
        """Fresh fusion parameters at `config["sites"]` (see `deltahub.fusion.add_fusion`)."""
        sites = config.get("sites")
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) for s in sites):
            raise InvalidConfig("a fusion config needs 'sites': the module paths its adapters change")
        try:
            cfg = FusionConfig.from_dict({k: v for k, v in config.items() if k != "sites"})
        except InvalidArtifact as e:
            raise InvalidConfig(str(e)) from None
        return cls._build(base, cfg, list(dict.fromkeys(sites)))

    @classmethod
    def from_tensors(
        cls,
        base: nn.Module,
        config: dict[str, Any],
        keys: list[str],
        get: Callable[[str], Tensor],
        adapter: str,
    ) -> Fusion:
        cfg = FusionConfig.from_dict(config)
        prefixes = list(dict.fromkeys(k.rsplit(".", 2)[0] for k in keys))
        if cfg.scope == "layer":
            model = cls._build_layers(base, cfg, [], prefixes)
        else:
            model = cls._build(base, cfg, prefixes)
        expected = set(model.tensors())
        if set(keys) != expected:
            odd = sorted(set(keys) ^ expected)[0]
            raise IncompatibleBase(f"fusion {adapter!r}: tensor {odd!r} does not fit this base")
        with torch.no_grad():
            for name, param in model.named_tensors().items():
                copy_checked(param, get(name), f"fusion {adapter!r}: {name}")
        model.requires_grad_(False)
        return model

    def named_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for path, layer in zip(self.fusion_paths(), self.fusion_layers(), strict=True):
            for part in FUSION_PARTS:
                module, attr = part.split(".")
                out[f"{path}.{part}"] = getattr(getattr(layer, module), attr)
        return out

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.named_tensors().items()}

    @property
    def adapter_names(self) -> list[str]:
        return list(self.config["adapters"])

    def block(self, name: str) -> Any:
        """`Fuse(*its adapters, name=name)`: what activating the fusion by name means."""
        return Fuse(*self.adapter_names, name=name)

    def regularization(self) -> Tensor:
        """sum over sites of ||V - I||^2 (the paper's penalty keeping V near the identity)."""
        total = None
        for layer in self.fusion_layers():
            V = layer.fusion_value.weight
            t = ((V - torch.eye(V.shape[0], device=V.device, dtype=V.dtype)) ** 2).sum()
            total = t if total is None else total + t
        return total  # type: ignore[return-value]

    def set_record(self, on: bool) -> None:
        for layer in self.layers:
            layer.record = on
            layer.last_attention = None

    @classmethod
    def record_attentions(cls, model: Any, call: Callable[[], Any]) -> Any:
        """`AdaptedModel.forward(..., return_fusion_attentions=True)`: see `forward_with_attentions`."""
        return forward_with_attentions(model, call)

    @classmethod
    def prepare_load(cls, model: Any, artifact: Any, registry: Any) -> None:
        """Before the fusion's own tensors load: bring in its constituents, pinned by digest."""
        from deltahub.fusion.artifact import load_constituents

        load_constituents(model, artifact, registry)


def add_fusion(
    model: Any, name: str, adapters: list[str], temperature: float = 1.0, scope: str = "layer"
) -> Fusion:
    """Fresh, trainable fusion parameters over resident `adapters`, registered as `name`
    (`scope`: "layer", one Q, K, V per transformer layer; "module", one per fused module)."""
    if not adapters:
        raise InvalidConfig("a fusion needs at least one adapter")
    sites = fused_sites(model, adapters)
    model.add_adapter(
        name,
        {
            "method": "fusion",
            "adapters": list(adapters),
            "temperature": temperature,
            "scope": scope,
            "sites": sites,
        },
    )
    fusion = model.get_adapter(name)
    return fusion  # type: ignore[no-any-return]


def fused_sites(model: Any, adapters: list[str]) -> list[str]:
    return list(dict.fromkeys(p for a in adapters for p in model.get_adapter(a).paths))


def fusion_size(base: nn.Module, sites: list[str], scope: str) -> dict[str, Any]:
    """What a fusion over `sites` stores, before it is made: {"parameters", "bytes" (fp32),
    "base_parameters", "base_bytes", "ratio"} (bytes of the base as loaded)."""
    if scope == "layer":
        d = hidden_width(base)
        count = len(dict.fromkeys(layer_of(s) for s in sites)) * (3 * d * d + d)
    else:
        count = 0
        for path in sites:
            module = base.get_submodule(path)
            d_out = linear_dims(module)[1] if is_linear(module) else hidden_width(base)
            count += 3 * d_out * d_out + d_out
    base_params = sum(p.numel() for p in base.parameters())
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    return {
        "scope": scope, "parameters": count, "bytes": 4 * count, "base_parameters": base_params,
        "base_bytes": base_bytes, "ratio": 4 * count / max(base_bytes, 1),
    }  # fmt: skip


def fusions(model: Any) -> dict[str, Fusion]:
    """The resident fusions of an `AdaptedModel`, by name."""
    return {n: a for n, a in ((n, model.get_adapter(n)) for n in model.adapters) if isinstance(a, Fusion)}


def collect_attentions(model: Any) -> dict[str, dict[str, Tensor]]:
    """{fusion name: {site: attention (..., N)}} recorded by the last forward."""
    out: dict[str, dict[str, Tensor]] = {}
    for name, fusion in fusions(model).items():
        sites = {p: layer.last_attention for p, layer in zip(fusion.paths, fusion.layers, strict=True)}
        out[name] = {p: s for p, s in sites.items() if s is not None}
    return out


def forward_with_attentions(model: Any, call: Callable[[], Any]) -> Any:
    """Run `call()` with attention recording on; attach `fusion_attentions` to its output."""
    active = fusions(model)
    for fusion in active.values():
        fusion.set_record(True)
    try:
        out = call()
        att = collect_attentions(model)
    finally:
        for fusion in active.values():
            fusion.set_record(False)
    try:
        out["fusion_attentions"] = att
    except TypeError:
        out = (*out, att) if isinstance(out, tuple) else out
    return out
