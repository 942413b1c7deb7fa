"""Lending the asynchronous pool's connections: psycopg_pool's getconn and putconn, with one connection kept at hand.

Below saturation nearly every call to the database finds no other in flight, and
psycopg_pool's lending costs each such call its lock, checks, statistics and log
calls, both ways. So the connection a call gives back is kept out of the pool for
the next call to take first, while nothing else is kept there and no call waits
for the pool (a pool of one would otherwise starve them); a call that finds it
taken (calls in flight at once) borrows from the pool as before. At one INSERT every 10 ms, alternated in one
process, store.insert's p50 moved by -5, -39, -61, +5 and -33 µs in five runs.

The kept connection is still the pool's: lent, and returned to it whenever
anything is in doubt. A call that fails, or is cancelled or abandoned, gives its
connection back (psycopg_pool rolls it back, or replaces it if it is broken);
one that was idle longer than the checking rule allows (outage.py) goes back to
the pool before a call would use it, so that the pool's check decides; and the
outage probe and close() take it back first, so that they find every idle
connection in the pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.pq import TransactionStatus

from service.storage.outage import idle_too_long, mark_used

T = TypeVar("T")


class Lender:
    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, wait: float) -> None:
        """`wait`: seconds a call waits for a pooled connection while all are lent."""
        self.pool = pool
        self._wait = wait
        self._kept: psycopg.AsyncConnection[Any] | None = None
        self._closing = False
        # Calls waiting for (or just given) a pooled connection: while there are any, none is kept from them.
        self._borrowing = 0

    async def lend(self, action: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run `action` on the kept connection, or on one from the pool if it is taken or has idled too long."""
        conn, self._kept = self._kept, None
        if conn is not None and idle_too_long(conn):
            await self.pool.putconn(conn)
            conn = None
        if conn is None:
            self._borrowing += 1
            try:
                conn = await self.pool.getconn(timeout=self._wait)
            finally:
                self._borrowing -= 1
        try:
            result = await action(conn)
        except BaseException:
            await self.pool.putconn(conn)
            raise
        mark_used(conn)
        # Kept if nothing is, no call waits for the pool, and it is not in a transaction nor broken (a closed
        # connection's status is UNKNOWN).
        if (
            self._kept is None
            and not self._borrowing
            and not self._closing
            and conn.pgconn.transaction_status == TransactionStatus.IDLE
        ):
            self._kept = conn
        else:
            await self.pool.putconn(conn)
        return result

    @property
    def keeping(self) -> int:
        """Connections kept at hand: 0 or 1 (lent, as the pool counts them, but idle)."""
        return 0 if self._kept is None else 1

    async def give_back(self) -> None:
        """Return the kept connection to the pool, before the pool checks its idle connections."""
        conn, self._kept = self._kept, None
        if conn is not None:
            await self.pool.putconn(conn)

    async def close(self) -> None:
        """Return the kept connection before the pool closes, and keep none after: a call abandoned at its deadline
        that ends later gives its connection to the pool, which closes it."""
        self._closing = True
        await self.give_back()
