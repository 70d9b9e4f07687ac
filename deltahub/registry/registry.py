"""The local registry: versioned adapter artifacts in SQLite plus a blob store.

`Registry` is assembled from one module per job:
  - `publish.py`: publish, commit (push/pull), tag, untag, remove;
  - `queries.py`: resolve, list, search, versions, open, export (all index-served, paged);
  - `maintenance.py`: verify and gc;
  - `version.py`: `Version`, `Page` and the reports; `db.py`: the schema and its migrations.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from deltahub.errors import InvalidConfig
from deltahub.registry.db import connect
from deltahub.registry.evals import Evaluations
from deltahub.registry.maintenance import Upkeep
from deltahub.registry.publish import Writes
from deltahub.registry.store import BlobStore, storage_error
from deltahub.registry.version import GcReport, Page, VerifyReport, Version, version_key
from deltahub.settings import default_home

_version_key = version_key  # the name older callers imported

__all__ = ["GcReport", "Page", "Registry", "VerifyReport", "Version"]


class Registry(Writes, Upkeep, Evaluations):
    """A local adapter registry rooted at `home` (default `$DELTAHUB_HOME` or ~/.deltahub)."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(e, self.home) or InvalidConfig(
                f"cannot create the registry home {self.home} ({e.strerror}): "
                "point DELTAHUB_HOME at a directory you can write"
            ) from None
        self.store = BlobStore(self.home)
        self.db = connect(self.home / "registry.db")
        # Crash leftovers: temp files whose writing process is gone, whatever their age
        # (a read-only home keeps them until a writable open).
        with contextlib.suppress(OSError):
            self.store.sweep_tmp(math.inf)

    def close(self) -> None:
        self.db.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"
