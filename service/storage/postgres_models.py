"""PostgreSQL's part of the model lifecycle: the assignment and its NOTIFY, challenger rows, worker reports.

An assignment change is one transaction: take an advisory lock, read the newest
revision, insert the next with what it replaced, `pg_notify` its number. The
notification is delivered at COMMIT, to every session that LISTENs: one per
worker, on a connection of its own outside the pool (a pooled connection is
shared, and LISTEN belongs to a session). That session reconnects after any
failure and reads the revision again each time, and every few seconds anyway,
so a NOTIFY sent while it was away is never missed for long.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg

from service.schemas import Assignment, AssignmentChange, ChallengerDecision, Comparison, WorkerModels
from service.storage import model_records as records
from service.tasks import abandon, within

logger = logging.getLogger("service.storage")
T = TypeVar("T")

_CHALLENGER_COPY = f"COPY challenger_decisions ({records.CHALLENGER_COLUMNS}) FROM STDIN (FORMAT BINARY)"
_CHALLENGER_TYPES = ["uuid", "text", "float8", "text", "int4", "text", "timestamptz"]
# How long the listening session may take to connect, or to answer a query, before it starts over.
LISTEN_TIMEOUT = 5.0
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 5.0

Action = Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]


class PostgresModelRecords:
    """Mixed into PostgresStore, which provides `_run` (a bounded call on a pooled connection) and `_listen_kwargs`."""

    _run: Callable[..., Awaitable[Any]]
    _url: str
    _listen_kwargs: dict[str, Any]

    async def read_assignment(self) -> Assignment | None:
        async def read(conn: psycopg.AsyncConnection[Any]) -> Assignment | None:
            row = await (await conn.execute(records.CURRENT)).fetchone()
            return None if row is None else records.assignment(row)

        result: Assignment | None = await self._run(read)
        return result

    async def change_assignment(self, change: records.Change, changed_by: str) -> Assignment:
        async def write(conn: psycopg.AsyncConnection[Any]) -> Assignment:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (records.ASSIGNMENT_LOCK_ID,))
                row = await (await conn.execute(records.CURRENT)).fetchone()
                current = None if row is None else records.assignment(row)
                decided = change(current)
                if decided is None:
                    assert current is not None, "a change that changes nothing needs an assignment to keep"
                    return current
                action, new = decided
                revision = (current.revision if current else 0) + 1
                now = dt.datetime.now(dt.UTC)
                await conn.execute(
                    records.INSERT_ASSIGNMENT.format(p="%s"),
                    records.assignment_row(revision, action, new, current, now, changed_by),
                )
                # Delivered at COMMIT to every listening worker.
                await conn.execute("SELECT pg_notify(%s, %s)", (records.CHANNEL, str(revision)))
                return Assignment(
                    champion=new[0], challenger=new[1], changed_at=now, changed_by=changed_by, revision=revision
                )

        result: Assignment = await self._run(write)
        return result

    async def assignment_history(self, limit: int) -> list[AssignmentChange]:
        async def read(conn: psycopg.AsyncConnection[Any]) -> list[AssignmentChange]:
            rows = await (await conn.execute(records.HISTORY.format(p="%s"), (limit,))).fetchall()
            return [records.change(row) for row in rows]

        result: list[AssignmentChange] = await self._run(read)
        return result

    async def assignment_revisions(self, tick: float, stop: asyncio.Event) -> AsyncGenerator[int, None]:
        """The newest revision: at once, after every NOTIFY, every `tick` seconds, and after every reconnect.

        Ends when `stop` is set, between calls to the server: a call is never cut
        short, so the session is always closed, never stranded.
        """
        backoff = RECONNECT_INITIAL
        down_since: float | None = None
        while not stop.is_set():
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await _connect(self._url, self._listen_kwargs)
                await within(LISTEN_TIMEOUT, conn.execute(f"LISTEN {records.CHANNEL}"))
                if down_since is not None:
                    logger.info(
                        "Listening for model assignment changes again after %.1f s", time.monotonic() - down_since
                    )
                    down_since, backoff = None, RECONNECT_INITIAL
                while not stop.is_set():
                    row = await within(LISTEN_TIMEOUT, _fetchone(conn, records.REVISION))
                    yield int(row[0])
                    # Wait for a notification, or the tick; either way the revision is read again.
                    await _until(_next_notification(conn, tick), stop, tick + LISTEN_TIMEOUT)
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if down_since is None:
                    down_since = time.monotonic()
                    logger.warning(
                        "Lost the session that listens for model assignment changes (%s); reconnecting",
                        type(exc).__name__,
                    )
                await _until(asyncio.sleep(backoff), stop)
                backoff = min(backoff * 2, RECONNECT_MAX)
            finally:
                if conn is not None:
                    await conn.close()

    async def report_worker(self, report: WorkerModels) -> None:
        async def write(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                records.REPORT_WORKER.format(p="%s"),
                (
                    report.worker,
                    report.revision,
                    report.champion,
                    report.challenger,
                    report.loaded_at,
                    report.seen_at,
                    report.error,
                ),
            )

        await self._run(write)

    async def forget_worker(self, worker: str) -> None:
        async def delete(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(records.FORGET_WORKER.format(p="%s"), (worker,))

        await self._run(delete)

    async def workers(self, seen_since: dt.datetime) -> list[WorkerModels]:
        async def read(conn: psycopg.AsyncConnection[Any]) -> list[WorkerModels]:
            rows = await (await conn.execute(records.WORKERS.format(p="%s"), (seen_since,))).fetchall()
            return [records.worker(row) for row in rows]

        result: list[WorkerModels] = await self._run(read)
        return result

    async def record_challenger(self, rows: Sequence[ChallengerDecision]) -> None:
        async def copy(conn: psycopg.AsyncConnection[Any]) -> None:
            # Autocommit: one COPY is one transaction, all rows or none.
            async with conn.cursor() as cur, cur.copy(_CHALLENGER_COPY) as writer:
                writer.set_types(_CHALLENGER_TYPES)
                for r in rows:
                    await writer.write_row(
                        (
                            r.decision_id,
                            r.model_version,
                            r.probability_of_default,
                            r.risk_category,
                            r.score,
                            r.decision,
                            r.scored_at,
                        )
                    )

        await self._run(copy)

    async def compare(self, champion: str, challenger: str, since: dt.datetime, until: dt.datetime) -> Comparison:
        query = (
            f"SELECT {records.COMPARISON_AGGREGATES},"
            f" percentile_cont(0.95) WITHIN GROUP (ORDER BY {records.ABS_DELTA}), corr(d.score, c.score)"
            + records.PAIRS.format(p="%s")
        )

        async def read(conn: psycopg.AsyncConnection[Any]) -> Comparison:
            row = await _fetchone(conn, query, (challenger, champion, since, until))
            *aggregates, p95, correlation = row
            return records.comparison(
                champion,
                challenger,
                since,
                until,
                aggregates,
                None if p95 is None else float(p95),
                None if correlation is None else float(correlation),
            )

        result: Comparison = await self._run(read)
        return result


async def _fetchone(conn: psycopg.AsyncConnection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = await (await conn.execute(query, params)).fetchone()
    assert row is not None
    return row


async def _next_notification(conn: psycopg.AsyncConnection[Any], tick: float) -> None:
    async for _ in conn.notifies(timeout=tick, stop_after=1):
        pass


async def _until(waiting: Awaitable[Any], stop: asyncio.Event, limit: float | None = None) -> None:
    """Wait for `waiting` or for `stop`, whichever comes first (the other is dropped); TimeoutError past `limit`."""
    task = asyncio.ensure_future(waiting)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({task, stopped}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            abandon(task)
    if not done:
        raise TimeoutError
    if task in done:
        task.result()


async def _connect(url: str, kwargs: dict[str, Any]) -> psycopg.AsyncConnection[Any]:
    """Open the listening session, bounded; a connection that arrives after we gave up is closed, not leaked."""
    task = asyncio.ensure_future(psycopg.AsyncConnection.connect(url, **kwargs))
    try:
        return await asyncio.wait_for(asyncio.shield(task), LISTEN_TIMEOUT)
    except BaseException:
        task.add_done_callback(_close_late_connection)
        task.cancel()
        raise


def _close_late_connection(task: asyncio.Future[psycopg.AsyncConnection[Any]]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().pgconn.finish()
