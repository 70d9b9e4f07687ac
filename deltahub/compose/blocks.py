"""Composition blocks: how several resident adapters act together.

A composition is a small tree whose leaves are adapter names. At every base module that
some adapter in the tree changes (a "site"), the tree is compiled once, at `activate`,
into one function giving the change of that module's output. With `y0` the base
module's output, `x` its input and d_i the change adapter i alone makes:

- `Sum(a, b, weights=[w_a, w_b])`: y = y0 + sum_i w_i d_i. For LoRA and rsLoRA,
  d_i = s_i B_i A_i x, so y = (W + sum_i w_i s_i B_i A_i) x + b, the exact weighted sum
  of the deltas (each adapter keeps its own scaling s_i). For DoRA, d_i is the adapter's
  whole output change, (m_i/n_i - 1) W x + (m_i/n_i) s_i B_i A_i x: Sum adds each DoRA
  adapter's effect as if it alone were applied, rather than re-normalizing a summed
  direction (which would not reduce to the adapter at one weight of 1).
- `Average(a, b, weights=[...])`: a weighted average of the adapted outputs,
  y = sum_i p_i (y0 + d_i) = y0 + sum_i p_i d_i with p = weights / sum(weights),
  normalized exactly once at construction, so `Average(a, a) == a`. Default weights
  are equal. Averaging happens at every site. This is not AdapterHub's `Average`:
  `adapters` 1.3 takes `mean(stack(out_i) * p)`, dividing by N a second time,
  (1/N) sum_i p_i out_i, and for serial bottleneck adapters out_i includes the
  sub-layer output h, so it computes LN(x + h/N + (1/N) sum_i p_i A_i) (LoRA: the
  deltas scaled by 1/N again; IA3: two identity vectors average to 0.5); its
  Average(a, a) is not a. tests/fixtures/adapterhub/SPEC.md 4.2 has the derivation.
- `Stack(a, b)`: apply a, then b on a's result. Serial bottleneck adapters read the
  running output, so b sees a's output: y = y1 + f_b(y1), y1 = y0 + f_a(y0). LoRA (and
  DoRA, and parallel bottleneck adapters) read the module input, which stacking does not
  change; so on one module a stack of LoRAs equals their `Sum` with weights 1, i.e.
  (W + Δ_a + Δ_b) x — the same as merging a into W and then applying b on top.
- `Fuse(a, b, ..., name=f)`: learned AdapterFusion with the resident fusion parameters
  `f`; the fusion's sites implement `FusingSite` (`deltahub.fusion.layer`), so this module
  never imports the fusion part.

Blocks nest (`Sum(Stack("a", "b"), "c")`). A weight on a nested block scales each delta
inside it.

Composition rules per method (checked by `check_composition` at `activate` and for
per-row routing; `composition_rules()` returns this table):

| method | Stack | Sum | Average | Fuse | per-row | merge |
|---|---|---|---|---|---|---|
| lora / rslora | = Sum with weights 1 (reads the module input) | exact sum of deltas W + sum w_i s_i B_i A_i | y0 + sum p_i d_i | yes | yes | exact |
| dora | = Sum with weights 1 | each adapter's effect added | y0 + sum p_i d_i | yes | yes | exact |
| bottleneck (serial) | b reads a's output: y1 + f_b(y1) | y0 + sum w_i f_i(y0) | y0 + sum p_i f_i(y0) | yes | yes | no |
| bottleneck (parallel) | = Sum with weights 1 | y0 + sum w_i f_i(x) | y0 + sum p_i f_i(x) | yes | yes | no |
| ia3 | refused (the product of vectors: merge a, activate b) | offsets add: l = 1 + sum w_i (l_i - 1) | vectors averaged: l = sum p_i l_i | yes | yes | exact |
| bitfit | shifts add (= Sum with weights 1) | b = b0 + sum w_i db_i | b = b0 + sum p_i db_i | no | yes | exact |
| ssf | affine maps compose: g_b (g_a y + b_a) + b_b | y0 + sum w_i ((g_i - 1) y0 + b_i) | g, b averaged: sum p_i g_i, sum p_i b_i | no | yes | exact |
| prompt / prefix / ptuning-v2 | refused | refused | refused | refused | refused | no (they add positions, not weights) |
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, Union, runtime_checkable

from torch import Tensor

from deltahub.errors import IncompatibleBase, InvalidConfig, Unsupported

# (x, y_base, y_cur, scale, rows) -> change of the module output
DeltaFn = Callable[[Tensor, Tensor, Tensor, float, Any], Tensor]
Node = Union[str, "Block"]
Lookup = Callable[[str, str], "DeltaFn | None"]  # (adapter name, site path) -> its delta there


class Block:
    """A node of a composition tree over adapter names."""

    def __init__(self, *children: Node, weights: Sequence[float] | None = None) -> None:
        if not children:
            raise InvalidConfig(f"{type(self).__name__}() needs at least one adapter")
        for child in children:
            if not isinstance(child, (str, Block)):
                raise InvalidConfig(
                    f"{type(self).__name__} takes adapter names or blocks, got {type(child).__name__}"
                )
        self.children: tuple[Node, ...] = tuple(children)
        if weights is None:
            weights = [1.0] * len(children)
        weights = [float(w) for w in weights]
        if len(weights) != len(children):
            raise InvalidConfig(
                f"{type(self).__name__} got {len(weights)} weights for {len(children)} adapters; give one each"
            )
        self.weights: tuple[float, ...] = tuple(weights)

    def names(self) -> list[str]:
        """Adapter names in the tree, in order, without repeats."""
        out: list[str] = []
        for child in self.children:
            for name in [child] if isinstance(child, str) else child.names():
                if name not in out:
                    out.append(name)
        return out

    def compile(self, path: str, lookup: Lookup) -> DeltaFn | None:
        raise NotImplementedError

    def _children(self, path: str, lookup: Lookup) -> list[tuple[float, DeltaFn]]:
        out = []
        for w, child in zip(self.weights, self.children, strict=True):
            fn = lookup(child, path) if isinstance(child, str) else child.compile(path, lookup)
            if fn is not None:
                out.append((w, fn))
        return out

    def __repr__(self) -> str:
        args = ", ".join(repr(c) for c in self.children)
        return f"{type(self).__name__}({args}, weights={list(self.weights)})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.children == other.children and self.weights == other.weights  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children, self.weights))


class Sum(Block):
    """y0 + sum_i w_i d_i: the exact weighted sum of the adapters' deltas (weights default 1)."""

    def compile(self, path: str, lookup: Lookup) -> DeltaFn | None:
        parts = self._children(path, lookup)
        if not parts:
            return None

        def delta(x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any) -> Tensor:
            out = None
            for w, fn in parts:
                t = fn(x, y_base, y_cur, scale * w, rows)
                out = t if out is None else out + t
            return out  # type: ignore[return-value]

        return delta


