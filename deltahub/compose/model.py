"""`AdaptedModel`: many adapters resident on one frozen base, switched by pointer.

    model = AdaptedModel(load_base("path/to/base"))
    model.load("sentiment@2")                 # registry ref -> name "sentiment"
    model.load("topic")
    model.activate("sentiment")               # or Sum("sentiment", "topic", weights=[1, .5])
    model(**batch).logits                     # the base's signature and outputs
    model(**batch, adapter_names=["sentiment", "topic", None])   # one adapter per row

The base is wrapped, never copied. Adapters live in their own modules (`get_adapter`);
the base's modules stay where they are and keep their parameter names. Each module an
adapter changes is a `Site`: activation compiles the composition at every site and
installs the result as that module's `forward` (an instance attribute), so switching
adapters copies no weight, and a deactivated model runs the plain base code.

An adapter loaded from the registry keeps its tensors as views of its blob's memory map
(`compose.mapped`) unless they need a cast or a move: a thousand resident LoRAs cost the
pages their forwards touch, not a thousand copies (`load_stats` says what each holds).

`merge(name)` folds a LoRA into the base weights, keeping a copy of each weight it
changed so that `unmerge` restores the base bit for bit; merges unwind in reverse order.
On a quantized base merging requantizes (lossy), so it needs `allow_lossy=True` and
returns a report of the output error it introduced (`deltahub.compose.quant`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltahub import artifact as af
from deltahub.compose.base import fingerprint_of
from deltahub.compose.blocks import Block, DeltaFn, Node, as_block, check_composition
from deltahub.compose.inject import Site, is_bnb_linear
from deltahub.compose.mapped import LoadStats, read_tensors
from deltahub.compose.routing import Route, routed_forward
from deltahub.compose.slots import DEFAULT_SLOTS, SlotBank, SlotTable, gatherable
from deltahub.errors import AlreadyExists, IncompatibleBase, InvalidConfig, NotFound, Unsupported
from deltahub.fileformat import TASK_HEAD_PREFIX as HEAD_PREFIX
from deltahub.methods import get_method
from deltahub.methods.common import AdapterModule


def _block_forward(base_forward: Any, fn: DeltaFn) -> Any:
    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        y = base_forward(x, *args, **kwargs)
        d = fn(x, y, y, 1.0, None)
        if y.requires_grad or d.requires_grad or y.dtype != d.dtype:
            return y + d.to(y.dtype)
        return y.add_(d)

    return forward


class AdaptedModel(nn.Module):
    """A frozen base plus resident adapters; calls pass through to the base."""

    def __init__(self, base: nn.Module, registry: Any = None) -> None:
        super().__init__()
        self.base = base
        self.adapter_modules = nn.ModuleDict()  # registered so .to()/.parameters() see them
        self.registry = registry
        self._adapters: dict[str, AdapterModule] = {}
        self._keys: dict[str, str] = {}
        self._digests: dict[str, str | None] = {}
        self._sites: dict[str, Site] = {}
        self._active: Node | None = None
        self._active_paths: set[str] = set()
        self._merged: list[tuple[str, dict[str, Any]]] = []
        self.merge_reports: dict[str, Any] = {}  # name -> quant.MergeReport (quantized bases)
        self._counter = 0
        self.fingerprint = fingerprint_of(base)
        # Per-row routing's slot buffers (`deltahub.compose.slots`): how many adapters one
        # batch gathers; more are paged in least-recently-used first.
        self.routing_slots = DEFAULT_SLOTS
        self._slot_table: SlotTable | None = None
        # name -> what a loaded adapter holds as views of its blob's map vs copies.
        self.load_stats: dict[str, LoadStats] = {}

    # ------------------------------------------------------------------ pass-through

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)

    def forward(
        self,
        *args: Any,
        adapter_names: Sequence[str | None] | None = None,
        return_fusion_attentions: bool = False,
        **kwargs: Any,
    ) -> Any:
        if return_fusion_attentions:  # output gains `fusion_attentions` {fusion: {site: (B, T, N)}}
            # The fusion runtime comes from the method registry: compose never imports fusion.
            return get_method("fusion").record_attentions(
                self, lambda: self.forward(*args, adapter_names=adapter_names, **kwargs)
            )
        if adapter_names is None:
            return self.base(*args, **kwargs)
        with self.routing(adapter_names):
            return self.base(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return self.base.generate(*args, **kwargs)
        with self.routing(adapter_names):
            return self.base.generate(*args, **kwargs)

    # ------------------------------------------------------------------ resident adapters

    @property
    def adapters(self) -> list[str]:
        """Names of the resident adapters, in load order."""
        return list(self._adapters)

    @property
    def active(self) -> Node | None:
        return self._active

    def get_adapter(self, name: str) -> AdapterModule:
        try:
            return self._adapters[name]
        except KeyError:
            raise NotFound(
                f"no adapter {name!r} is loaded (loaded: {', '.join(self._adapters) or 'none'})"
            ) from None

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of one adapter (what a trainer optimizes)."""
        return list(self.get_adapter(name).parameters())

    def adapter_state_dict(self, name: str) -> dict[str, Tensor]:
        """The adapter's tensors under its artifact key names (PEFT's, for LoRA)."""
        return dict(self.get_adapter(name).tensors())

    def adapter_config(self, name: str) -> dict[str, Any]:
        return dict(self.get_adapter(name).config)

    def _register(self, name: str, adapter: AdapterModule, digest: str | None) -> str:
        if not isinstance(name, str) or not af.ADAPTER_NAME_RE.match(name.replace("/", "-")):
            raise InvalidConfig(f"adapter name {name!r} must be letters, digits, '_', '.', '-' (and one '/')")
        if name in self._adapters:
            raise AlreadyExists(
                f"an adapter named {name!r} is already loaded; unload it or pass another name"
            )
        self._counter += 1
        key = f"a{self._counter}"
        self.adapter_modules[key] = adapter
        self._adapters[name], self._keys[name], self._digests[name] = adapter, key, digest
        for path in adapter.paths:
            if path not in self._sites:
                self._sites[path] = Site(self.base.get_submodule(path), path)
        adapter.attach(self.base)
        return name

    def add_adapter(self, name: str, config: dict[str, Any]) -> str:
        """A fresh, trainable adapter (identity at init) from a config such as
        `{"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}`
        or `{"method": "bottleneck", "variant": "pfeiffer", "reduction_factor": 16}`."""
        adapter = get_method(af.method_of(config)).create(self.base, config)
        adapter.requires_grad_(True)
        return self._register(name, adapter, None)

    def load(self, ref: str, force: bool = False, name: str | None = None) -> str:
        """Load a registry reference (`name`, `name@3`, `name@tag`, `name@sha256:...`); return its name.

        Loading the same version again under the same name is a no-op.
        """
        registry = self.registry
        if registry is None:
            from deltahub.registry import Registry

            registry = self.registry = Registry()
        version = registry.resolve(ref)
        name = name or version.full_name
        if name in self._adapters and self._digests.get(name) == version.digest:
            return name
        artifact = registry.open(version)
        return self._attach_artifact(artifact, name, version.ref, force, version.digest)

    def load_path(self, path: str | Path, name: str, force: bool = False) -> str:
        """Load an artifact directory (ours or a PEFT one) under `name`."""
        return self._attach_artifact(af.load_dir(path), name, str(path), force, None)

    def _attach_artifact(
        self, artifact: af.Artifact, name: str, where: str, force: bool, digest: str | None
    ) -> str:
        if name in self._adapters:
            raise AlreadyExists(
                f"an adapter named {name!r} is already loaded (another version); unload it, or load this one "
                "under another name (name=...; `deltahub run a@1 a@2` names both versions itself)"
            )
        manifest = artifact.manifest
        wanted = manifest.base_fingerprint if manifest else None
        if wanted and wanted != self.fingerprint and not force:
            raise IncompatibleBase(
                f"{where} was built for base {manifest.base_model or '?'} with fingerprint {wanted[:19]}..., "
                f"this base has {self.fingerprint[:19]}...; pass --force (force=True in Python) to load it anyway"
            )
        cls = get_method(artifact.method)
        prepare = getattr(cls, "prepare_load", None)
        if prepare is not None:  # a fusion loads its constituents (pinned by digest) first
            prepare(self, artifact, self.registry)
        # A trained task head rides along under HEAD_PREFIX (deltahub.fusion.head loads it).
        keys = [k for k in artifact.tensors if not k.startswith(HEAD_PREFIX)]
        # A registry blob (digest known) is immutable: its tensors stay views of its map
        # (`compose.mapped`); a directory's file may be rewritten in place, so it is copied.
        with read_tensors(artifact.weights_path, digest is not None, artifact.tensors) as reader:
            adapter = cls.from_tensors(self.base, artifact.config, keys, reader.get, name)
            stats = reader.stats(adapter, getattr(adapter, "kept", None))
        adapter.requires_grad_(False)
        self._register(name, adapter, digest)
        self.load_stats[name] = stats
        return name

    def save_adapter(self, name: str, directory: str | Path, manifest: af.Manifest | None = None) -> Path:
        """Write the adapter as an artifact directory (for LoRA, one PEFT loads)."""
        adapter = self.get_adapter(name)
        if manifest is None:
            from deltahub.compose.base import base_model_id

            base_id = base_model_id(self.base)
            manifest = af.Manifest(
                name=name.rsplit("/", 1)[-1],
                method=adapter.method,
                base_model=base_id,
                base_fingerprint=self.fingerprint,
            )
        return af.write_dir(directory, adapter.tensors(), adapter.config, manifest)

    def unload(self, name: str) -> None:
        """Remove a resident adapter (deactivating it first when it is active alone)."""
        adapter = self.get_adapter(name)
        if any(n == name for n, _ in self._merged):
            raise Unsupported(f"adapter {name!r} is merged into the base; unmerge({name!r}) first")
        if self._active is not None and name in _names(self._active):
            if self._active != name:
                raise Unsupported(
                    f"adapter {name!r} is part of the active {self._active!r}; deactivate() first"
                )
            self.deactivate()
        adapter.detach()
        if self._slot_table is not None:
            self._slot_table.forget(name)
        del self.adapter_modules[self._keys.pop(name)]
        del self._adapters[name], self._digests[name]
        self.load_stats.pop(name, None)

    # ------------------------------------------------------------------ activation

    def _lookup(self, name: str, path: str) -> DeltaFn | None:
        d = self.get_adapter(name).delta_at(path)
        return None if d is None else d.delta

    def _check_usable(self, names: list[str]) -> None:
        for n in names:
            self.get_adapter(n)
            if any(n == m for m, _ in self._merged):
                raise Unsupported(
                    f"adapter {n!r} is merged into the base already; unmerge({n!r}) to activate it"
                )

    def activate(self, target: Node | Sequence[str]) -> None:
        """Make an adapter name or a composition block (Stack/Sum/Average/Fuse) active."""
        if isinstance(target, str) and hasattr(self._adapters.get(target), "block"):
            # A fusion activates as Fuse(its adapters, name=it).
            target = self._adapters[target].block(target)  # type: ignore[operator]
        block = as_block(target)
        names = _names(block)
        self._check_usable(names)
        check_composition(block, {n: self._adapters[n] for n in names})
        paths = {p for n in names for p in self._adapters[n].paths}
        fns: dict[str, Any] = {}
        for path in paths:
            site = self._sites[path]
            if isinstance(block, str):
                fns[path] = self._adapters[block].delta_at(path).single(site.base_forward)  # type: ignore[union-attr]
            else:
                fn = block.compile(path, self._lookup)
                if fn is not None:
                    fns[path] = _block_forward(site.base_forward, fn)
        for path in self._active_paths - fns.keys():
            self._sites[path].set(None)
        for path, fn in fns.items():
            self._sites[path].set(fn)
        self._set_active(block)
        self._active, self._active_paths = block, set(fns)

    def _set_active(self, block: Node | None) -> None:
        """Tell adapters that leave or join the active set (prompt/prefix forward hooks)."""
        old = set(_names(self._active)) if self._active is not None else set()
        new = set(_names(block)) if block is not None else set()
        for n in old - new:
            if n in self._adapters:
                self._adapters[n].set_active(self.base, False)
        for n in new - old:
            self._adapters[n].set_active(self.base, True)

    def deactivate(self) -> None:
        """Run the plain base (merged adapters stay merged)."""
        for path in self._active_paths:
            self._sites[path].set(None)
        self._set_active(None)
        self._active, self._active_paths = None, set()

    @contextlib.contextmanager
    def routing(self, adapter_names: Sequence[str | None]) -> Iterator[Route]:
        """Within the block, each row runs its own adapter (None: the base alone)."""
        route = Route(adapter_names)
        self._check_usable(route.keys)
        for n in route.keys:
            if "route" not in getattr(self._adapters[n], "supports", ("route",)):
                raise Unsupported(
                    f"adapter {n!r} ({self._adapters[n].method}) cannot be routed per row: it changes "
                    "the sequence, not just the rows; run its rows in a separate batch with activate()"
                )
        adapters = [self._adapters[n] for n in route.keys]
        paths = {p for a in adapters for p in a.paths}
        saved = {p: self._sites[p].module.__dict__.get("forward") for p in paths | self._active_paths}
        # Base-level hooks of the active block (soft prompts) would reach every row: suspend them.
        hooked = [self._adapters[n] for n in (_names(self._active) if self._active is not None else [])]
        for a in hooked:
            a.set_active(self.base, False)
        try:
            for path in self._active_paths - paths:
                self._sites[path].set(None)
            slots = self._assign_slots(route, adapters, paths)
            for path in paths:
                site = self._sites[path]
                deltas = [a.delta_at(path) for a in adapters]
                bank, gathered = self._slot_bank(path, route, deltas, slots)
                fns = [None if d is None else d.delta for d in deltas]
                marks = [n in gathered for n in route.keys]
                site.set(routed_forward(site.base_forward, fns, route, bank, marks))
            yield route
        finally:
            for path, fn in saved.items():
                site = self._sites[path]
                if fn is None:
                    site.set(None)
                else:
                    site.module.forward = fn
            for a in hooked:
                a.set_active(self.base, True)

    def _assign_slots(self, route: Route, adapters: list[AdapterModule], paths: set[str]) -> dict[str, int]:
        """Slots for the batch's adapters that have a gatherable site (`slots.SlotTable`)."""
        names = [
            n
            for n, a in zip(route.keys, adapters, strict=True)
            if any(gatherable(a.delta_at(p)) for p in a.paths if p in paths)
        ]
        if not names:
            return {}
        # One adapter gets a slot too: on a CPU its rows then run in place on views of it
        # (`slots.segmented_add_`); where that does not pay, its own matmuls run instead.
        table = self._slot_table
        if table is None or table.capacity != self.routing_slots:
            table = self._slot_table = SlotTable(self.routing_slots)
        route.slots = table.assign(names)
        return route.slots

    def _slot_bank(
        self, path: str, route: Route, deltas: list[Any], slots: dict[str, int]
    ) -> tuple[SlotBank | None, set[str]]:
        """The bank at `path` with each slotted adapter's factors in its slot (cleared where
        the adapter is not gathered here), and the adapters gathered here (None, empty: none)."""
        if not slots:
            return None, set()
        table = self._slot_table
        assert table is not None
        bank: SlotBank | None = table.banks.get(path)
        used: set[str] = set()
        for n, d in zip(route.keys, deltas, strict=True):
            slot = slots.get(n, 0)
            if not slot:
                continue
            if d is not None and gatherable(d):
                b = table.bank(path, d)
                if b is not None:
                    b.put(slot, d, table.capacity)
                    bank = b
                    used.add(n)
                    continue
            if bank is not None:
                bank.clear(slot)
        if not used or bank is None:
            return None, set()
        bank.ensure(max(slots.values()), table.capacity)  # every row's slot index exists here
        return bank, used

    # ------------------------------------------------------------------ merging

    def merge(self, name: str, allow_lossy: bool = False, probe: dict[str, Tensor] | None = None) -> Any:
        """Fold a LoRA adapter into the base weights (exactly undone by `unmerge`).

        On a quantized base the merged weights are requantized, which changes the
        outputs: that needs `allow_lossy=True`, and returns a `quant.MergeReport` (also
        kept in `merge_reports[name]`) of the output change on `probe` (the model's
        inputs; default: a seeded batch of random token ids). A full-precision base
        returns None.
        """
        adapter = self.get_adapter(name)
        if not adapter.mergeable:
            raise Unsupported(f"adapter {name!r} ({adapter.method}) cannot be merged into the base weights")
        self._check_usable([name])
        quantized = [p for p in adapter.paths if is_bnb_linear(self.base.get_submodule(p))]
        if quantized and not allow_lossy:
            raise Unsupported(
                f"merging {name!r} into this quantized base requantizes {len(quantized)} layers, which changes "
                "its outputs; pass allow_lossy=True to merge anyway (you get a report of the error), keep the "
                f"adapter unmerged, or export a full-precision merged model (`deltahub export REF --merged --base PATH OUT`)"
            )
        if self._active is not None and name in _names(self._active):
            if self._active != name:
                raise Unsupported(
                    f"adapter {name!r} is part of the active {self._active!r}; deactivate() first"
                )
            self.deactivate()
        before = inputs = None
        if quantized:
            from deltahub.compose import quant

            inputs = probe if probe is not None else quant.default_probe(self.base)
            before = self._probe(inputs, name)
        backups: dict[str, Any] = {}
        try:
            for path, layer in zip(adapter.paths, adapter.layers, strict=True):
                backups[path] = layer.merge()  # type: ignore[operator]
        except Exception:
            for path, layer in zip(adapter.paths, adapter.layers, strict=True):
                if path in backups:
                    layer.unmerge(backups[path])  # type: ignore[operator]
            raise
        self._merged.append((name, backups))
        if before is None:
            return None
        after = self._probe(inputs, None)  # type: ignore[arg-type]
        diff = (after.float() - before.float()).abs()
        report = quant.MergeReport(
            adapter=name,
            quantization=quant.quantization_of(self.base) or "?",
            layers=len(quantized),
            max_abs=float(diff.max()),
            mean_abs=float(diff.mean()),
            reference_max_abs=float(before.float().abs().max()),
            weight_max_abs=max(float(getattr(layer, "merge_error", 0.0)) for layer in adapter.layers),
            probe_shape=list(before.shape),
        )
        self.merge_reports[name] = report
        return report

    @torch.no_grad()
    def _probe(self, inputs: dict[str, Tensor], name: str | None) -> Tensor:
        """The output on `inputs` with adapter `name` alone (None: the base), activation untouched."""
        from deltahub.compose.quant import model_output

        batch = next(iter(inputs.values())).shape[0]
        was_training = self.base.training
        self.base.eval()
        try:
            return model_output(self.forward(**inputs, adapter_names=[name] * batch)).detach().clone()
        finally:
            self.base.train(was_training)

    def unmerge(self, name: str) -> None:
        """Restore the base weights saved by `merge(name)`; merges unwind last-first."""
        if not any(n == name for n, _ in self._merged):
            raise NotFound(
                f"adapter {name!r} is not merged (merged: {[n for n, _ in self._merged] or 'none'})"
            )
        last, backups = self._merged[-1]
        if last != name:
            raise Unsupported(f"unmerge {last!r} first: merges are undone in reverse order")
        adapter = self._adapters[name]
        for path, layer in zip(adapter.paths, adapter.layers, strict=True):
            layer.unmerge(backups[path])  # type: ignore[operator]
        self._merged.pop()
        self.merge_reports.pop(name, None)

    @property
    def merged(self) -> list[str]:
        return [n for n, _ in self._merged]


def _names(node: Node) -> list[str]:
    return [node] if isinstance(node, str) else node.names()


__all__ = ["AdaptedModel", "Block"]
