"""Predictions on the hub: `deltahub serve --predict-base PATH` (opt-in), and `/health`.

    GET  /health        {"status": "ok", "version": ..., "predict": bool}     no token
    POST /v1/predict    {"adapters": [ref, ...], "inputs": [text, ...],        read (on each
                         "mode": "single|sum|average|stack", "weights": [...],  adapter's name)
                         "max_new_tokens": 20}
                        -> {"adapters": [...], "composition": "...", "predictions": [...]}

A process pays for importing torch and loading the base once, at startup; each request
loads the adapters it names (kept, up to `MAX_RESIDENT`, by digest) from the hub's stores:
the embedded registry in place, or PostgreSQL + S3 with blobs copied once into a local
cache by digest (`StoreRegistry`). It answers with `deltahub.training.inference.predict`'s
dicts, the same shape `deltahub run --json` prints. One request runs at a time on the model (a lock), in a
worker thread so the server keeps answering other routes. Reads need a read token
covering every adapter named, as pulling them would.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from deltahub import __version__
from deltahub.errors import InvalidConfig, NotFound
from deltahub.hub.responses import StrictJSONResponse
from deltahub.hub.state import hub_state

MAX_INPUTS = 256
MAX_ADAPTERS = 8
MAX_RESIDENT = 16  # adapters kept loaded between requests
MAX_NEW_TOKENS = 512


class _Chunks:
    """A `read()` over an iterator of byte chunks (a blob streaming from the hub's store)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks

    def read(self, n: int = -1) -> bytes:
        return next(self._chunks, b"")


class StoreRegistry:
    """What `AdaptedModel` asks of a registry (resolve, by_digest, open), over the hub's
    own stores: versions from its metadata store (PostgreSQL), blobs from its blob store
    (S3) copied once into a local content-addressed cache, hash-checked as they land and
    again whenever the cached file changes (registry/store.py), so a flipped byte never loads.
    """

    def __init__(self, hub: Any, cache: Path) -> None:
        from deltahub.registry.store import BlobStore

        self.hub = hub
        self.home = cache
        self.cache = BlobStore(cache)

    def resolve(self, ref: Any) -> Any:
        return self.hub.registry_for_thread().resolve(ref)

    def by_digest(self, digest: str) -> Any:
        row = self.hub.registry_for_thread().one(
            "select full_name, version from versions where digest = %s order by id limit 1", [digest]
        )
        if row is None:
            raise NotFound(f"no version with digest {digest} on this hub")
        return self.resolve(f"{row['full_name']}@{row['version']}")

    def open(self, ref: Any) -> Any:
        from deltahub import artifact as af
        from deltahub.registry.version import Version

        v = ref if isinstance(ref, Version) else self.resolve(ref)
        paths = {}
        for fname, digest in v.files.items():
            if not self.cache.has(digest):
                self.cache.put_stream(_Chunks(iter(self.hub.store.chunks(digest))), digest)
            paths[fname] = self.cache.verified_path(digest)
        return af.load_files(paths)


class Predictor:
    """A base loaded once; adapters loaded per request, by version, from `registry`
    (default: the registry at `home`)."""

    def __init__(
        self,
        base: str | Path,
        home: Path,
        *,
        device: str | None = None,
        quantize: str | None = None,
        registry: Any = None,
    ) -> None:
        from transformers import AutoTokenizer

        from deltahub.compose.base import load_base
        from deltahub.compose.model import AdaptedModel
        from deltahub.registry import Registry

        self.base = str(base)
        self.tokenizer = AutoTokenizer.from_pretrained(self.base, local_files_only=True)
        self.registry = registry if registry is not None else Registry(home)
        self.model = AdaptedModel(
            load_base(self.base, device=device, quantize=quantize), registry=self.registry
        )
        self.resident: OrderedDict[str, str] = OrderedDict()  # digest -> adapter name, oldest first
        self.lock = threading.Lock()

    def _load(self, ref: str) -> str:
        v = self.registry.resolve(ref)
        name = self.resident.get(v.digest)
        if name is None:
            name = f"{v.full_name}.v{v.version.replace('+', '-')}"
            self.model.load(v.ref, name=name)
            self.resident[v.digest] = name
        self.resident.move_to_end(v.digest)
        return name

    def _evict(self, keep: set[str]) -> None:
        for digest, name in list(self.resident.items()):
            if len(self.resident) <= MAX_RESIDENT:
                break
            if name not in keep:
                self.model.unload(name)
                del self.resident[digest]

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        from deltahub.training.inference import check_texts, composition, predict

        refs, texts = body.get("adapters"), body.get("inputs")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise InvalidConfig('"adapters" must be a non-empty list of refs')
        if len(refs) > MAX_ADAPTERS:
            raise InvalidConfig(f"at most {MAX_ADAPTERS} adapters a request")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InvalidConfig('"inputs" must be a list of texts')
        if not 1 <= len(texts) <= MAX_INPUTS:
            raise InvalidConfig(f"give 1 to {MAX_INPUTS} inputs a request")
        check_texts(texts)
        mode, weights = body.get("mode", "single"), body.get("weights")
        max_new = body.get("max_new_tokens", 20)
        if not isinstance(max_new, int) or not 1 <= max_new <= MAX_NEW_TOKENS:
            raise InvalidConfig(f'"max_new_tokens" must be an integer in 1..{MAX_NEW_TOKENS}')
        with self.lock:
            names = [self._load(ref) for ref in refs]
            target = composition(names, mode, weights)
            self.model.activate(target)
            try:
                answers = predict(self.model, self.tokenizer, texts, head_ref=refs[0], max_new_tokens=max_new)
            finally:
                self.model.deactivate()
            self._evict(set(names))
        return {"adapters": names, "composition": repr(target), "predictions": answers}


async def health(request: Request) -> Response:
    predictor = getattr(request.app.state, "predictor", None)
    return StrictJSONResponse({"status": "ok", "version": __version__, "predict": predictor is not None})


async def predict_route(request: Request) -> Response:
    from deltahub.hub.api import read_json
    from deltahub.registry.refs import parse_ref

    hub = hub_state(request)
    body = await read_json(request)
    refs = body.get("adapters")
    for ref in refs if isinstance(refs, list) else []:
        if isinstance(ref, str):
            await run_in_threadpool(hub.authorize, request, "read", parse_ref(ref).full_name)
    if not refs:
        await run_in_threadpool(hub.authorize, request, "read")
    predictor = request.app.state.predictor
    return StrictJSONResponse(await run_in_threadpool(predictor.predict, body))


def routes(predict: bool) -> list[Route]:
    """`/health`, and `/v1/predict` when the server was started with a base to predict with."""
    out = [Route("/health", health, methods=["GET"])]
    if predict:
        out.append(Route("/v1/predict", predict_route, methods=["POST"]))
    return out


def predictor_for(hub: Any, base: str | Path, **kw: Any) -> Predictor:
    """A `Predictor` reading adapters from the hub's stores: the embedded registry in
    place, or PostgreSQL + S3 through a blob cache under the hub's home
    (`predict-cache/`, content-addressed: several servers may share one home)."""
    if str(getattr(hub.meta, "url", "sqlite:")).startswith("sqlite:"):
        return Predictor(base, getattr(hub.meta, "home", hub.home), **kw)
    return Predictor(base, hub.home, registry=StoreRegistry(hub, Path(hub.home) / "predict-cache"), **kw)
