"""A ref, resolved and written out verified into a directory keyed by its digest.

    <serving dir>/<64 hex of the digest>/   adapter_model.safetensors, adapter_config.json, deltahub.json

The serving dir is `$DELTAHUB_SERVING_DIR`, else `<registry home>/serving`. A directory
is written once (exported to a temporary name, every file re-hashed against its digest,
then renamed), so a reader never sees half an adapter, and two versions never share one.

Where the ref is resolved: with `$DELTAHUB_REMOTE` (a remote name from `deltahub remote
add`, or a hub URL) a ref that names a tag or a version is asked of the hub first (tags
move there), and a pinned digest already in the local registry is not; without it, the
local registry (`$DELTAHUB_HOME`) answers. Pulls are verified blob by blob
(`deltahub.hub.client.pull`). The token is `$DELTAHUB_TOKEN`, else the one `deltahub login`
stored for that remote.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from deltahub.errors import AlreadyExists, NotFound
from deltahub.registry import Registry, Version, parse_ref
from deltahub.settings import TOKEN_ENV

REMOTE_ENV = "DELTAHUB_REMOTE"
SERVING_DIR_ENV = "DELTAHUB_SERVING_DIR"


def serving_dir(registry: Registry) -> Path:
    env = os.environ.get(SERVING_DIR_ENV)
    return Path(env).expanduser() if env else Path(registry.home) / "serving"


def _hub_client(remote: str, registry: Registry):  # -> HubClient
    from deltahub.hub.client import HubClient

    if remote.startswith(("http://", "https://")):
        return HubClient(remote, os.environ.get(TOKEN_ENV) or None)
    return HubClient.for_remote(remote, registry.home)


def resolve_version(ref: str, registry: Registry, remote: str | None = None) -> Version:
    """The version `ref` names: from the hub `remote` (pulled, verified) or the local registry."""
    remote = remote if remote is not None else os.environ.get(REMOTE_ENV) or None
    pinned = parse_ref(ref).kind == "digest"
    if remote and pinned:
        try:
            return registry.resolve(ref)
        except NotFound:
            pass
    if remote:
        from deltahub.hub.client import pull

        with _hub_client(remote, registry) as client:
            return pull(ref, client, registry)
    return registry.resolve(ref)


def materialize(
    ref: str, registry: Registry | None = None, remote: str | None = None, directory: Path | None = None
) -> tuple[Version, Path]:
    """(version, its digest-keyed directory), writing the directory if it is not there yet."""
    reg = registry or Registry()
    v = resolve_version(ref, reg, remote)
    root = directory or serving_dir(reg)
    root.mkdir(parents=True, exist_ok=True)
    out = root / v.digest.split(":", 1)[1]
    if _complete(out, v):
        return v, out
    tmp = root / f".{out.name}.{uuid.uuid4().hex}.tmp"  # threads of one server share a pid
    shutil.rmtree(tmp, ignore_errors=True)
    reg.export(f"{v.full_name}@{v.digest}", tmp)  # copies and re-hashes every file against its digest
    try:
        os.replace(tmp, out)
    except OSError:
        # Another process wrote it first (a non-empty target): theirs is the same bytes.
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(out, v):
            raise AlreadyExists(f"{out} exists but does not hold {v.ref}; remove it") from None
    return v, out


def _complete(path: Path, v: Version) -> bool:
    """Every file of `v` is in `path` (each was re-hashed before the directory was renamed in)."""
    if not path.is_dir():
        return False
    return all((path / f).is_file() for f in v.files)


__all__ = ["REMOTE_ENV", "SERVING_DIR_ENV", "materialize", "resolve_version", "serving_dir"]
