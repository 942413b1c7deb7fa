"""Failing fast while the system of record is down, and noticing at once when it is back.

Without this, every request during an outage waits its whole bound (a pooled
connection that never comes, a query that never answers) before its 503, and a
real outage ties up every client for seconds each. Once a call has seen the
database fail, `Outage` answers later calls at once, while one background probe
at a time (every half second, each bounded) asks the database; the first answer
that says it can record again ends the outage.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from service import metrics
from service.errors import StoreUnavailable
from service.tasks import abandon

logger = logging.getLogger("service.storage")

PROBE_EVERY = 0.5
PROBE_TIMEOUT = 1.0

# A pooled connection used this recently is taken as alive; one idle longer (a restart may have cut it) is checked
# with an empty query before it is lent. Checking every connection cost a round trip per group. Both of the
# PostgreSQL store's pools (asynchronous, and the commit threads' blocking one) follow this one rule.
CHECK_IF_IDLE_SECONDS = 2.0
_last_used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def mark_used(conn: Any) -> None:
    _last_used[conn] = time.monotonic()


def idle_too_long(conn: Any) -> bool:
    """Whether the connection must be checked before it is lent: never marked used, or not for a while."""
    last = _last_used.get(conn)
    return last is None or time.monotonic() - last > CHECK_IF_IDLE_SECONDS


class Outage:
    def __init__(self, probe: Callable[[], Awaitable[None]], name: str = "PostgreSQL") -> None:
        """`probe` returns once the database answers and can record, and raises otherwise."""
        self._probe = probe
        self._name = name
        self.since: float | None = None
        self.reason = ""
        self._prober: asyncio.Task[None] | None = None

    def check(self) -> None:
        """Raise StoreUnavailable at once while the outage lasts."""
        if self.since is not None:
            metrics.count(metrics.store_fast_failures)
            raise StoreUnavailable(
                f"The system of record is unavailable ({self.reason}); answering at once until it is back."
            )

    def began(self, reason: str) -> None:
        """A call saw the database fail: from now on, fail fast and probe."""
        if self.since is not None:
            return
        self.since = time.monotonic()
        self.reason = reason
        logger.warning(
            "%s unavailable (%s): answering 503 at once, probing every %.1f s", self._name, reason, PROBE_EVERY
        )
        # A fresh context: the probe belongs to no request.
        self._prober = asyncio.get_running_loop().create_task(self._probing(), context=contextvars.Context())

    async def _probing(self) -> None:
        while self.since is not None:
            await asyncio.sleep(PROBE_EVERY)
            probe = asyncio.ensure_future(self._probe())
            done, _ = await asyncio.wait({probe}, timeout=PROBE_TIMEOUT)
            if not done:  # frozen: do not wait for the cancelled query to unwind either
                abandon(probe)
                continue
            if probe.exception() is not None:  # still down, or read-only: the next probe asks again
                continue
            logger.info("%s is back after %.1f s", self._name, time.monotonic() - self.since)
            self.since = None

    async def close(self) -> None:
        if self._prober is not None and not self._prober.done():
            self._prober.cancel()
            await asyncio.wait({self._prober}, timeout=1.0)
