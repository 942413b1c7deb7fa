"""The asynchronous pool's lending (service/storage/postgres_lending.py) on a real PostgreSQL: the connection kept at
hand, and every way it goes back to the pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import psycopg_pool
import pytest

from service.storage import outage
from service.storage.postgres_lending import Lender

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def pool(postgres_url: str) -> AsyncIterator[psycopg_pool.AsyncConnectionPool]:
    opened = psycopg_pool.AsyncConnectionPool(
        postgres_url, min_size=3, max_size=3, open=False, kwargs={"autocommit": True}, name="lending-test"
    )
    await opened.open(wait=True, timeout=5)
    try:
        yield opened
    finally:
        await opened.close()


async def _backend(conn: psycopg.AsyncConnection[Any]) -> int:
    cur = await conn.execute("SELECT pg_backend_pid()")
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


def _available(pool: psycopg_pool.AsyncConnectionPool) -> int:
    return int(pool.get_stats()["pool_available"])


async def test_calls_one_after_another_take_the_kept_connection_without_the_pool(
    pool: psycopg_pool.AsyncConnectionPool,
) -> None:
    lender = Lender(pool, wait=3)
    first = await lender.lend(_backend)
    requests = pool.get_stats()["requests_num"]
    assert [await lender.lend(_backend) for _ in range(20)] == [first] * 20
    assert pool.get_stats()["requests_num"] == requests  # the pool lent nothing more
    assert lender.keeping == 1 and _available(pool) == 2
    await lender.give_back()
    assert lender.keeping == 0 and _available(pool) == 3


async def test_calls_in_flight_together_borrow_from_the_pool_and_one_connection_stays_kept(
    pool: psycopg_pool.AsyncConnectionPool,
) -> None:
    lender = Lender(pool, wait=3)
    await lender.lend(_backend)

    async def slow(conn: psycopg.AsyncConnection[Any]) -> int:
        await conn.execute("SELECT pg_sleep(0.1)")
        return await _backend(conn)

    pids = await asyncio.gather(*(lender.lend(slow) for _ in range(3)))
    assert len(set(pids)) == 3  # each on its own connection
    assert lender.keeping == 1 and _available(pool) == 2  # one kept, the others back in the pool


async def test_a_failed_call_gives_its_connection_back_to_the_pool(pool: psycopg_pool.AsyncConnectionPool) -> None:
    lender = Lender(pool, wait=3)
    await lender.lend(_backend)

    async def fail(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT 1/0")

    with pytest.raises(psycopg.errors.DivisionByZero):
        await lender.lend(fail)
    assert lender.keeping == 0 and _available(pool) == 3

    async def cancelled(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("SELECT pg_sleep(5)")

    call = asyncio.ensure_future(lender.lend(cancelled))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert lender.keeping == 0
    await pool.check()
    assert _available(pool) == 3  # rolled back or replaced by the pool, not lost


async def test_a_connection_left_in_a_transaction_is_not_kept(pool: psycopg_pool.AsyncConnectionPool) -> None:
    lender = Lender(pool, wait=3)

    async def open_transaction(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute("BEGIN")

    await lender.lend(open_transaction)
    assert lender.keeping == 0 and _available(pool) == 3


async def test_a_kept_connection_idle_too_long_goes_back_to_the_pool_and_the_pool_lends_one(
    pool: psycopg_pool.AsyncConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    lender = Lender(pool, wait=3)
    kept = await lender.lend(_backend)
    monkeypatch.setattr(outage, "CHECK_IF_IDLE_SECONDS", 0.05)
    await asyncio.sleep(0.1)
    # Another connection from the pool answers (it hands out its longest idle one first), not the kept one.
    assert await lender.lend(_backend) != kept
    assert lender.keeping == 1 and _available(pool) == 2


async def test_after_close_no_connection_is_kept(pool: psycopg_pool.AsyncConnectionPool) -> None:
    """A call still running when the store closes (abandoned at its deadline) gives its connection back at its end."""
    lender = Lender(pool, wait=3)
    await lender.lend(_backend)

    async def slow(conn: psycopg.AsyncConnection[Any]) -> int:
        await conn.execute("SELECT pg_sleep(0.2)")
        return await _backend(conn)

    late = asyncio.ensure_future(lender.lend(slow))
    await asyncio.sleep(0.05)
    await lender.close()
    assert lender.keeping == 0 and _available(pool) == 2
    await late
    assert lender.keeping == 0 and _available(pool) == 3


async def test_a_connection_goes_back_to_the_pool_while_calls_wait_for_one(postgres_url: str) -> None:
    """With every connection lent, a call that ends gives its connection to the ones waiting, not to the keep."""
    small = psycopg_pool.AsyncConnectionPool(
        postgres_url, min_size=1, max_size=1, open=False, kwargs={"autocommit": True}, name="lending-small"
    )
    await small.open(wait=True, timeout=5)
    try:
        lender = Lender(small, wait=2)

        async def slow(conn: psycopg.AsyncConnection[Any]) -> int:
            await conn.execute("SELECT pg_sleep(0.05)")
            return await _backend(conn)

        pids = await asyncio.gather(*(lender.lend(slow) for _ in range(6)))
        assert len(set(pids)) == 1 and lender.keeping == 1
    finally:
        await small.close()
