"""Paths, environment variables and limits shared by every part of deltahub."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "DELTAHUB_HOME"
TOKEN_ENV = "DELTAHUB_TOKEN"

# Artifact validation caps (see artifact.py).
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 100_000
MAX_CONFIG_BYTES = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20
MAX_NAME_LENGTH = 512

# gc never deletes an unreferenced blob younger than this, so it cannot race a publisher
# that has written its blobs but not yet committed its version row.
DEFAULT_GC_GRACE_SECONDS = 3600


def default_home() -> Path:
    """The registry home: `$DELTAHUB_HOME`, else `~/.deltahub`."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".deltahub"
