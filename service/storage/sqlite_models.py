"""SQLite's part of the model lifecycle: the assignment, challenger rows, worker reports.

The embedded store is one file. Changes are serialised by `BEGIN IMMEDIATE`
(SQLite's write lock), and workers learn of them by reading the newest revision
every second: there is no NOTIFY, and a read of one indexed row costs
microseconds. Times are ISO 8601 text in UTC, as the decisions table keeps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import sqlite3
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from service.schemas import Assignment, AssignmentChange, ChallengerDecision, Comparison, WorkerModels
from service.storage import model_records as records

T = TypeVar("T")
POLL_SECONDS = 1.0


class SQLiteModelRecords:
    """Mixed into SQLiteStore, which provides `_run` (a call on the store's own thread)."""

    _run: Callable[..., Awaitable[Any]]

    async def read_assignment(self) -> Assignment | None:
        def read(conn: sqlite3.Connection) -> Assignment | None:
            row = conn.execute(records.CURRENT).fetchone()
            return None if row is None else records.assignment(row)

        result: Assignment | None = await self._run(read)
        return result

    async def change_assignment(self, change: records.Change, changed_by: str) -> Assignment:
        def write(conn: sqlite3.Connection) -> Assignment:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(records.CURRENT).fetchone()
                current = None if row is None else records.assignment(row)
                decided = change(current)
                if decided is None:
                    conn.execute("ROLLBACK")
                    assert current is not None, "a change that changes nothing needs an assignment to keep"
                    return current
                action, new = decided
                revision = (current.revision if current else 0) + 1
                now = dt.datetime.now(dt.UTC)
                conn.execute(
                    records.INSERT_ASSIGNMENT.format(p="?"),
                    records.assignment_row(revision, action, new, current, now.isoformat(), changed_by),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return Assignment(
                champion=new[0], challenger=new[1], changed_at=now, changed_by=changed_by, revision=revision
            )

        result: Assignment = await self._run(write)
        return result

    async def assignment_history(self, limit: int) -> list[AssignmentChange]:
        def read(conn: sqlite3.Connection) -> list[AssignmentChange]:
            return [records.change(row) for row in conn.execute(records.HISTORY.format(p="?"), (limit,)).fetchall()]

        result: list[AssignmentChange] = await self._run(read)
        return result

    async def assignment_revisions(self, tick: float, stop: asyncio.Event) -> AsyncGenerator[int, None]:
        """The newest revision, every second (SQLite has no NOTIFY; one indexed read costs microseconds)."""
        while not stop.is_set():
            # The file locked or gone for a moment: the next poll tries again.
            with contextlib.suppress(Exception):
                yield int(await self._run(lambda conn: conn.execute(records.REVISION).fetchone()[0]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(tick, POLL_SECONDS))

    async def report_worker(self, report: WorkerModels) -> None:
        values = (
            report.worker,
            report.revision,
            report.champion,
            report.challenger,
            report.loaded_at.isoformat(),
            report.seen_at.isoformat(),
            report.error,
        )
        await self._run(lambda conn: conn.execute(records.REPORT_WORKER.format(p="?"), values))

    async def forget_worker(self, worker: str) -> None:
        await self._run(lambda conn: conn.execute(records.FORGET_WORKER.format(p="?"), (worker,)))

    async def workers(self, seen_since: dt.datetime) -> list[WorkerModels]:
        def read(conn: sqlite3.Connection) -> list[WorkerModels]:
            rows = conn.execute(records.WORKERS.format(p="?"), (seen_since.isoformat(),)).fetchall()
            return [records.worker(row) for row in rows]

        result: list[WorkerModels] = await self._run(read)
        return result

    async def record_challenger(self, rows: Sequence[ChallengerDecision]) -> None:
        values = [
            (
                str(r.decision_id),
                r.model_version,
                r.probability_of_default,
                r.risk_category,
                r.score,
                r.decision,
                r.scored_at.isoformat(),
            )
            for r in rows
        ]

        def insert(conn: sqlite3.Connection) -> None:
            # One transaction (the connection autocommits otherwise): all rows or none, and one fsync.
            conn.execute("BEGIN")
            try:
                conn.executemany(records.INSERT_CHALLENGER.format(p="?"), values)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        await self._run(insert)

    async def compare(self, champion: str, challenger: str, since: dt.datetime, until: dt.datetime) -> Comparison:
        pairs = records.PAIRS.format(p="?")
        params = (challenger, champion, since.isoformat(), until.isoformat())

        def read(conn: sqlite3.Connection) -> Comparison:
            # SQLite has neither percentile_cont nor corr: exact integer sums give r, and
            # the two order statistics around the 95th percentile give what percentile_cont would.
            sums = "sum(d.score), sum(c.score), sum(d.score * d.score), sum(c.score * c.score), sum(d.score * c.score)"
            row = conn.execute(f"SELECT {records.COMPARISON_AGGREGATES}, {sums}{pairs}", params).fetchone()
            aggregates, sums_row = row[:-5], row[-5:]
            count = int(aggregates[0])
            p95 = correlation = None
            if count:
                position = 0.95 * (count - 1)
                lowest = math.floor(position)
                around = conn.execute(
                    f"SELECT {records.ABS_DELTA} AS x{pairs} ORDER BY x LIMIT 2 OFFSET ?", (*params, lowest)
                ).fetchall()
                p95 = records.interpolated([float(r[0]) for r in around], position - lowest)
                correlation = records.correlation_from_sums(count, *(int(v) for v in sums_row))
            return records.comparison(champion, challenger, since, until, aggregates, p95, correlation)

        result: Comparison = await self._run(read)
        return result
