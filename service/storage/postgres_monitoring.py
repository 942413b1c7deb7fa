"""PostgreSQL's part of monitoring: recording outcomes, and the aggregate queries over a window.

One window query counts everything per bin in one pass; percentile_cont gives
the quantiles in the same pass; the ranking query's window functions reduce any
number of outcomes to the four numbers ROC AUC and KS need. All run on one
pooled connection, in one round trip each, bounded like every store call.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from service.models.metadata import TrainingDistribution
from service.monitoring import BandOutcomes, Ranking, WindowCounts
from service.schemas import Outcome, OutcomeRequest
from service.storage import monitoring_records as queries

_QUANTILES = (
    "SELECT percentile_cont(ARRAY[0.5, 0.9]) WITHIN GROUP (ORDER BY probability_of_default),"
    " percentile_cont(ARRAY[0.1, 0.5, 0.9]) WITHIN GROUP (ORDER BY score)" + queries.WINDOW
)
# A window of a million decisions takes about 2 s here; a request's usual bound (2 x DATABASE_REQUEST_TIMEOUT) is
# for a decision, not for an analyst's question.
MONITORING_TIMEOUT = 30.0
_BUCKET = "floor(d.probability_of_default * 1000)::integer"


class PostgresMonitoring:
    """Mixed into PostgresStore, which provides `_run` (a bounded call on a pooled connection)."""

    _run: Callable[..., Awaitable[Any]]

    async def record_outcome(
        self, decision_id: uuid.UUID, outcome: OutcomeRequest, recorded_by: str | None
    ) -> tuple[str, Outcome | None, dt.datetime | None]:
        """("created" | "same" | "different" | "unknown" | "too_early", the outcome on record, the decision's time)."""

        async def write(conn: psycopg.AsyncConnection[Any]) -> tuple[str, Outcome | None, dt.datetime | None]:
            async with conn.transaction():
                row = await (await conn.execute(queries.DECISION_TIME.format(p="%s"), (decision_id,))).fetchone()
                if row is None:
                    return "unknown", None, None
                created_at: dt.datetime = row[0]
                if outcome.observed_at < created_at:
                    return "too_early", None, created_at
                now = dt.datetime.now(dt.UTC)
                cur = await conn.execute(
                    queries.INSERT_OUTCOME.format(p="%s"),
                    (outcome.defaulted, outcome.observed_at, now, recorded_by, decision_id),
                )
                if cur.rowcount == 1:
                    return "created", Outcome(decision_id, outcome.defaulted, outcome.observed_at, now), created_at
                found = await (await conn.execute(queries.SELECT_OUTCOME.format(p="%s"), (decision_id,))).fetchone()
                assert found is not None  # the conflict says it is there
                existing = Outcome(found[0], found[1], found[2].astimezone(dt.UTC), found[3].astimezone(dt.UTC))
                same = existing.defaulted == outcome.defaulted and existing.observed_at == outcome.observed_at
                return ("same" if same else "different"), existing, created_at

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
        window = (version, since, until)

        async def read(conn: psycopg.AsyncConnection[Any]) -> WindowCounts:
            row = await (await conn.execute(query.sql.format(p="%s"), (*query.select_params, *window))).fetchone()
            assert row is not None
            probability: list[Any] = [None, None]
            score: list[Any] = [None, None, None]
            back_test: tuple[Ranking | None, list[BandOutcomes]] = (None, [])
            if full:
                quantiles = await (await conn.execute(_QUANTILES.format(p="%s"), window)).fetchone()
                if quantiles is not None:
                    probability, score = quantiles[0] or probability, quantiles[1] or score
                source = queries.PAIRED_WINDOW.format(p="%s")
                ranked = queries.ranking_query("d.probability_of_default", source, bands=True)
                back_test = queries.ranking(await (await conn.execute(ranked, window)).fetchall())
            named = (
                dict(zip(("p50", "p90"), probability, strict=True)),
                dict(zip(("p10", "p50", "p90"), score, strict=True)),
            )
            return queries.window_counts(row, query, named, back_test)

        result: WindowCounts = await self._run(read, MONITORING_TIMEOUT)
        return result

    async def roc_points(self, version: str, since: dt.datetime, until: dt.datetime) -> list[tuple[int, int, int]]:
        """(probability bucket in thousandths, defaults, non-defaults), ascending: at most 1001 rows."""

        async def read(conn: psycopg.AsyncConnection[Any]) -> list[tuple[int, int, int]]:
            cur = await conn.execute(queries.roc_points_query(_BUCKET).format(p="%s"), (version, since, until))
            return [(int(b), int(pos), int(neg)) for b, pos, neg in await cur.fetchall()]

        result: list[tuple[int, int, int]] = await self._run(read, MONITORING_TIMEOUT)
        return result

    async def compare_outcomes(
        self, champion: str, challenger: str, since: dt.datetime, until: dt.datetime
    ) -> tuple[Ranking, Ranking]:
        """Back-testing both models on the decisions both scored that have an outcome."""
        source = queries.CHALLENGER_PAIRS.format(p="%s")
        params = (challenger, champion, since, until)

        async def read(conn: psycopg.AsyncConnection[Any]) -> tuple[Ranking, Ranking]:
            found = []
            for probability in ("d.probability_of_default", "c.probability_of_default"):
                rows = await (await conn.execute(queries.ranking_query(probability, source), params)).fetchall()
                found.append(queries.ranking(rows)[0])
            return found[0], found[1]

        result: tuple[Ranking, Ranking] = await self._run(read, MONITORING_TIMEOUT)
        return result
