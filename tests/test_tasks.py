"""`within` alone (pure logic, no servers): answers, failures, deadlines, and how soon its caller resumes."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.tasks import within

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _answer(value: int, delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return value


async def _fail() -> int:
    await asyncio.sleep(0)
    raise ValueError("the call failed")


async def _slow_to_cancel(finished: asyncio.Event) -> int:
    """Like psycopg cancelled mid-query: it sends a cancel request and waits for it before it unwinds."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        await asyncio.shield(asyncio.sleep(0.5))
        finished.set()
        raise
    return 1


async def test_the_call_answers_and_fails_through_it() -> None:
    assert await within(1.0, _answer(7)) == 7
    with pytest.raises(ValueError, match="the call failed"):
        await within(1.0, _fail())


async def test_at_the_deadline_it_raises_at_once_and_the_call_unwinds_on_its_own() -> None:
    finished = asyncio.Event()
    started = time.perf_counter()
    with pytest.raises(TimeoutError):
        await within(0.05, _slow_to_cancel(finished))
    assert time.perf_counter() - started < 0.3  # not the 0.5 s the call takes to unwind
    assert not finished.is_set()
    await asyncio.wait_for(finished.wait(), 2.0)  # abandoned, not lost: its clean-up still ran


async def test_a_cancelled_caller_leaves_at_once_too() -> None:
    finished = asyncio.Event()
    caller = asyncio.ensure_future(within(5.0, _slow_to_cancel(finished)))
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert time.perf_counter() - started < 0.3
    await asyncio.wait_for(finished.wait(), 2.0)


async def test_the_caller_resumes_one_loop_pass_after_the_call_answers() -> None:
    """The point of `within` over wait_for(shield(task)), which takes three passes: under load each pass
    waits behind every other ready callback, and the passes of a decision's database call added up."""
    loop = asyncio.get_running_loop()
    passes = 0
    running = True

    def tick() -> None:
        nonlocal passes
        passes += 1
        if running:
            loop.call_soon(tick)

    answered_at = 0

    async def call() -> int:
        nonlocal answered_at
        await asyncio.sleep(0)
        answered_at = passes
        return 1

    loop.call_soon(tick)
    try:
        await within(1.0, call())
        assert passes - answered_at <= 1
    finally:
        running = False
