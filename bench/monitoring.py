"""What one GET /monitoring costs on 10 thousand, 100 thousand and 1 million decisions (`make bench-monitoring`).

Starts the service from the Procfile on a PostgreSQL database of its own, scores
the data set's 1000 applicants through the API, then grows the decisions table
with SQL alone (copies of those rows at random times in the last 23 hours, and
an outcome for a third of them), and times GET /monitoring, the champion over
the last 24 hours, 5 times at each size. Prints the medians and writes them
into bench/RESULTS.md.
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import replace_section  # noqa: E402
from bench.run import ADMIN_URL, Server, work_directory  # noqa: E402
from bench.seed import seed  # noqa: E402

SIZES = (10_000, 100_000, 1_000_000)
RUNS = 5
# Copies of the API's own rows, each at a random time of the last 23 hours.
GROW = """
INSERT INTO decisions ({columns})
SELECT gen_random_uuid(), now() - random() * interval '23 hours', {copied}
FROM generate_series(1, %s) AS g JOIN seed ON seed.n = g %% 1000
"""
OUTCOMES = """
INSERT INTO outcomes (decision_id, defaulted, observed_at, recorded_at, recorded_by)
SELECT id, random() < probability_of_default, now(), now(), 'bench' FROM decisions
WHERE id NOT IN (SELECT decision_id FROM outcomes) AND random() < 1.0 / 3
"""


def timed_get(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as response:
        response.read()
        assert response.status == 200
    return time.perf_counter() - started


def main() -> None:
    work = work_directory("bench-monitoring-")
    dbname = f"credit_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    database_url = re.sub(r"/[^/]*$", f"/{dbname}", ADMIN_URL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "API_KEYS", "LOG_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", DATABASE_URL=database_url)
    service = Server(env, None, work / "service.log")
    rows: list[str] = []
    try:
        service.wait("/health/ready")
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows_from = seed(service.url, conn)
            have = 1000
            for size in SIZES:
                started = time.perf_counter()
                conn.execute(GROW.format(columns=rows_from.columns, copied=rows_from.copied), (size - have,))  # type: ignore[arg-type]
                conn.execute(OUTCOMES)
                conn.execute("ANALYZE decisions")
                conn.execute("ANALYZE outcomes")
                have = size
                grown = time.perf_counter() - started
                timed_get(service.url + "/monitoring")  # one warm-up
                times = [timed_get(service.url + "/monitoring") for _ in range(RUNS)]
                line = (
                    f"| {size:,} | {statistics.median(times) * 1000:,.0f} | {min(times) * 1000:,.0f} | "
                    f"{max(times) * 1000:,.0f} | {grown:.1f} |"
                )
                print(line, flush=True)
                rows.append(line)
    finally:
        service.stop()
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        admin.close()
    table = "\n".join(
        [
            "## GET /monitoring on a growing table",
            "",
            f"`bench/monitoring.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: the champion over the last"
            f" 24 h, every decision in the window, a third of them with an outcome; {RUNS} calls at each size"
            " (after one warm-up). PostgreSQL, one worker.",
            "",
            "| decisions | median ms | min ms | max ms | seconds to add the rows (SQL) |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    replace_section(table)


if __name__ == "__main__":
    main()
