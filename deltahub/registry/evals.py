"""Evaluations recorded on a version: `deltahub eval REF --data FILE --record`.

A version is immutable (its manifest is part of its digest), so a score measured after
publishing cannot go into it. It goes into a side table instead, `evals`, one row per
measurement: the version, the metric, its value, the digest of the data it was measured
on and how many rows, the base it ran on, and when. `show` prints them beside the
manifest's own metrics; removing the version removes its evaluations.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from deltahub.errors import InvalidConfig
from deltahub.registry.db import write_transaction
from deltahub.registry.queries import Queries
from deltahub.registry.refs import Ref
from deltahub.registry.version import Version


class Evaluations(Queries):
    """Record and read evaluations of versions (the `evals` table)."""

    def record_eval(
        self,
        ref: str | Ref | Version,
        metrics: dict[str, float],
        *,
        data_digest: str,
        rows: int,
        base: str | None = None,
    ) -> list[dict[str, Any]]:
        """Store each of `metrics` as measured on `ref` over data `data_digest` (`rows` rows)."""
        for key, value in metrics.items():
            if not key or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidConfig(f"metric {key!r}={value!r} is not a name and a finite number")
        created = datetime.now(UTC).isoformat(timespec="seconds")
        with write_transaction(self.db):
            v = ref if isinstance(ref, Version) else self.resolve(ref)
            for key, value in sorted(metrics.items()):
                self.db["evals"].insert(
                    {
                        "version_id": v.id,
                        "metric": key,
                        "value": float(value),
                        "data_digest": data_digest,
                        "rows": rows,
                        "base": base,
                        "created": created,
                    }
                )
        return self.evals(v)

    def evals(self, ref: str | Ref | Version) -> list[dict[str, Any]]:
        """The evaluations recorded on `ref`, oldest first."""
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        rows = self.db.execute(
            "select metric, value, data_digest, rows, base, created from evals "
            "where version_id = ? order by id",
            [v.id],
        ).fetchall()
        keys = ("metric", "value", "data_digest", "rows", "base", "created")
        return [dict(zip(keys, row, strict=True)) for row in rows]


def summary(evals: list[dict[str, Any]]) -> list[str]:
    """One line per recorded evaluation, for `show`."""
    return [
        f"{e['metric']}={e['value']:.4g} on {e['rows']} rows ({e['data_digest'][:19]}) {e['created'][:16]}"
        for e in evals
    ]


__all__ = ["Evaluations", "summary"]
