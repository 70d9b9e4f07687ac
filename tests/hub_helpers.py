"""Fixtures for the hub tests: a real server on 127.0.0.1, tokens of every kind, adapters."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltahub import artifact as af
from deltahub.hub.server import ServerThread
from deltahub.hub.tokens import TokenStore
from deltahub.registry import Registry


def lora_dir(path: Path, seed: int = 0, r: int = 4, layers: int = 2) -> Path:
    """A PEFT-format LoRA directory for the tiny Llama of tests/helpers.py (no PEFT needed)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, out in (("q_proj", 64), ("v_proj", 32)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, 64, generator=g) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-llama",
    }
    return af.write_dir(path, tensors, config)


@dataclass
class Hub:
    """A running hub: its URL, home, and one token of each kind."""

    url: str
    home: Path
    server: ServerThread
    tokens: dict[str, str]

    def registry(self) -> Registry:
        return Registry(self.home)


def make_tokens(home: Path) -> dict[str, str]:
    store = TokenStore(home)
    tokens = {
        "read": store.create("read")[0],
        "write": store.create("write", namespace="team")[0],
        "write_other": store.create("write", namespace="other")[0],
        "admin": store.create("admin")[0],
    }
    revoked, info = store.create("write")
    store.revoke(info.id)
    tokens["revoked"] = revoked
    expired, info = store.create("write", expires_days=1)
    with store.db.conn:  # an hour in the past: the check must use the clock, not just the row
        store.db["tokens"].update(info.id, {"expires": time.time() - 3600})
    tokens["expired"] = expired
    store.close()
    return tokens


def start_hub(tmp_path: Path) -> Iterator[Hub]:
    """A hub server for one test; use as `yield from start_hub(tmp_path)` in a fixture."""
    home = tmp_path / "server-home"
    Registry(home).close()
    tokens = make_tokens(home)
    with ServerThread(home) as server:
        yield Hub(server.url, home, server, tokens)


def published(home: Path, name: str = "team/alpha", seed: int = 0, **kw: object) -> Registry:
    """A registry at `home` with one version of `name` published from a fresh LoRA dir."""
    reg = Registry(home)
    src = home.parent / f"src-{name.replace('/', '-')}-{seed}"
    kw.setdefault("description", f"adapter {name} seed {seed}")
    reg.publish(lora_dir(src, seed), name, **kw)  # type: ignore[arg-type]
    return reg


def export_bytes(reg: Registry, ref: str, out: Path) -> dict[str, bytes]:
    path = reg.export(ref, out)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@contextmanager
def serve_app(app: Any) -> Iterator[str]:
    """Any ASGI app (a fake hub) on 127.0.0.1 and a free port; yields its URL, stops it after."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake hub did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
