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

Deliveries run on this server process's own worker threads, fed by a bounded queue:
a request that publishes or moves a tag only enqueues, and never waits for a receiver.
Events are sent by the server process that handled the request; a process killed with
deliveries queued loses those (they are at-most-once after a crash; the log shows
which were delivered).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from typing import Any

log = logging.getLogger("deltahub.hub.webhooks")

SIGNATURE_HEADER = "X-Deltahub-Signature"
QUEUE_MAX = 10_000
WORKERS = 4


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """Whether `header` (X-Deltahub-Signature) signs `body` under `secret`, compared in constant time."""
    return bool(header) and hmac.compare_digest(sign(secret, body), header or "")


class Dispatcher:
    """Queue events and deliver them on background threads, with bounded retries."""

    def __init__(
        self,
        meta: Any,
        *,
        attempts: int = 5,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        timeout: float = 10.0,
    ) -> None:
        self.meta = meta
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self._queue: queue.Queue[tuple[dict[str, Any], dict[str, Any]] | None] = queue.Queue(QUEUE_MAX)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Condition(self._lock)

    def emit(self, event: str, full_name: str, data: dict[str, Any]) -> None:
        """Enqueue `event` for every hook that wants it (called after the change committed)."""
        try:
            hooks = self.meta.handle().hooks(event, full_name)
        except Exception:
            log.exception("cannot read webhooks for %s", event)
            return
        for hook in hooks:
            payload = {
                "event": event,
                "delivery": str(uuid.uuid4()),
                "timestamp": time.time(),
                "adapter": full_name,
                **data,
            }
            with self._lock:
                self._start()
                self._pending += 1
            try:
                self._queue.put_nowait((hook, payload))
            except queue.Full:
                with self._lock:
                    self._pending -= 1
                log.error("webhook queue full: %s for %s dropped", event, hook["url"])

    def _start(self) -> None:
        if self._threads:
            return
        for i in range(WORKERS):
            t = threading.Thread(target=self._run, name=f"deltahub-webhooks-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            try:
                self._deliver(*item)
            except Exception:
                log.exception("webhook delivery failed")
            finally:
                with self._lock:
                    self._pending -= 1
                    self._idle.notify_all()

    def _deliver(self, hook: dict[str, Any], payload: dict[str, Any]) -> None:
        import httpx

        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "deltahub-webhooks",
            "X-Deltahub-Event": payload["event"],
            "X-Deltahub-Delivery": payload["delivery"],
            SIGNATURE_HEADER: sign(hook["secret"], body),
        }
        status, error, attempt = 0, "", 0
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            for attempt in range(1, self.attempts + 1):
                try:
                    r = client.post(hook["url"], content=body, headers=headers)
                    status, error = r.status_code, "" if r.is_success else f"HTTP {r.status_code}"
                    if r.is_success:
                        break
                except httpx.HTTPError as e:
                    status, error = 0, f"{type(e).__name__}: {e}"[:500]
                if attempt < self.attempts and self._stop.wait(
                    min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
                ):
                    break  # shutting down
        row = {
            "hook_id": hook["id"],
            "event": payload["event"],
            "delivery": payload["delivery"],
            "url": hook["url"],
            "status": status,
            "ok": int(200 <= status < 300),
            "attempts": attempt,
            "error": error,
            "at": time.time(),
        }
        try:
            self.meta.handle().log_delivery(row)
        except Exception:
            log.exception("cannot log webhook delivery %s", payload["delivery"])

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every queued delivery is done (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