class Average(Sum):
    """The weighted average of the adapted outputs: weights normalized once, here."""

    def __init__(self, *children: Node, weights: Sequence[float] | None = None) -> None:
        super().__init__(*children, weights=weights)
        total = sum(self.weights)
        if total == 0:
            raise InvalidConfig(
                f"Average weights {list(self.weights)} sum to zero; they cannot be normalized"
            )
        self.weights = tuple(w / total for w in self.weights)


class Stack(Block):
    """Apply the children in order, each on the previous one's output (see module doc)."""

    def __init__(self, *children: Node) -> None:
        super().__init__(*children)

    def compile(self, path: str, lookup: Lookup) -> DeltaFn | None:
        parts = [fn for _, fn in self._children(path, lookup)]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]

        def delta(x: Tensor, y_base: Tensor, y_cur: Tensor, scale: float, rows: Any) -> Tensor:
            cur, total = y_cur, None
            for fn in parts:
                t = fn(x, y_base, cur, scale, rows)
                cur = cur + t
                total = t if total is None else total + t
            return total  # type: ignore[return-value]

        return delta

    def __repr__(self) -> str:
        return f"Stack({', '.join(repr(c) for c in self.children)})"


@runtime_checkable
class FusingSite(Protocol):
    """The site object behind a fusion adapter's delta: it fuses the children's deltas.

    `Fuse` finds it as the `__self__` of the fusion's delta function at a site; the
    fusion part (`deltahub.fusion.layer.FusionLayer`) implements it, so compose never
    imports fusion.
    """

    def fuse(self, children: list[DeltaFn], names: list[str]) -> DeltaFn: ...


class Fuse(Block):
    """AdapterFusion over the children's outputs, with the resident fusion parameters `name`."""

    def __init__(self, *children: Node, name: str | None = None) -> None:
        super().__init__(*children)
        self.name = name

    def compile(self, path: str, lookup: Lookup) -> DeltaFn | None:
        if not self.name:
            raise InvalidConfig(
                f"Fuse({', '.join(map(repr, self.children))}) needs name=<a loaded fusion>: the fusion "
                "parameters to use (train them with deltahub.fuse or `deltahub fuse`)"
            )
        children, names = [], []
        for child in self.children:
            fn = lookup(child, path) if isinstance(child, str) else child.compile(path, lookup)
            if fn is not None:
                children.append(fn)
                names.append(child if isinstance(child, str) else repr(child))
        if not children:
            return None
        try:
            fusion_fn = lookup(self.name, path)
        except Exception as e:  # NotFound from the model names the loaded adapters
            raise type(e)(f"Fuse(name={self.name!r}): {e}") from None
        site = getattr(fusion_fn, "__self__", None)
        if not isinstance(site, FusingSite):
            raise IncompatibleBase(
                f"{self.name!r} has no fusion parameters at {path!r}, which the fused adapters change; "
                f"is it a fusion over these adapters ({', '.join(map(repr, self.children))})?"
            )
        return site.fuse(children, names)


def as_block(target: Node | Sequence[str]) -> Node:
    """A name, a block, or a list of names (read as `Stack(*names)`)."""
    if isinstance(target, (str, Block)):
        return target
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target):
        return target[0] if len(target) == 1 else Stack(*target)
    raise InvalidConfig(
        f"activate() takes an adapter name or a block (Stack/Sum/Average/Fuse), got {target!r}"
    )


def composition_rules() -> str:
    """The per-method composition table (Markdown), as in this module's docstring."""
    doc = __doc__ or ""
    start = doc.index("| method |")
    return doc[start:].strip() + "\n"


def _kind(block: Block) -> str:
    return {Stack: "stack", Sum: "sum", Average: "average", Fuse: "fuse"}.get(
        type(block), type(block).__name__
    )


def check_composition(node: Node, adapters: dict[str, Any]) -> None:
    """Raise `Unsupported` if a block combines adapters whose method gives it no meaning.

    `adapters` maps names to `AdapterModule`s; each declares the compositions it supports
    in `supports` ("stack", "sum", "average", "fuse", "route").
    """
    if isinstance(node, str):
        return
    kind = _kind(node)
    for name in node.names():
        adapter = adapters[name]
        supported = getattr(adapter, "supports", None)
        if supported is not None and kind not in supported:
            raise Unsupported(
                f"{type(node).__name__} over {adapter.method} adapter {name!r} has no meaning here "
                f"({adapter.method} supports: {', '.join(sorted(supported)) or 'activation alone'}); "
                "see deltahub.compose.blocks.composition_rules()"
            )
    for child in node.children:
        check_composition(child, adapters)
