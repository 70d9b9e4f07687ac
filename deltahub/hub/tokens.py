"""Bearer tokens for the hub server: created once, stored only as SHA-256, scoped.

A token is `dh_` + 43 url-safe characters (256 random bits). The hub database
(`hub.db` in the server's home, schema by sqlite-utils `Migrations`) keeps its SHA-256,
a short non-secret prefix (so `token list` can show which is which and a lookup needs
no secret-dependent query), its scope, namespace, expiry and revocation time. A
presented token is hashed and compared with `hmac.compare_digest`, so the comparison
time does not depend on how much of the hash matches. A dump of the database holds no
usable token: 256 bits minus a 9-character prefix cannot be guessed from a hash.

Scopes are ordered: read < write < admin. A namespace limits a token to adapters named
`namespace/...` (reads and writes); a token without one covers every name. Blobs are
scoped per namespace too (hubdb.py): a namespaced token reads only blobs linked to its
namespace by an upload or a commit there.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltahub.errors import AuthError, InvalidConfig, NotFound
from deltahub.hub import hubdb
from deltahub.registry.refs import _PART

TOKEN_PREFIX = "dh_"
LOOKUP_CHARS = 12  # "dh_" + 9 characters: shown by `token list`, never enough to use
SCOPES = ("read", "write", "admin")
_RANK = {s: i for i, s in enumerate(SCOPES)}

# The schema lives in hubdb.py (tokens share hub.db with the blob links and checks).
migrations = hubdb.migrations


@dataclass(frozen=True)
class TokenInfo:
    """What a token may do (never the token itself)."""

    id: int
    lookup: str
    scope: str
    namespace: str | None
    description: str
    created: float
    expires: float | None
    revoked: float | None

    @property
    def active(self) -> bool:
        return self.revoked is None and (self.expires is None or self.expires > time.time())

    def covers(self, full_name: str | None) -> bool:
        """True if this token's namespace allows the adapter `full_name`."""
        if self.namespace is None:
            return True
        return full_name is not None and full_name.startswith(self.namespace + "/")

    def allows(self, need: str) -> bool:
        return _RANK[self.scope] >= _RANK[need]

    def to_dict(self) -> dict[str, Any]:
        status = "revoked" if self.revoked else ("expired" if not self.active else "active")
        return {
            "id": self.id,
            "prefix": self.lookup + "…",
            "scope": self.scope,
            "namespace": self.namespace,
            "description": self.description,
            "created": _iso(self.created),
            "expires": _iso(self.expires) if self.expires else None,
            "status": status,
        }


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """The tokens of one hub home (`<home>/hub.db`). One instance per thread."""

    def __init__(self, home: Path | str) -> None:
        self.db = hubdb.connect(home)

    def close(self) -> None:
        self.db.conn.close()

    def create(
        self,
        scope: str,
        namespace: str | None = None,
        expires_days: float | None = None,
        description: str = "",
    ) -> tuple[str, TokenInfo]:
        """Make a new token; return it (shown once, never stored) and its record."""
        if scope not in SCOPES:
            raise InvalidConfig(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
        if namespace is not None:
            import re

            if not re.fullmatch(_PART, namespace):
                raise InvalidConfig(
                    f"namespace {namespace!r} is not a valid namespace (letters, digits, '_.-')"
                )
        if expires_days is not None and expires_days <= 0:
            raise InvalidConfig(f"--expires must be a positive number of days, got {expires_days}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        row = {
            "lookup": token[:LOOKUP_CHARS],
            "hash": hash_token(token),
            "scope": scope,
            "namespace": namespace,
            "description": description,
            "created": now,
            "expires": now + expires_days * 86400 if expires_days is not None else None,
            "revoked": None,
        }
        pk = self._insert(row)
        return token, self._info(self._get(pk))

    def list(self) -> list[TokenInfo]:
        return [self._info(r) for r in self._rows()]

    def revoke(self, token_id: int | str) -> TokenInfo:
        """Revoke by numeric id, by the exact prefix `token list` shows, or by the token."""
        rows = self._find(token_id)
        if len(rows) != 1:
            what = "no token" if not rows else "several tokens"
            raise NotFound(f"{what} match {token_id!r}; give the id from `deltahub token list`")
        self._update(rows[0]["id"], {"revoked": time.time()})
        return self._info(self._get(rows[0]["id"]))

    def _find(self, token_id: int | str) -> list[dict[str, Any]]:
        """Rows matching a numeric id, the exact prefix `token list` shows, or a whole token.

        Exact and case-sensitive: a prefix is compared as a string, never as a pattern.
        """
        text = str(token_id).strip().rstrip("…")
        if text.isascii() and text.isdigit():
            return self._rows("id", int(text))
        if len(text) > LOOKUP_CHARS:  # a whole token: match its hash
            digest = hash_token(text)
            return [
                r for r in self._rows("lookup", text[:LOOKUP_CHARS]) if hmac.compare_digest(r["hash"], digest)
            ]
        return [r for r in self._rows("lookup", text) if r["lookup"] == text]

    def check(self, token: str | None) -> TokenInfo:
        """The record of a presented token; `AuthError` if unknown, revoked or expired."""
        if not token:
            raise AuthError("this hub needs a token: run `deltahub login REMOTE` or set DELTAHUB_TOKEN")
        digest = hash_token(token)
        found = None
        for row in self._rows("lookup", token[:LOOKUP_CHARS]):
            if hmac.compare_digest(row["hash"], digest):
                found = row
        if found is None:
            raise AuthError("the token is not valid on this hub (check `deltahub login`)")
        info = self._info(found)
        if info.revoked is not None:
            raise AuthError("the token was revoked; ask the hub admin for a new one")
        if not info.active:
            raise AuthError("the token has expired; ask the hub admin for a new one")
        return info

    # Row access: the only part a store on another database (pgmeta.PgTokens) replaces.

    def _insert(self, row: dict[str, Any]) -> int:
        with self.db.conn:
            return self.db["tokens"].insert(row).last_pk

    def _get(self, pk: int) -> dict[str, Any]:
        return self.db["tokens"].get(pk)

    def _rows(self, column: str | None = None, value: Any = None) -> list[dict[str, Any]]:
        if column is None:
            return list(self.db["tokens"].rows_where(order_by="id"))
        assert column in ("id", "lookup")
        return list(self.db["tokens"].rows_where(f"{column} = ?", [value], order_by="id"))

    def _update(self, pk: int, values: dict[str, Any]) -> None:
        with self.db.conn:
            self.db["tokens"].update(pk, values)

    @staticmethod
    def _info(row: dict[str, Any]) -> TokenInfo:
        return TokenInfo(
            id=row["id"],
            lookup=row["lookup"],
            scope=row["scope"],
            namespace=row["namespace"],
            description=row["description"] or "",
            created=row["created"],
            expires=row["expires"],
            revoked=row["revoked"],
        )


class ThreadLocalTokens:
    """One `TokenStore` per thread: a sqlite connection is not for concurrent use."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._local = threading.local()

    def get(self) -> TokenStore:
        store = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = TokenStore(self.home)
        return store
