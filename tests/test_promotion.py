"""Model changes under load, as a platform runs the service: uvicorn from the Procfile, real PostgreSQL.

32 clients keep posting while a challenger is set, a champion promoted, rolled
back, and a corrupt version refused; SIGHUP rescans the registry under load; the
listening session comes back after PostgreSQL drops it and catches up on what it
missed. No request may fail, and every answer (and its committed row) must carry
the champion of the moment it started, give or take the 5 s a switch may take.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import signal
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from tests.conftest import Versions, corrupt_copy, redis_prefix, wait_until
from tests.procfile import STOPPED, Service, service_environment

pytestmark = pytest.mark.process

CLIENTS = 32
KEY = "promotion-test-key"
ADMIN = {"Authorization": f"Bearer {KEY}"}
SWITCH_SECONDS = 5.0


@dataclass
class Answer:
    started: float
    status: int
    version: str | None
    id: str | None


@dataclass
class Posting:
    """Clients that post until told to stop; every answer kept with the time its request started."""

    url: str
    applicants: list[dict[str, Any]]
    answers: list[Answer] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(CLIENTS)))

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        n = index
        while not self.stop.is_set():
            n += CLIENTS
            started = time.monotonic()
            try:
                response = await client.post("/decisions", json=self.applicants[n % len(self.applicants)])
            except httpx.TransportError as exc:
                self.failures[type(exc).__name__] += 1
                continue
            body = response.json() if response.status_code == 201 else {}
            self.answers.append(Answer(started, response.status_code, body.get("model_version"), body.get("id")))


@dataclass
class Change:
    """An assignment change: when the admin call started and returned, and the champion after it."""

    started: float
    returned: float
    champion: str


def champion_at(changes: list[Change], moment: float) -> tuple[str, str | None]:
    """The champion for a request that started at `moment`: (certain, or old) and the new one inside a switch window."""
    current, window = changes[0].champion, None
    for change in changes[1:]:
        if moment >= change.returned + SWITCH_SECONDS:
            current = change.champion
        elif moment >= change.started:
            window = change.champion
    return current, window


def switch_seconds(answers: list[Answer], change: Change, old: str, until: float) -> float:
    """From the promote call to the last request started after it (before `until`) that the old champion answered."""
    late = [a.started for a in answers if change.started <= a.started < until and a.version == old]
    return max(late, default=change.started) - change.started


def wait_for_workers(service: Service, count: int, timeout: float = 30) -> None:
    """Until every worker has started and reported what it serves (wait_ready sees only the first one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{service.url}/admin/models", headers=ADMIN, timeout=5)
        if response.status_code == 200 and len(response.json()["workers"]) == count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{count} workers did not report within {timeout} s:\n{service.log()}")


@pytest.fixture
def env(own_postgres_url: str, redis_url: str, versions: Versions) -> dict[str, str]:
    return service_environment(
        own_postgres_url,
        redis_url,
        REDIS_KEY_PREFIX=redis_prefix(),
        SHUTDOWN_TIMEOUT="10",
        MODEL_DIR=str(versions.root),
        MODEL_VERSION=versions.shipped,
        ADMIN_API_KEYS=f"ops:{KEY}",
    )


@pytest.fixture
def started(env: dict[str, str], tmp_path: Path) -> Iterator[list[Service]]:
    """Services a test starts (append to the list); each is stopped at the end, and must stop cleanly."""
    services: list[Service] = []
    yield services
    for service in services:
        if service.process.poll() is None:
            code, _ = service.stop(signal.SIGTERM)
            assert code in STOPPED, service.log()
        assert "Traceback" not in service.log()


def committed(database_url: str) -> dict[str, str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return {str(i): v for i, v in conn.execute("SELECT id, model_version FROM decisions").fetchall()}


async def admin_call(url: str, method: str, path: str, **kwargs: Any) -> tuple[float, float, httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        started = time.monotonic()
        response = await client.request(method, path, headers=ADMIN, **kwargs)
        return started, time.monotonic(), response


def test_promotion_rollback_and_a_corrupt_version_under_load_fail_no_request(
    env: dict[str, str],
    started: list[Service],
    tmp_path: Path,
    versions: Versions,
    own_postgres_url: str,
    applicants: list[dict[str, Any]],
) -> None:
    service = Service({**env, "WEB_CONCURRENCY": "2"}, tmp_path / "service.log")
    started.append(service)
    service.wait_ready()
    wait_for_workers(service, 2)
    corrupt = corrupt_copy(versions, versions.logistic, "test-corrupt-under-load")
    changes = [Change(0.0, 0.0, versions.shipped)]
    refused: list[httpx.Response] = []

    async def scenario() -> Posting:
        posting = Posting(service.url, applicants)
        clients = asyncio.ensure_future(posting.run())
        await asyncio.sleep(1.5)
        # A boosting challenger: each worker starts its process; the champion's answers must not notice.
        _, _, response = await admin_call(service.url, "PUT", "/admin/challenger", json={"version": versions.boosting})
        assert response.status_code == 200, response.text
        await asyncio.sleep(2.0)
        for champion in (versions.logistic, versions.shipped):  # promote, then roll back
            begun, returned, response = await admin_call(service.url, "POST", f"/admin/models/{champion}/promote")
            assert response.status_code == 200, response.text
            changes.append(Change(begun, returned, champion))
            await asyncio.sleep(SWITCH_SECONDS + 1.0)
        _, _, response = await admin_call(service.url, "POST", f"/admin/models/{corrupt}/promote")
        refused.append(response)
        await asyncio.sleep(2.0)
        posting.stop.set()
        await clients
        return posting

    posting = asyncio.run(scenario())
    answers = posting.answers
    assert not posting.failures, posting.failures
    assert Counter(a.status for a in answers) == {201: len(answers)}
    assert len(answers) > 1000
    assert refused[0].status_code == 422 and "sha256" in refused[0].json()["detail"]

    for answer in answers:
        certain, window = champion_at(changes, answer.started)
        assert answer.version in (certain, window), (answer, changes)
    # After the corrupt promotion, still the rolled-back champion.
    assert {a.version for a in answers if a.started > changes[-1].returned + SWITCH_SECONDS} == {versions.shipped}
    switches = [
        switch_seconds(answers, changes[1], versions.shipped, changes[2].started),
        switch_seconds(answers, changes[2], versions.logistic, changes[2].returned + SWITCH_SECONDS + 1),
    ]
    print(f"\npromote and rollback reached every worker {switches[0]:.3f} s and {switches[1]:.3f} s after the call")

    stored = committed(own_postgres_url)
    assert {a.id: stored[a.id] for a in answers if a.id} == {a.id: a.version for a in answers if a.id}
    with psycopg.connect(own_postgres_url, autocommit=True) as conn:
        revision, champion = conn.execute(
            "SELECT revision, champion FROM model_assignments ORDER BY revision DESC LIMIT 1"
        ).fetchone()  # type: ignore[misc]
        shadowed = conn.execute(
            "SELECT count(*) FROM challenger_decisions WHERE model_version = %s", (versions.boosting,)
        ).fetchone()[0]  # type: ignore[index]
    assert (revision, champion) == (4, versions.shipped)  # initial, challenger, promote, rollback: no fifth
    assert shadowed > 0
    log = service.log()
    assert log.count(f"Challenger {versions.boosting} loaded in process") >= 2  # one per worker


def test_promotion_reaches_every_worker_within_seconds(
    env: dict[str, str], started: list[Service], tmp_path: Path, versions: Versions, applicants: list[dict[str, Any]]
) -> None:
    """Five promotions under light load; the time from each call to the last answer from the old champion."""
    service = Service({**env, "WEB_CONCURRENCY": "2"}, tmp_path / "service.log")
    started.append(service)
    service.wait_ready()
    wait_for_workers(service, 2)
    switches: list[float] = []

    async def scenario() -> None:
        posting = Posting(service.url, applicants)
        clients = asyncio.ensure_future(posting.run())
        old = versions.shipped
        for i in range(5):
            new = versions.logistic if i % 2 == 0 else versions.shipped
            begun, returned, response = await admin_call(service.url, "POST", f"/admin/models/{new}/promote")
            assert response.status_code == 200
            await asyncio.sleep(SWITCH_SECONDS)
            switches.append(switch_seconds(posting.answers, Change(begun, returned, new), old, time.monotonic()))
            old = new
        posting.stop.set()
        await clients
        assert not posting.failures and {a.status for a in posting.answers} == {201}

    asyncio.run(scenario())
    runs = ", ".join(f"{s:.3f}" for s in switches)
    print(f"\npromotion to the last worker, 5 runs: {runs} s; median {statistics.median(switches):.3f} s")
    assert max(switches) < SWITCH_SECONDS


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_under_load_changes_no_answer(
    env: dict[str, str],
    started: list[Service],
    tmp_path: Path,
    versions: Versions,
    applicants: list[dict[str, Any]],
    workers: str,
) -> None:
    # A registry of the test's own, to change on disk.
    registry = tmp_path / "registry"
    shutil.copytree(versions.root / versions.shipped, registry / versions.shipped)
    service = Service({**env, "WEB_CONCURRENCY": workers, "MODEL_DIR": str(registry)}, tmp_path / "service.log")
    started.append(service)
    service.wait_ready()
    wait_for_workers(service, int(workers))

    async def scenario() -> Posting:
        posting = Posting(service.url, applicants)
        clients = asyncio.ensure_future(posting.run())
        await asyncio.sleep(1.0)
        service.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.5)
        # The champion's files damaged on disk: a rescan refuses them and keeps serving what it verified.
        with (registry / versions.shipped / "scorecard.json").open("ab") as handle:
            handle.write(b" ")
        service.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.5)
        posting.stop.set()
        await clients
        return posting

    posting = asyncio.run(scenario())
    assert not posting.failures, posting.failures
    assert Counter(a.status for a in posting.answers) == {201: len(posting.answers)}
    assert {a.version for a in posting.answers} == {versions.shipped}
    log = service.log()
    assert log.count("Rescanning the model registry") == 2 * int(workers)
    assert log.count("Cannot serve revision 1 of the model assignment") == int(workers)
    assert "restarting processes" not in log and "Started server process" in log
    assert log.count("Started server process") == int(workers)  # nobody restarted


def test_listener_catches_up_on_a_change_it_missed_while_disconnected(
    env: dict[str, str],
    started: list[Service],
    tmp_path: Path,
    versions: Versions,
    own_postgres_url: str,
    applicant: dict[str, Any],
) -> None:
    service = Service({**env, "WEB_CONCURRENCY": "2"}, tmp_path / "service.log")
    started.append(service)
    service.wait_ready()
    wait_for_workers(service, 2)
    with psycopg.connect(own_postgres_url, autocommit=True) as conn:
        dbname = conn.info.dbname

        def listening() -> int:
            # A listening session's last query is its LISTEN, or the revision it read after it.
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                " AND (query LIKE 'LISTEN%%' OR query LIKE 'SELECT coalesce(max(revision)%%')",
                (dbname,),
            ).fetchone()
            return int(row[0]) if row else 0

        assert wait_until(lambda: listening() == 2, timeout=10)
        # Every session of the service dies (as in a PostgreSQL restart) ...
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND application_name LIKE 'credit-scoring-%%'",
            (dbname,),
        )
        # ... and the assignment changes while nobody listens: this NOTIFY reaches no one.
        with conn.transaction():
            conn.execute(
                "INSERT INTO model_assignments (revision, action, champion, changed_at, changed_by)"
                " VALUES (2, 'promote', %s, %s, 'test')",
                (versions.logistic, dt.datetime.now(dt.UTC)),
            )
            conn.execute("SELECT pg_notify('model_assignment', '2')")
    changed = time.monotonic()
    seen: list[str] = []
    while time.monotonic() - changed < SWITCH_SECONDS:
        response = httpx.post(f"{service.url}/decisions", json=applicant, timeout=10)
        if response.status_code == 201:
            seen.append(response.json()["model_version"])
            if seen[-10:] == [versions.logistic] * 10:
                break
        time.sleep(0.02)
    assert seen[-10:] == [versions.logistic] * 10, seen[-20:]
    log = service.log()
    assert log.count("Lost the session that listens for model assignment changes") == 2
    assert log.count("Listening for model assignment changes again") == 2
