"""The Coalescer alone (pure logic, no servers): grouping, answers, failures, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from service.coalesce import Coalescer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """A `run` that records each call's items and answers each item doubled, after a round trip."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[list[int]] = []
        self.in_flight = self.most_in_flight = 0
        self.fail_on = fail_on

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(items)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            if self.fail_on in items:
                raise ValueError(f"failed on {self.fail_on}")
            return [2 * item for item in items]
        finally:
            self.in_flight -= 1


async def test_items_that_arrive_together_share_calls_and_each_gets_its_answer() -> None:
    run = Recorder()
    coalescer = Coalescer(run, max_items=10, max_in_flight=2)
    answers = await asyncio.gather(*(coalescer.submit(i) for i in range(45)))
    assert answers == [2 * i for i in range(45)]
    assert sorted(i for call in run.calls for i in call) == list(range(45))
    assert max(len(call) for call in run.calls) == 10
    assert len(run.calls) < 45 and run.most_in_flight == 2


async def test_a_failed_call_fails_only_its_own_items_each_with_its_own_exception() -> None:
    run = Recorder(fail_on=3)
    coalescer = Coalescer(run, max_items=5, max_in_flight=1, error=lambda exc: RuntimeError(str(exc)))
    results = await asyncio.gather(*(coalescer.submit(i) for i in range(10)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, Exception)]
    # Item 0 found nothing in flight and ran alone; items 1..5 then went in one call
    # (a worker takes what is queued, 5 at most) and failed together; 6..9 went next.
    assert run.calls[:2] == [[0], [1, 2, 3, 4, 5]]
    assert all(isinstance(r, RuntimeError) and str(r) == "failed on 3" for r in failed)
    assert len(failed) == 5 and len({id(r) for r in failed}) == 5
    assert results[0] == 0 and results[6:] == [12, 14, 16, 18]


async def test_a_cancelled_caller_leaves_the_others_answered() -> None:
    coalescer = Coalescer(Recorder(), max_items=10, max_in_flight=1)
    tasks = [asyncio.ensure_future(coalescer.submit(i)) for i in range(5)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError)
    assert [r for k, r in enumerate(results) if k != 1] == [0, 4, 6, 8]


@pytest.mark.parametrize("max_in_flight", [1, 3])
async def test_calls_in_flight_never_exceed_the_limit(max_in_flight: int) -> None:
    run = Recorder()
    coalescer = Coalescer(run, max_items=2, max_in_flight=max_in_flight)
    await asyncio.gather(*(coalescer.submit(i) for i in range(20)))
    assert run.most_in_flight == max_in_flight


async def test_a_caller_that_submits_again_as_soon_as_it_is_answered_is_served() -> None:
    """The worker that answered it is finishing in the same loop pass: a new one must start anyway."""
    coalescer = Coalescer(Recorder(), max_items=10, max_in_flight=1)

    async def twice() -> tuple[int, int]:
        first = await coalescer.submit(1)
        return first, await coalescer.submit(2)

    assert await asyncio.wait_for(twice(), 2) == (2, 4)


async def test_a_cancelled_worker_cancels_its_callers_and_the_queue_is_still_served() -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def stuck(items: list[int]) -> list[int]:
        if 100 in items:  # the lone first call, run by its caller: it holds one place in flight
            await release.wait()
        if 0 in items:
            started.set()
            await asyncio.sleep(3600)
        return items

    coalescer = Coalescer(stuck, max_items=1, max_in_flight=2)
    lone = asyncio.ensure_future(coalescer.submit(100))
    await asyncio.sleep(0)
    first = asyncio.ensure_future(coalescer.submit(0))  # queued: a worker takes it
    await started.wait()
    second = asyncio.ensure_future(coalescer.submit(7))  # queued behind it: two calls are in flight
    await asyncio.sleep(0)
    (worker,) = coalescer._workers
    worker.cancel()
    done, _ = await asyncio.wait([first], timeout=2)
    assert done and first.cancelled()  # not left waiting forever
    assert await asyncio.wait_for(second, 2) == 7
    release.set()
    assert await lone == 100


async def test_a_lone_item_runs_in_its_callers_task_and_counts_as_in_flight() -> None:
    run = Recorder()
    coalescer = Coalescer(run, max_items=10, max_in_flight=2)
    tasks_before = len(asyncio.all_tasks())
    first = asyncio.ensure_future(coalescer.submit(1))
    await asyncio.sleep(0)  # the first is in its call, run by its own task: no worker was started
    assert len(asyncio.all_tasks()) == tasks_before + 1 and run.in_flight == 1
    rest = [asyncio.ensure_future(coalescer.submit(i)) for i in range(2, 12)]
    assert await first == 2 and await asyncio.gather(*rest) == [2 * i for i in range(2, 12)]
    # The lone call counted against max_in_flight: never more than two calls at once.
    assert run.most_in_flight == 2 and run.calls[0] == [1]
