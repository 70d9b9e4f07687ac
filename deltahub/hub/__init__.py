"""deltahub.hub: everything across a network.

    server.py     `deltahub serve`: the app, its connection limits, running it (uvicorn)
    api.py        the registry routes (list, search, resolve, manifest, commit, tags)
    blobs.py      blob upload and verified download
    hf_routes.py  the Hugging Face Hub download routes on that server
    state.py      what the routes share: home, per-thread handles, the access policy
    auth.py       bearer tokens from requests; per-client back-off on failed auth
    responses.py  error types -> HTTP statuses; strict JSON; nothing internal to clients
    hubdb.py      hub.db: tokens, blob links per namespace, blob checks
    tokens.py     bearer tokens (SHA-256 only, scoped, expiring, revocable)
    remotes.py    named remotes and stored tokens in the client's home
    client.py     HubClient, push, pull, search
    hf.py         push to / pull from the Hugging Face Hub

Names load lazily, so importing deltahub.hub (and `deltahub --help`) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "HubClient": "deltahub.hub.client",
    "push": "deltahub.hub.client",
    "pull": "deltahub.hub.client",
    "search": "deltahub.hub.client",
    "create_app": "deltahub.hub.server",
    "serve": "deltahub.hub.server",
    "ServerThread": "deltahub.hub.server",
    "TokenStore": "deltahub.hub.tokens",
    "push_to_hf": "deltahub.hub.hf",
    "pull_from_hf": "deltahub.hub.hf",
    "build_hf_folder": "deltahub.hub.hf",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltahub.hub' has no attribute {name!r}")
