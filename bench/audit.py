"""The search and retention on 1 million decisions (`make bench-audit`).

Starts the service from the Procfile on a PostgreSQL database of its own, scores
the data set's 1000 applicants through the API (each with a reference), grows the
table with SQL alone to 1 million decisions at random times of the last 30 days
(each copy with a reference of its own), and times each search 5 times through
the API (median, min, max), with PostgreSQL's plan of the query behind it. Then
adds 200,000 decisions older than RETENTION_DAYS and times `python -m
service.retention`, alone and as two runs at once. Writes bench/RESULTS.md.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import replace_section  # noqa: E402
from bench.run import ADMIN_URL, Server, work_directory  # noqa: E402
from bench.seed import seed  # noqa: E402
from service.storage import Search  # noqa: E402
from service.storage.audit_records import search_query  # noqa: E402

SIZE = 1_000_000
OLD = 200_000
RUNS = 5
GROW = """
INSERT INTO decisions ({columns}, reference)
SELECT gen_random_uuid(), now() - interval '10 seconds' - random() * interval '30 days', {copied}, 'APP-' || g
FROM generate_series(1, %s) AS g JOIN seed ON seed.n = g %% 1000
"""
AGE = """
INSERT INTO decisions ({columns}, reference)
SELECT gen_random_uuid(), now() - interval '800 days' - random() * interval '300 days', {copied}, 'OLD-' || g
FROM generate_series(1, %s) AS g JOIN seed ON seed.n = g %% 1000
"""


def get(url: str) -> tuple[float, Any]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=300) as response:
        body = json.loads(response.read())
        assert response.status == 200
    return time.perf_counter() - started, body


def timed(url: str) -> tuple[list[float], Any]:
    get(url)  # one warm-up
    results = [get(url) for _ in range(RUNS)]
    return [t for t, _ in results], results[-1][1]


def plan(conn: psycopg.Connection[Any], search: Search) -> tuple[str, float]:
    """EXPLAIN ANALYZE of the page's query: the plan's shape, and its execution time in ms."""
    query, params = search_query(search, "%s")
    rows = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {query}", params).fetchall()  # type: ignore[call-overload]
    lines = [r[0] for r in rows]
    executed = next(float(m.group(1)) for line in lines if (m := re.search(r"Execution Time: ([\d.]+) ms", line)))
    steps = [line.strip().removeprefix("->  ").split("  (")[0] for line in lines]
    shape = " → ".join(
        s
        for s in steps
        if not s.startswith(
            (
                "Planning",
                "Execution",
                "Buffers",
                "Index Cond",
                "Filter",
                "Rows Removed",
                "Heap Blocks",
                "Recheck",
                "Sort Key",
                "Sort Method",
            )
        )
    )
    return shape, executed


def row(label: str, page: dict[str, Any], times: list[float], executed: float) -> str:
    ms = [t * 1000 for t in times]
    figures = f"{statistics.median(ms):,.1f} | {min(ms):,.1f} | {max(ms):,.1f} | {executed:.2f}"
    return f"| {label} | {len(page['decisions'])} | {figures} |"


def retention(env: dict[str, str], runs: int, work: Path) -> tuple[float, list[str]]:
    started = time.perf_counter()
    logs = [work / f"retention-{n}-{uuid.uuid4().hex[:6]}.log" for n in range(runs)]
    processes = []
    for log in logs:
        with log.open("wb") as output:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service.retention"],
                    cwd=ROOT,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            )
    for process in processes:
        assert process.wait(600) == 0
    elapsed = time.perf_counter() - started
    return elapsed, [re.search(r"Retention done: .*", log.read_text()).group(0) for log in logs]  # type: ignore[union-attr]


def main() -> None:
    work = work_directory("bench-audit-")
    dbname = f"credit_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    database_url = re.sub(r"/[^/]*$", f"/{dbname}", ADMIN_URL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "API_KEYS", "LOG_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", DATABASE_URL=database_url)
    env.update(LOG_LEVEL="WARNING")
    service = Server(env, None, work / "service.log")
    rows: list[str] = []
    plans: list[str] = []
    try:
        service.wait("/health/ready")
        with psycopg.connect(database_url, autocommit=True) as conn:
            rows_from = seed(service.url, conn, references=True)
            columns, copied = rows_from.columns, rows_from.copied
            started = time.perf_counter()
            conn.execute(GROW.format(columns=columns, copied=copied), (SIZE - 1000,))  # type: ignore[arg-type]
            conn.execute("VACUUM ANALYZE decisions")
            grown = time.perf_counter() - started
            print(f"grew to {SIZE:,} decisions in {grown:.1f} s", flush=True)

            now = dt.datetime.now(dt.UTC)
            day = now - dt.timedelta(days=1)
            month = now - dt.timedelta(days=31)
            q = urllib.parse.quote
            cases: list[tuple[str, str, Search]] = [
                (
                    "a reference",
                    "reference=APP-654321",
                    Search(now - dt.timedelta(days=3660), now, None, "APP-654321", None, 101),
                ),
                ("last 24 h, limit 100", "limit=100", Search(day, now, None, None, None, 101)),
                (
                    "last 24 h, declines, limit 1000",
                    "decision=decline&limit=1000",
                    Search(day, now, "decline", None, None, 1001),
                ),
                (
                    "30 days, limit 1000",
                    f"since={q(month.isoformat())}&limit=1000",
                    Search(month, now, None, None, None, 1001),
                ),
            ]
            for label, query, search in cases:
                times, page = timed(f"{service.url}/decisions?{query}")
                shape, executed = plan(conn, search)
                rows.append(row(label, page, times, executed))
                plans.append(f"- {label}: `{shape}`")
                print(rows[-1], flush=True)
            # The 10th page of 1000 over 30 days: keyset, so as cheap as the first.
            _, page = get(f"{service.url}/decisions?since={q(month.isoformat())}&limit=1000")
            for _ in range(8):
                _, page = get(f"{service.url}/decisions?cursor={page['next']}&limit=1000")
            tenth = f"{service.url}/decisions?cursor={page['next']}&limit=1000"
            times, page = timed(tenth)
            last = page["decisions"][-1]
            after = (dt.datetime.fromisoformat(last["created_at"]), uuid.UUID(last["id"]))
            _, executed = plan(conn, Search(month, now, None, None, after, 1001))
            rows.append(row("30 days, 10th page of 1000 (cursor)", page, times, executed))
            print(rows[-1], flush=True)

            retained: list[str] = []
            for runs in (1, 2):
                conn.execute(AGE.format(columns=columns, copied=copied), (OLD,))  # type: ignore[arg-type]
                conn.execute("VACUUM ANALYZE decisions")
                elapsed, done = retention({**env, "LOG_LEVEL": "INFO"}, runs, work)
                line = f"| {runs} | {OLD:,} | {elapsed:.1f} | {OLD / elapsed:,.0f} | {' / '.join(done)} |"
                retained.append(line)
                print(line, flush=True)
    finally:
        service.stop()
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        admin.close()
    table = "\n".join(
        [
            "## The search and retention on 1 million decisions",
            "",
            f"`bench/audit.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {SIZE:,} decisions at random"
            f" times of the last 30 days (each with its own reference), PostgreSQL, one worker; {RUNS} calls each"
            " through the API after a warm-up; the last column is PostgreSQL's own execution time of the page's"
            " query (EXPLAIN ANALYZE).",
            "",
            "| search | rows | median ms | min ms | max ms | query ms (server) |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Plans:",
            "",
            *plans,
            "",
            f"Retention of {OLD:,} decisions older than RETENTION_DAYS (batches of 1,000), wall time including"
            " process start:",
            "",
            "| runs at once | decisions | seconds | decisions/s | logged |",
            "|---|---|---|---|---|",
            *retained,
        ]
    )
    print(table)
    replace_section(table)


if __name__ == "__main__":
    main()
