"""The database's own floor under the latency targets: one decision's INSERT, alone, at the bench's offered loads.

`python -m bench.floor` inserts rows of the decisions table (a real decision, the
service's own row helper and statement) straight into a PostgreSQL database of
its own, with psycopg on autocommit connections, paced as bench/latency.py paces
wrk: 1 connection at a row every 10 ms, and 32 connections at 500 and 1,000 rows/s
in all. It prints each load's p50 and p99 in ms: what no service that commits
before it answers can beat on this machine, whatever its HTTP stack.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baseline import shipped_scorecard  # noqa: E402
from bench.run import ADMIN_URL  # noqa: E402
from service import dataset  # noqa: E402
from service.models.registry import ScorecardModel  # noqa: E402
from service.storage import PostgresStore, Record  # noqa: E402
from service.storage.base import _row  # noqa: E402
from service.storage.postgres import _PG_INSERT  # noqa: E402

SECONDS = 10.0
LOADS = ((1, 100.0), (32, 500.0), (32, 1000.0))


async def _connection(url: str, rate: float, until: float, latencies: list[float], model: ScorecardModel) -> None:
    applicant = dataset.load().applicants[1]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        interval = 1.0 / rate
        next_at = time.perf_counter()
        while next_at < until:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            record = Record(model.decide(applicant, uuid.uuid4(), dt.datetime.now(dt.UTC)), applicant)
            started = time.perf_counter()
            await conn.execute(_PG_INSERT, _row(record, "postgres"))
            latencies.append(time.perf_counter() - started)
            next_at += interval


async def insert_latencies(url: str, connections: int, total_rate: float) -> list[float]:
    """Each INSERT's latency in seconds, `connections` of them pacing `total_rate` rows a second in all."""
    model = shipped_scorecard()
    latencies: list[float] = []
    until = time.perf_counter() + SECONDS
    await asyncio.gather(
        *(_connection(url, total_rate / connections, until, latencies, model) for _ in range(connections))
    )
    return latencies


def main() -> None:
    dbname = f"credit_floor_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    url = re.sub(r"/[^/]*$", f"/{dbname}", ADMIN_URL)
    try:

        async def migrate() -> None:
            store = await PostgresStore.open(
                url, pool_size=1, connect_timeout=5, request_timeout=5, application_name="bench-floor"
            )
            try:
                await store.migrate()
            finally:
                await store.close()

        asyncio.run(migrate())
        print("| connections | rows/s offered | rows | p50 ms | p99 ms |")
        print("|---|---|---|---|---|")
        for connections, rate in LOADS:
            latencies = sorted(asyncio.run(insert_latencies(url, connections, rate)))
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            print(
                f"| {connections} | {rate:,.0f} | {len(latencies):,} | {statistics.median(latencies) * 1000:.2f} |"
                f" {p99 * 1000:.2f} |",
                flush=True,
            )
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        admin.close()


if __name__ == "__main__":
    main()
