"""The search and retention as they run for real: the service from the Procfile, retention as its own process.

- 10,000 decisions paged through with limit=1000 while 32 clients keep inserting:
  every decision of the searched window is listed once, none twice, none skipped.
- Retention run twice at once on 100,000 old decisions: each is erased exactly
  once, newer ones are untouched, cached copies are dropped.

Both on PostgreSQL + Redis and on embedded SQLite.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest
import redis

from service.schemas import APPLICANT_FIELDS
from service.storage import COMMIT_BOUND
from tests.conftest import redis_prefix, wait_until
from tests.procfile import ROOT, STOPPED, Service, procfile_command, service_environment

pytestmark = pytest.mark.process

SEEDED = 10_000
PAGE = 1000
INSERTERS = 32
OLD = 100_000
REQUEST_TIMEOUT = 0.5
# How long writes are held back while the first page is read: within what a write may wait for a lock.
HOLD = 0.15
HORIZON = COMMIT_BOUND * REQUEST_TIMEOUT


@pytest.fixture(params=["postgres+redis", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """A service environment on a database of the test's own (the window search sees every row in it)."""
    if request.param == "postgres+redis":
        return service_environment(
            request.getfixturevalue("own_postgres_url"),
            request.getfixturevalue("redis_url"),
            REDIS_KEY_PREFIX=redis_prefix(),
        )
    env = service_environment("", "", SQLITE_PATH=str(tmp_path / "decisions.sqlite3"))
    del env["DATABASE_URL"], env["REDIS_URL"]
    return env


def _rows(env: dict[str, str], sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if "DATABASE_URL" in env:
        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]
    with sqlite3.connect(env["SQLITE_PATH"]) as conn:
        return conn.execute(sql.replace("%s", "?"), params).fetchall()


