"""The system of record going away and coming back, through a proxy the test cuts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.tcpproxy import TcpProxy


@pytest.fixture
def proxied(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    parts = urlsplit(postgres_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
        yield proxy, urlunsplit(parts._replace(netloc=netloc))


def test_postgres_outage_answers_503_then_recovers(proxied: tuple[TcpProxy, str], applicant: dict) -> None:
    proxy, url = proxied
    settings = Settings(database_url=url, database_request_timeout=1.0, database_connect_timeout=2.0)
    with TestClient(create_app(settings)) as client:
        created = client.post("/decisions", json=applicant)
        assert created.status_code == 201
        proxy.cut()
        took = []
        for _ in range(50):
            started = time.monotonic()
            response = client.post("/decisions", json=applicant)
            took.append(time.monotonic() - started)
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"]
        assert took[0] < 3
        # Once the service has seen the database fail, the next requests do not wait for it.
        assert sorted(took[1:])[int(0.99 * len(took[1:]))] < 0.05, took
        # Lookups that miss the cache need the store too.
        assert client.get("/decisions/00000000-0000-4000-8000-000000000000").status_code == 503
        # The cached decision is still served.
        assert client.get(created.headers["location"]).status_code == 200
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200
        proxy.restore()
        restored = time.monotonic()
        while (
            status := client.post("/decisions", json=applicant).status_code
        ) != 201 and time.monotonic() - restored < 10:
            assert status == 503
            time.sleep(0.02)
        assert status == 201
        # One probe at a time, every half second, finds it back.
        assert time.monotonic() - restored < 2.0
        assert client.get("/health/ready").status_code == 200


def test_postgres_that_stops_answering_gives_503_in_bounded_time(
    proxied: tuple[TcpProxy, str], applicant: dict
) -> None:
    proxy, url = proxied
    settings = Settings(database_url=url, database_request_timeout=1.0, database_connect_timeout=2.0)
    with TestClient(create_app(settings)) as client:
        assert client.post("/decisions", json=applicant).status_code == 201
        proxy.freeze()
        started = time.monotonic()
        response = client.post("/decisions", json=applicant)
        assert response.status_code == 503
        assert response.headers["retry-after"]
        # The whole call is bounded (2 x DATABASE_REQUEST_TIMEOUT), not just the pool wait.
        assert time.monotonic() - started < 3.5
        # Later ones fail fast: the probe, not every request, waits for the frozen database.
        took = []
        for _ in range(30):
            started = time.monotonic()
            assert client.post("/decisions", json=applicant).status_code == 503
            took.append(time.monotonic() - started)
        assert max(took) < 0.05, took
        ready = time.monotonic()
        assert client.get("/health/ready").status_code == 503
        assert time.monotonic() - ready < 0.05
        proxy.restore()
        restored = time.monotonic()
        while client.post("/decisions", json=applicant).status_code != 201:
            assert time.monotonic() - restored < 3.0
            time.sleep(0.02)
        print(f"back {time.monotonic() - restored:.2f} s after the frozen database answered again")


@pytest.fixture
def read_only_database(postgres_url: str) -> Iterator[str]:
    """A database of its own that the test can turn read-only, as after a failover to a standby."""
    admin_url = urlunsplit(urlsplit(postgres_url)._replace(path="/postgres"))
    name = urlsplit(postgres_url).path.lstrip("/") + "_ro"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield name
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_read_only_database_gives_503_not_500(postgres_url: str, read_only_database: str, applicant: dict) -> None:
    url = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{read_only_database}"))
    admin_url = urlunsplit(urlsplit(postgres_url)._replace(path="/postgres"))
    with TestClient(create_app(Settings(database_url=url))) as client:
        assert client.post("/decisions", json=applicant).status_code == 201
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(
                    sql.Identifier(read_only_database)
                )
            )
            # New sessions see the setting: end the pool's current ones.
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (read_only_database,)
            )
        response = client.post("/decisions", json=applicant)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "unavailable"


def test_shutdown_with_frozen_postgres_and_redis_ends_inside_budget(
    proxied: tuple[TcpProxy, str], redis_url: str, applicant: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """Servers that stop answering mid-close cannot hold the shutdown past SHUTDOWN_TIMEOUT."""
    proxy, url = proxied
    redis_parts = urlsplit(redis_url)
    with TcpProxy(redis_parts.hostname or "127.0.0.1", redis_parts.port or 6379) as redis_proxy:
        settings = Settings(
            database_url=url,
            redis_url=f"redis://127.0.0.1:{redis_proxy.port}/0",
            redis_key_prefix="frozen-close:",
            shutdown_timeout=3,
            cache_ttl=60,
        )
        with TestClient(create_app(settings)) as client:
            assert client.post("/decisions", json=applicant).status_code == 201
            proxy.freeze()
            redis_proxy.freeze()
            started = time.monotonic()
        assert time.monotonic() - started < 3.5
    assert "Successfully closed API." in caplog.text


def test_a_network_that_swallows_packets_keeps_no_pooled_connection_once_the_database_is_back(
    proxied: tuple[TcpProxy, str],
) -> None:
    """A warm pool, a freeze of a few probes' length, then the database back: answered within 2 s, and every
    pooled connection free again (a probe that checked the pool's connections during the freeze held them
    for ~5 s after, while psycopg waited for cancel requests the network had swallowed)."""
    import asyncio
    import uuid

    from service.errors import StoreUnavailable
    from service.storage import PostgresStore

    proxy, url = proxied

    async def run() -> tuple[float, dict[str, int], list[object]]:
        store = await PostgresStore.open(  # 10 connections for the asynchronous pool, 4 for the commit threads
            url, pool_size=14, connect_timeout=2, request_timeout=1.0, application_name="credit-scoring-test"
        )
        try:
            await store.migrate()

            async def slow(conn: psycopg.AsyncConnection) -> None:
                await conn.execute("SELECT pg_sleep(0.2)")

            await asyncio.gather(*(store._run(slow) for _ in range(10)))  # ten connections open
            proxy.freeze()
            with pytest.raises(StoreUnavailable):
                await store.get(uuid.uuid4())
            await asyncio.sleep(3.0)  # a few probes, each cut at its bound
            proxy.restore()
            restored = time.monotonic()
            while True:
                try:
                    await store.get(uuid.uuid4())
                    break
                except StoreUnavailable:
                    assert time.monotonic() - restored < 5
                    await asyncio.sleep(0.02)
            back = time.monotonic() - restored
            stats = store._pool.get_stats()
            # Ten at once right away: none waits for a connection held by the freeze.
            results = await asyncio.wait_for(
                asyncio.gather(*(store._run(slow) for _ in range(9)), return_exceptions=True), timeout=3
            )
            return back, stats, results
        finally:
            await store.close()

    back, stats, results = asyncio.run(run())
    assert back < 2.0, back
    assert stats["pool_available"] >= 8, stats  # at most the one request abandoned in the freeze is held
    assert all(r is None for r in results), results


@pytest.mark.parametrize("checked", [False, True], ids=["in use", "checked before it is lent"])
def test_a_group_commit_thread_on_a_frozen_database_is_cut_at_its_deadline(
    proxied: tuple[TcpProxy, str], monkeypatch: pytest.MonkeyPatch, checked: bool
) -> None:
    """Groups without keys commit on threads (blocking psycopg): one stuck on a frozen network must not stay stuck
    until the network comes back, or the next groups would queue behind it and shutdown would wait for it. Stuck
    in the COPY, or in the check of a connection idle for a while, before the pool lends it."""
    import asyncio
    import datetime as dt
    import uuid

    from service import dataset
    from service.errors import StoreUnavailable
    from service.storage import PostgresStore, Record, outage, postgres
    from tests.conftest import shipped_model

    monkeypatch.setattr(postgres, "SLOW_LOOP", 0.0)  # every group without keys on a thread
    checks: list[object] = []
    if checked:
        import psycopg_pool

        monkeypatch.setattr(outage, "CHECK_IF_IDLE_SECONDS", -1.0)
        real_check = psycopg_pool.ConnectionPool.check_connection
        monkeypatch.setattr(
            psycopg_pool.ConnectionPool,
            "check_connection",
            staticmethod(lambda conn: checks.append(conn) or real_check(conn)),
        )
    proxy, url = proxied
    model, applicant = shipped_model(), dataset.load().applicants[3]

    def records(n: int) -> list[Record]:
        return [Record(model.decide(applicant, uuid.uuid4(), dt.datetime.now(dt.UTC)), applicant) for _ in range(n)]

    async def run() -> None:
        # Two connections for the asynchronous pool, one commit thread: a stuck thread would stop every group.
        store = await PostgresStore.open(
            url, pool_size=3, connect_timeout=1, request_timeout=0.5, application_name="credit-scoring-test"
        )
        assert store._commits is not None and store._commits.size == 1
        try:
            await store.migrate()
            await asyncio.to_thread(store._commits.pool.wait, 5.0)
            proxy.freeze()
            started = time.monotonic()
            # The first runs alone on the asynchronous pool; the other three queue and go as one group, on the thread.
            failed = await asyncio.gather(*(store.insert(r) for r in records(4)), return_exceptions=True)
            assert all(isinstance(f, StoreUnavailable) for f in failed), failed
            assert time.monotonic() - started < 1.5  # 2 x DATABASE_REQUEST_TIMEOUT, and no more
            assert store._commits.pool.get_stats()["requests_num"] == 1
            assert bool(checks) == checked  # stuck in the check of the connection, or in the COPY
            # The network is still frozen, and yet the thread is free again.
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.run_in_executor(store._commits._threads, time.monotonic), timeout=1.0)
            proxy.restore()
            restored = time.monotonic()
            while True:
                batch = records(4)
                try:
                    await asyncio.gather(*(store.insert(r) for r in batch))
                    break
                except StoreUnavailable:
                    assert time.monotonic() - restored < 2.0
                    await asyncio.sleep(0.02)
            assert all([await store.get(r.decision.id) for r in batch])
        finally:
            closing = time.monotonic()
            await store.close()
            assert time.monotonic() - closing < 6.0

    asyncio.run(run())


def test_closing_the_store_with_a_group_stuck_on_a_frozen_database_answers_it_503(
    proxied: tuple[TcpProxy, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cuts a commit thread before the call's own bound (here while the pool checks the connection it is
    about to lend): the group's requests get their 503 then, rather than waiting on a worker that is gone."""
    import asyncio
    import datetime as dt
    import uuid

    from service import dataset
    from service.errors import StoreUnavailable
    from service.storage import PostgresStore, Record, outage, postgres
    from tests.conftest import shipped_model

    monkeypatch.setattr(postgres, "SLOW_LOOP", 0.0)
    monkeypatch.setattr(outage, "CHECK_IF_IDLE_SECONDS", -1.0)
    proxy, url = proxied
    model, applicant = shipped_model(), dataset.load().applicants[3]

    async def run() -> list[object]:
        store = await PostgresStore.open(
            url, pool_size=3, connect_timeout=1, request_timeout=2.0, application_name="credit-scoring-test"
        )
        await store.migrate()
        assert store._commits is not None
        await asyncio.to_thread(store._commits.pool.wait, 5.0)
        proxy.freeze()
        records = [Record(model.decide(applicant, uuid.uuid4(), dt.datetime.now(dt.UTC)), applicant) for _ in range(4)]
        inserts = asyncio.gather(*(store.insert(r) for r in records), return_exceptions=True)
        await asyncio.sleep(0.3)
        assert store._commits._calls  # the group is on its thread, stuck in the check
        started = time.monotonic()
        await store.close()
        # The inline one (asynchronous pool) waits for its own bound of 4 s; the group answers when it is cut.
        answers = await asyncio.wait_for(inserts, timeout=6.0)
        assert time.monotonic() - started < 5.0
        return answers

    answers = asyncio.run(run())
    assert all(isinstance(a, StoreUnavailable) for a in answers), answers
