"""Webhooks: tell other systems when a version is published or a tag moves.

    deltahub webhook add https://fleet.example.com/reload --event tag.moved --ns team

A serving fleet reloads an adapter when `team/x@prod` moves, without polling. Each hook
has a URL, its events (`version.published`, `tag.moved`), an optional namespace, and a
secret made at creation (shown by `webhook add`, kept in the metadata store).

Delivery: a POST of a JSON body

    {"event": "tag.moved", "delivery": "<uuid>", "timestamp": 1767225600.0,
     "adapter": "team/x", "tag": "prod", "version": "3", "previous": "2", "digest": "sha256:..."}

with headers `X-Deltahub-Event`, `X-Deltahub-Delivery` and `X-Deltahub-Signature:
sha256=<hex HMAC-SHA256 of the body under the hook's secret>` (check it with
`verify_signature`, comparing in constant time; the timestamp inside the signed body
lets a receiver refuse replays). Any 2xx is success; anything else, or no answer within
`timeout` seconds, is retried after `base_delay * 2**attempt` seconds (at most
`max_delay`), `attempts` times in all. Every delivery's outcome (status, attempts, last
error) goes to the delivery log (`deltahub webhook log`).

Deliveries are durable. One `pending` row per matching hook, holding the exact body, is
written in the very transaction that publishes the version or moves the tag (`outbox_rows`;
PostgreSQL: into `deliveries`; the embedded store: into registry.db's `hub_outbox`, moved
to hub.db's `deliveries` right after the commit, or by the next claim if the server died
first): a change that commits has its deliveries, one that rolls back has none. A request
only writes those rows, and never waits for a receiver. Worker threads in
every server process claim due rows (PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED`,
so two processes never take the same row), make one attempt each, and record the
outcome on the row: delivered, failed (out of attempts), or pending again with the next
attempt due after the back-off. A claim is a lease: a server killed mid-delivery leaves
its row pending, and any server (the restarted one included) takes it once the lease
ends (`lease`, longer than any attempt). Rows left due by a killed server are taken as
soon as a server starts. So a delivery is at-least-once: a server killed after the
receiver answered but before the outcome was written sends it again, with the same
`X-Deltahub-Delivery` id, by which a receiver drops the repeat. Every attempt sends the
same signed body, so its timestamp is the event's time, not the attempt's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

log = logging.getLogger("deltahub.hub.webhooks")

SIGNATURE_HEADER = "X-Deltahub-Signature"
WORKERS = 4
POLL_S = 5.0  # idle workers look for rows due (another server's leftovers) this often


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` (X-Deltahub-Signature) signs `body` under `secret`, compared in constant time."""
    return bool(header) and hmac.compare_digest(sign(secret, body), header or "")


def outbox_rows(
    hooks: Callable[[str, str], list[dict[str, Any]]],
    name: str,
    v: Any,
    *,
    created: bool,
    before: dict[str, str | None],
) -> list[dict[str, Any]]:
    """The delivery rows a change makes, for its store to write in the change's transaction.

    `v` is the version committed or tagged, `created` whether the commit added it,
    `before` each tag asked for and the version it named before the change. Events:
    `version.published` if created, `tag.moved` for each of those tags that moved.
    `hooks(event, name)` lists the hooks that want an event.
    """
    events: list[tuple[str, dict[str, Any]]] = []
    if created:
        events.append(("version.published", {"version": v.version, "digest": v.digest, "tags": list(v.tags)}))
    for tag, previous in before.items():
        if previous != v.version:
            events.append(
                ("tag.moved", {"tag": tag, "version": v.version, "previous": previous, "digest": v.digest})
            )
    now = time.time()
    rows = []
    for event, data in events:
        for hook in hooks(event, name):
            payload = {
                "event": event,
                "delivery": str(uuid.uuid4()),
                "timestamp": now,
                "adapter": name,
                **data,
            }
            body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
            rows.append(
                {"hook_id": hook["id"], "event": event, "delivery": payload["delivery"], "url": hook["url"],
                 "payload": body, "due": now}
            )  # fmt: skip
    return rows


class Dispatcher:
    """Deliver the rows the store's changes wrote (`outbox_rows`), on background threads.

    `attempts` tries in all, `base_delay * 2**(attempt - 1)` seconds apart (at most
    `max_delay`), each with `timeout` seconds to answer; a claim lasts `lease` seconds
    (default `2 * timeout + 30`).
    """

    def __init__(
        self,
        meta: Any,
        *,
        attempts: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        timeout: float = 10.0,
        lease: float | None = None,
        workers: int = WORKERS,
        poll: float = POLL_S,
    ) -> None:
        self.meta = meta
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.lease = lease
        self.workers = workers
        self.poll = poll
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def notify(self) -> None:
        """A change committed (maybe with delivery rows): a worker looks for due rows now."""
        self.start()
        self._wake.set()

    def start(self) -> None:
        """Start the workers (at server start, so rows a killed server left are delivered)."""
        with self._lock:
            if self._threads or self._stop.is_set():
                return
            for i in range(self.workers):
                t = threading.Thread(target=self._run, name=f"deltahub-webhooks-{i}", daemon=True)
                t.start()
                self._threads.append(t)

    def _run(self) -> None:
        token = uuid.uuid4().hex
        while not self._stop.is_set():
            self._wake.clear()  # before the claim: a notify after it wakes us again
            try:
                rows, soonest = self.meta.handle().claim(1, self._lease(), token)
            except Exception:
                log.exception("cannot claim webhook deliveries")
                rows, soonest = [], None
            if not rows:
                wait = self.poll if soonest is None else min(self.poll, max(0.01, soonest - time.time()))
                self._wake.wait(wait)
                continue
            try:
                self._attempt(rows[0], token)
            except Exception:
                log.exception("webhook delivery %s failed", rows[0]["delivery"])

    def _lease(self) -> float:
        return self.lease if self.lease is not None else 2 * self.timeout + 30.0

    def _attempt(self, row: dict[str, Any], token: str) -> None:
        """One attempt at one claimed delivery; its outcome goes back to the row."""
        import httpx

        attempt = row["attempts"] + 1
        if row["secret"] is None:  # the hook was removed while this waited
            outcome = {"state": "failed", "status": 0, "ok": 0, "error": "webhook removed", "at": time.time()}
            self.meta.handle().finish(row["id"], token, outcome)
            return
        body = row["payload"].encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "deltahub-webhooks",
            "X-Deltahub-Event": row["event"],
            "X-Deltahub-Delivery": row["delivery"],
            SIGNATURE_HEADER: sign(row["secret"], body),
        }
        try:
            with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
                r = client.post(row["url"], content=body, headers=headers)
            status, error = r.status_code, "" if r.is_success else f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            status, error = 0, f"{type(e).__name__}: {e}"[:500]
        now = time.time()
        ok = 200 <= status < 300
        outcome: dict[str, Any] = {
            "status": status,
            "ok": int(ok),
            "attempts": attempt,
            "error": error,
            "at": now,
        }
        if ok:
            outcome["state"] = "delivered"
        elif attempt >= self.attempts:
            outcome["state"] = "failed"
        else:
            outcome["due"] = now + min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        if not self.meta.handle().finish(row["id"], token, outcome):
            log.warning(
                "webhook delivery %s: its lease ended before its outcome was recorded", row["delivery"]
            )
        if "due" in outcome:
            self._wake.set()  # a worker waits for this retry's due time, not the poll

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no delivery is pending in the store (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.meta.handle().pending():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the workers; an attempt in flight finishes (within `timeout`), pending rows stay."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
