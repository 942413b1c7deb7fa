"""SQLite's part of monitoring: recording outcomes, and the aggregate queries over a window.

The same one-pass window query and ranking query as PostgreSQL's; SQLite has no
percentile_cont, so each quantile is read as the two order statistics around it
(one sort per column, with row_number) and blended as percentile_cont blends them.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from service.models.metadata import TrainingDistribution
from service.monitoring import BandOutcomes, Ranking, WindowCounts
from service.schemas import Outcome, OutcomeRequest
from service.storage import monitoring_records as queries

_BUCKET = "CAST(d.probability_of_default * 1000 AS INTEGER)"  # truncation: the floor, for p >= 0


def _quantiles(
    conn: sqlite3.Connection, column: str, fractions: dict[str, float], count: int, window: tuple[Any, ...]
) -> dict[str, float | None]:
    if count == 0:
        return dict.fromkeys(fractions)
    positions = {name: q * (count - 1) for name, q in fractions.items()}
    wanted = sorted(
        {math.floor(p) for p in positions.values()} | {min(math.floor(p) + 1, count - 1) for p in positions.values()}
    )
    rows = conn.execute(
        f"SELECT rn, x FROM (SELECT {column} AS x, row_number() OVER (ORDER BY {column}) - 1 AS rn"
        + queries.WINDOW.format(p="?")
        + f") WHERE rn IN ({', '.join('?' * len(wanted))})",
        (*window, *wanted),
    ).fetchall()
    at = {int(rn): float(x) for rn, x in rows}
    found: dict[str, float | None] = {}
    for name, position in positions.items():
        low = math.floor(position)
        high = min(low + 1, count - 1)
        found[name] = at[low] + (at[high] - at[low]) * (position - low)
    return found


def _time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value).astimezone(dt.UTC)


class SQLiteMonitoring:
    """Mixed into SQLiteStore, which provides `_run` (a call on the store's own thread)."""

    _run: Callable[..., Awaitable[Any]]

    async def record_outcome(
        self, decision_id: uuid.UUID, outcome: OutcomeRequest, recorded_by: str | None
    ) -> tuple[str, Outcome | None, dt.datetime | None]:
        def write(conn: sqlite3.Connection) -> tuple[str, Outcome | None, dt.datetime | None]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(queries.DECISION_TIME.format(p="?"), (str(decision_id),)).fetchone()
                result: tuple[str, Outcome | None, dt.datetime | None]
                if row is None:
                    result = ("unknown", None, None)
                elif outcome.observed_at < _time(row[0]):
                    result = ("too_early", None, _time(row[0]))
                else:
                    now = dt.datetime.now(dt.UTC)
                    observed = outcome.observed_at.astimezone(dt.UTC)
                    cur = conn.execute(
                        queries.INSERT_OUTCOME.format(p="?"),
                        (outcome.defaulted, observed.isoformat(), now.isoformat(), recorded_by, str(decision_id)),
                    )
                    if cur.rowcount == 1:
                        result = ("created", Outcome(decision_id, outcome.defaulted, observed, now), _time(row[0]))
                    else:
                        found = conn.execute(queries.SELECT_OUTCOME.format(p="?"), (str(decision_id),)).fetchone()
                        existing = Outcome(decision_id, bool(found[1]), _time(found[2]), _time(found[3]))
                        same = existing.defaulted == outcome.defaulted and existing.observed_at == observed
                        result = ("same" if same else "different", existing, _time(row[0]))
                conn.execute("COMMIT")
                return result
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        result: tuple[str, Outcome | None, dt.datetime | None] = await self._run(write)
        return result

    async def monitoring_counts(
        self,
        version: str,
        since: dt.datetime,
        until: dt.datetime,
        distribution: TrainingDistribution | None,
        full: bool = True,
    ) -> WindowCounts:
        """The window's counts and bins; with `full`, its quantiles and its back-test too."""
        query = queries.window_query(distribution)
        window = (version, since.isoformat(), until.isoformat())

        def read(conn: sqlite3.Connection) -> WindowCounts:
            row = conn.execute(query.sql.format(p="?"), (*query.select_params, *window)).fetchone()
            count = int(row[0])
            probability: dict[str, float | None] = {"p50": None, "p90": None}
            score: dict[str, float | None] = {"p10": None, "p50": None, "p90": None}
            back_test: tuple[Ranking | None, list[BandOutcomes]] = (None, [])
            if full:
                probability = _quantiles(conn, "probability_of_default", {"p50": 0.5, "p90": 0.9}, count, window)
                score = _quantiles(conn, "score", {"p10": 0.1, "p50": 0.5, "p90": 0.9}, count, window)
                source = queries.PAIRED_WINDOW.format(p="?")
                ranked = queries.ranking_query("d.probability_of_default", source, bands=True)
                back_test = queries.ranking(conn.execute(ranked, window).fetchall())
            return queries.window_counts(row, query, (probability, score), back_test)

        result: WindowCounts = await self._run(read)
        return result

    async def roc_points(self, version: str, since: dt.datetime, until: dt.datetime) -> list[tuple[int, int, int]]:
        window = (version, since.isoformat(), until.isoformat())

        def read(conn: sqlite3.Connection) -> list[tuple[int, int, int]]:
            rows = conn.execute(queries.roc_points_query(_BUCKET).format(p="?"), window).fetchall()
            return [(int(b), int(pos), int(neg)) for b, pos, neg in rows]

        result: list[tuple[int, int, int]] = await self._run(read)
        return result

    async def compare_outcomes(
        self, champion: str, challenger: str, since: dt.datetime, until: dt.datetime
    ) -> tuple[Ranking, Ranking]:
        source = queries.CHALLENGER_PAIRS.format(p="?")
        params = (challenger, champion, since.isoformat(), until.isoformat())

        def read(conn: sqlite3.Connection) -> tuple[Ranking, Ranking]:
            champion_rows = conn.execute(queries.ranking_query("d.probability_of_default", source), params).fetchall()
            challenger_rows = conn.execute(queries.ranking_query("c.probability_of_default", source), params).fetchall()
            return queries.ranking(champion_rows)[0], queries.ranking(challenger_rows)[0]

        result: tuple[Ranking, Ranking] = await self._run(read)
        return result
