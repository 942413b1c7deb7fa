"""Group commits on threads of their own: records without an Idempotency-Key, COPY over blocking connections.

Under a storm of requests every pass of the event loop is long (it reads and
refuses every client that sent again), and an asynchronous group commit needs
several passes: its task, the COPY's two round trips, the hand-back. Run on a
thread, the whole commit is one hand-over and one answer, whatever the loop is
doing meanwhile (1,000 connections: the admitted requests' p99 fell by about a
quarter; docs/performance.md). The store sends a group here only when the loop is
slow (postgres.py, SLOW_LOOP): on a loop that keeps up, the thread's waits for
the interpreter lock cost more than the passes they save.

The threads use a blocking psycopg_pool beside the store's asynchronous pool,
its connections taken out of the same DATABASE_POOL_SIZE, opened with the same
settings. A call is bounded like every other: at its deadline, or when its caller
is cancelled, the connection's socket is shut down, so a thread stuck on a frozen
database returns at once (its connection is then replaced) instead of hanging
until the network comes back, and shutdown is never held by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import psycopg_pool

from service.storage.base import Record, _row, refuse_late
from service.storage.outage import idle_too_long, mark_used

# The call each commit thread is running: the pool checks a connection on that thread, before lending it.
_running = threading.local()


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    if not idle_too_long(conn):
        return
    call: _Call | None = getattr(_running, "call", None)
    if call is None:  # pragma: no cover - the pool checks only when lending, on the commit threads
        psycopg_pool.ConnectionPool.check_connection(conn)
        return
    call.begin(conn)  # the check's query on a frozen network is cut at the deadline too
    try:
        psycopg_pool.ConnectionPool.check_connection(conn)
    except Exception:
        if call.cut:
            raise _Cut from None  # not an Exception: the pool does not try another connection
        raise
    finally:
        call.end()


def _settle(future: asyncio.Future[None], outcome: BaseException | None) -> None:
    if future.done():  # the caller gave up
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)


class _Cut(BaseException):
    """The call was given up on: stop, whatever the pool would try next."""


class _Call:
    """One commit's connection while it runs, so that the event loop can cut it at the deadline."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: psycopg.Connection[Any] | None = None
        self.cut = False

    def begin(self, conn: psycopg.Connection[Any]) -> None:
        with self.lock:
            if self.cut:  # given up on before it had a connection
                raise _Cut
            self.conn = conn

    def end(self) -> None:
        with self.lock:
            self.conn = None

    def give_up(self) -> None:
        """Shut the connection's socket down: a blocked libpq call sees the end of the stream and returns."""
        with self.lock:
            self.cut = True
            if self.conn is None or self.conn.closed:
                return
            # OSError: the peer has closed it already; psycopg.Error: libpq has dropped the socket meanwhile.
            with (
                contextlib.suppress(OSError, psycopg.Error),
                socket.socket(fileno=os.dup(self.conn.pgconn.socket)) as sock,
            ):
                sock.shutdown(socket.SHUT_RDWR)


class CommitThreads:
    def __init__(self, url: str, kwargs: dict[str, Any], size: int, copy: str, types: Sequence[str]) -> None:
        self.size = size
        self._copy = copy
        self._types = list(types)
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=size,
            max_size=size,
            open=False,
            check=_check_if_idle,
            configure=mark_used,  # just opened: no need to check it
            kwargs=kwargs,
            name="commits",
        )
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="commit")
        self._calls: set[_Call] = set()

    def open(self) -> None:
        """Start filling the pool in the background: the asynchronous pool has already seen the database answer."""
        self.pool.open(wait=False)

    def ready(self) -> bool:
        """Whether a connection is free now; none is while the pool replaces broken ones (after an outage, say)."""
        return bool(self.pool.get_stats()["pool_available"])

    async def copy(self, records: Sequence[Record], seconds: float, late: float) -> None:
        """COPY the records in one autocommitted statement on a thread; past `seconds`, cut it and raise TimeoutError.

        Refuses (StoreUnavailable) records made more than `late` seconds before their turn, as every write does.
        """
        call = _Call()
        self._calls.add(call)
        job = asyncio.get_running_loop().run_in_executor(self._threads, self._run, call, records, seconds, late)
        try:
            async with asyncio.timeout(seconds):
                await job
        except _Cut:  # close() cut it: a 503 like any call past its bound
            raise TimeoutError from None
        except (TimeoutError, asyncio.CancelledError):
            call.give_up()
            task = asyncio.current_task()
            if job.cancelled() and task is not None and not task.cancelling():
                raise TimeoutError from None  # close() dropped it from the queue; its caller was not cancelled
            raise
        finally:
            self._calls.discard(call)

    def _run(self, call: _Call, records: Sequence[Record], seconds: float, late: float) -> None:
        _running.call = call
        with self.pool.connection(timeout=seconds) as conn:
            call.begin(conn)
            try:
                refuse_late(records, late)
                with conn.cursor() as cur, cur.copy(self._copy) as copy:
                    copy.set_types(self._types)
                    for record in records:
                        copy.write_row(_row(record, "postgres"))
                mark_used(conn)
            finally:
                call.end()
                if call.cut:  # its socket may be shut down after the COPY: the pool must not lend it again
                    conn.close()

    async def check(self) -> None:
        """Check every idle connection, replacing the broken ones.

        On a daemon thread of its own: the check's queries cannot be cut like a commit's, and one stuck on a
        network that froze again must hold neither the caller (which may give up on it) nor the process's exit.
        """
        loop = asyncio.get_running_loop()
        checked: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            try:
                self.pool.check()
                outcome: BaseException | None = None
            except BaseException as exc:  # reported to the caller, if it still waits
                outcome = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                loop.call_soon_threadsafe(_settle, checked, outcome)

        threading.Thread(target=run, name="commits-check", daemon=True).start()
        await checked

    async def close(self, seconds: float) -> None:
        for call in list(self._calls):
            call.give_up()
        self._threads.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.pool.close, seconds)