@pytest.fixture
def service(backend: dict[str, str], tmp_path: Path) -> Iterator[Service]:
    # A short request timeout: the window search stops three of them (1.5 s) before now. Two workers on
    # PostgreSQL, so that a search and the inserts it could miss run in different processes. SQLite's
    # one writer per file is why the embedded default serves one process: there a search waits on the
    # store's one thread behind the inserts queued before it.
    workers = "2" if "DATABASE_URL" in backend else "1"
    env = {**backend, "DATABASE_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT), "WEB_CONCURRENCY": workers}
    running = Service(env, tmp_path / "service.log")
    try:
        running.wait_ready()
        yield running
    finally:
        code, _ = running.stop(signal.SIGTERM)
        assert code in STOPPED, running.log()


# -- paging under inserts ------------------------------------------------------------------------------


def _hold_writes(env: dict[str, str], seconds: float, held: threading.Event) -> None:
    """Hold inserts back for a while (reads go on): decisions made meanwhile commit late, all at once."""
    if "DATABASE_URL" in env:
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            conn.execute("LOCK TABLE decisions IN SHARE MODE")  # conflicts with INSERT, not with SELECT
            held.set()
            time.sleep(seconds)
        return
    conn = sqlite3.connect(env["SQLITE_PATH"], isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")  # the write lock; WAL readers go on
        held.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def _page_through_while_inserting(
    url: str, env: dict[str, str], applicants: list[dict[str, Any]], since: str
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=INSERTERS + 1)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        for start in range(0, SEEDED, PAGE):
            batch = [applicants[(start + i) % len(applicants)] for i in range(PAGE)]
            response = await http.post("/decisions/batch", json={"applicants": batch})
            assert response.status_code == 201, response.text
        await asyncio.sleep(HORIZON + 0.1)  # the seeded decisions are behind the search's horizon now
        paging = True
        inserted = 0

        async def insert(n: int) -> None:
            nonlocal inserted
            while paging:
                response = await http.post("/decisions", json=applicants[n])
                assert response.status_code == 201, response.text
                inserted += 1

        inserters = [asyncio.create_task(insert(n)) for n in range(INSERTERS)]
        holding: asyncio.Future[None] | None = None
        # Inserting at full speed for longer than the horizon before the first page: the window holds
        # inserted decisions too, and decisions are still committing as each page is read.
        await asyncio.sleep(HORIZON + 0.5)
        try:
            seen: list[str] = []
            pages = []
            params: dict[str, Any] = {"since": since, "limit": PAGE}
            # The first page is read while writes are held back: decisions made just before it commit
            # just after it. A search that went up to now would skip them.
            held = threading.Event()
            holding = asyncio.create_task(asyncio.to_thread(_hold_writes, env, HOLD, held))
            await asyncio.to_thread(held.wait, 5)
            await asyncio.sleep(0.05)
            while True:
                response = await http.get("/decisions", params=params)
                assert response.status_code == 200, response.text
                page = response.json()
                pages.append(page)
                seen += [d["id"] for d in page["decisions"]]
                if page["next"] is None:
                    break
                params = {"cursor": page["next"], "limit": PAGE}
                await asyncio.sleep(0.05)  # let the inserters get ahead of the next page
        finally:
            paging = False
            await asyncio.gather(*inserters)
            if holding is not None:
                await holding
    return {"seen": seen, "until": pages[0]["until"], "pages": len(pages), "inserted": inserted}


def test_paging_through_10000_decisions_while_32_clients_insert(
    service: Service, backend: dict[str, str], applicants: list[dict[str, Any]]
) -> None:
    since = dt.datetime.now(dt.UTC).isoformat()
    result = asyncio.run(_page_through_while_inserting(service.url, backend, applicants, since))
    seen = result["seen"]
    assert len(seen) == len(set(seen)), f"{len(seen) - len(set(seen))} decisions listed twice"
    # The database is the test's own: every row made before the first page's `until` is in the window.
    until = dt.datetime.fromisoformat(result["until"])
    bound = until if "DATABASE_URL" in backend else until.isoformat()  # SQLite keeps times as ISO 8601 text
    stored = {str(r[0]) for r in _rows(backend, "SELECT id FROM decisions WHERE created_at < %s", (bound,))}
    assert result["inserted"] > INSERTERS, "the inserters must have been inserting while the pages were read"
    assert len(stored) > SEEDED, "and some of what they inserted is in the window"
    assert len(stored) >= SEEDED
    assert set(seen) == stored, f"{len(stored - set(seen))} skipped, {len(set(seen) - stored)} outside the window"
    assert result["pages"] >= SEEDED // PAGE


# -- retention -------------------------------------------------------------------------------------


def _seed_old(env: dict[str, str], template: str) -> None:
    """100,000 copies of one decision, made 800 to 801 days ago (past the default 761-day retention)."""
    columns = [name for (name,) in _rows(env, _COLUMNS[("DATABASE_URL" in env)])]
    fresh = {"id", "created_at", "idempotency_key", "request_hash", "batch_id", "batch_position"}
    kept = [c for c in columns if c not in fresh]
    if "DATABASE_URL" in env:
        sql = (
            f"INSERT INTO decisions (id, created_at, {', '.join(kept)})"
            f" SELECT gen_random_uuid(), now() - interval '800 days' - g * interval '1 second', {', '.join(kept)}"
            f" FROM decisions, generate_series(1, {OLD}) AS g WHERE id = %s"
        )
        with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
            conn.execute(sql, (template,))  # type: ignore[arg-type]
        return
    uuid_text = (
        "lower(substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3) || '-8' || substr(h, 18, 3)"
        " || '-' || substr(h, 21, 12))"
    )
    sql = (
        f"WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < {OLD}),"
        " r(n, h) AS (SELECT n, hex(randomblob(16)) FROM g)"
        f" INSERT INTO decisions (id, created_at, {', '.join(kept)})"
        f" SELECT {uuid_text}, strftime('%Y-%m-%dT%H:%M:%S+00:00', 'now', '-800 days', '-' || n || ' seconds'),"
        f" {', '.join(kept)} FROM decisions, r WHERE id = ?"
    )
    with sqlite3.connect(env["SQLITE_PATH"]) as conn:
        conn.execute(sql, (template,))


_COLUMNS = {
    True: "SELECT column_name FROM information_schema.columns WHERE table_name = 'decisions' ORDER BY ordinal_position",
    False: "SELECT name FROM pragma_table_info('decisions')",
}


def _retention(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            # The Procfile's retention: line, as a scheduler runs it.
            ["bash", "-c", "exec " + procfile_command("retention")],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def test_retention_run_twice_at_once_erases_each_old_decision_once(
    service: Service, backend: dict[str, str], applicant: dict[str, Any], tmp_path: Path
) -> None:
    recent = httpx.post(f"{service.url}/decisions", json={**applicant, "reference": "KEEP"}).json()
    _seed_old(backend, recent["id"])
    old_id = _rows(backend, "SELECT id FROM decisions WHERE reference = 'KEEP' ORDER BY created_at LIMIT 1")[0][0]
    cached = None
    if "REDIS_URL" in backend:
        # An old decision read lately: its cached copy must go with its inputs.
        assert httpx.get(f"{service.url}/decisions/{old_id}").status_code == 200
        cached = redis.Redis.from_url(backend["REDIS_URL"])
        key = f"{redis_prefix()}decision:{old_id}"
        assert wait_until(lambda: bool(cached.exists(key)))  # written beside the response, a moment later

    runs = [_retention(backend, tmp_path / f"retention-{n}.log") for n in range(2)]
    for run in runs:
        assert run.wait(300) == 0, (tmp_path / "retention-0.log").read_text()
    logs = [(tmp_path / f"retention-{n}.log").read_text() for n in range(2)]
    erased = [int(re.search(r"erased (\d+) decisions in", log).group(1)) for log in logs]  # type: ignore[union-attr]
    assert sum(erased) == OLD, (erased, logs)
    assert all(re.search(r"\d+ decisions/s", log) for log in logs), logs

    null_inputs = " AND ".join(f"{name} IS NULL" for name in (*APPLICANT_FIELDS, "reference"))
    assert (
        _rows(backend, f"SELECT count(*) FROM decisions WHERE erased_by = 'retention' AND {null_inputs}")[0][0] == OLD
    )
    assert _rows(backend, "SELECT count(*) FROM decisions WHERE erased_at IS NULL")[0][0] == 1
    kept = httpx.get(f"{service.url}/decisions/{recent['id']}").json()
    assert kept == recent, "a recent decision is untouched"
    old = httpx.get(f"{service.url}/decisions/{old_id}").json()
    assert old["reference"] is None and old["probability_of_default"] == recent["probability_of_default"]
    if cached is not None:
        assert not cached.exists(key)
        cached.close()
    # Nothing left to do: a third run erases nothing.
    third = _retention(backend, tmp_path / "retention-2.log")
    assert third.wait(60) == 0
    assert "erased 0 decisions" in (tmp_path / "retention-2.log").read_text()
