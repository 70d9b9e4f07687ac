"""Reading the bearer token, and backing off clients whose tokens keep failing.

`AuthThrottle` is a token bucket per client address: each failed authentication (a
presented token that is unknown, revoked or expired) takes one unit; `burst` units
refill at `per_second`. A client with an empty bucket is answered 429 with
`Retry-After` before its token is even looked at, whatever it presents. Memory is
bounded: at most `max_clients` addresses are remembered (least recently failed first
out), so a flood from many addresses costs a fixed amount. Behind a reverse proxy
every client shares the proxy's address: the proxy should then limit failures per
real client itself (see README, "Security").
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.requests import Request

from deltahub.hub.responses import TooManyFailures

FAILURE_BURST = 30  # failed authentications a client may make at once
FAILURE_REFILL_PER_S = 0.5  # then one more every 2 s
MAX_CLIENTS = 4096


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def client_of(request: Request) -> str:
    return request.client.host if request.client else "?"


class AuthThrottle:
    """Per-client back-off on failed authentication, in bounded memory (thread-safe)."""

    def __init__(
        self,
        burst: float = FAILURE_BURST,
        per_second: float = FAILURE_REFILL_PER_S,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = float(burst)
        self.per_second = float(per_second)
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (units, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def _units(self, client: str, now: float) -> float:
        units, at = self._buckets.get(client, (self.burst, now))
        return min(self.burst, units + (now - at) * self.per_second)

    def check(self, client: str) -> None:
        """Raise `TooManyFailures` if `client` must wait before trying again."""
        with self._lock:
            if client not in self._buckets:
                return
            now = self._clock()
            units = self._units(client, now)
            if units >= self.burst:  # fully refilled: forget it
                del self._buckets[client]
                return
            if units < 1.0:
                raise TooManyFailures((1.0 - units) / self.per_second)

    def failed(self, client: str) -> None:
        """Count one failed authentication from `client`."""
        with self._lock:
            now = self._clock()
            units = self._units(client, now) - 1.0
            self._buckets[client] = (max(units, 0.0), now)
            self._buckets.move_to_end(client)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
