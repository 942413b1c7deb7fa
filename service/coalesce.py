"""Calls that arrive together, run together: the group commit and the batched reads.

Under load many requests want the same kind of round trip at once (insert a
row, read a row, read a cache key). A Coalescer queues their items and runs
them as one call on a few worker tasks: while one call is in flight, the next
items queue up and go in the following one. Each caller still gets its own
answer, or the exception `error` makes for it, and only once its call has
completed.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_items: int,
        max_in_flight: int,
        error: Callable[[Exception], Exception] = lambda exc: exc,
    ) -> None:
        """`run(items)` answers each item, in order; `error(exc)` is what each caller of a failed call raises."""
        self._run = run
        self._max_items = max_items
        self._max_in_flight = max_in_flight
        self._error = error
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        # Strong references: the event loop keeps only weak ones to tasks.
        self._workers: set[asyncio.Task[None]] = set()
        # Calls run by their caller's own task (see submit): they count against max_in_flight too.
        self._inline = 0

    async def submit(self, item: T) -> R:
        if not self._queue and not self._workers and not self._inline:
            # Nothing in flight, nobody waiting: no group to form. The caller runs its
            # call itself, sparing the queue, a worker task and a future: what a request
            # costs below saturation. Others arriving meanwhile queue for the next call.
            return await self._run_inline(item)
        waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, waiter))
        if len(self._workers) + self._inline < self._max_in_flight:
            self._start_worker()
        return await waiter

    async def _run_inline(self, item: T) -> R:
        self._inline += 1
        try:
            answers = await self._run([item])
            if len(answers) != 1:
                raise RuntimeError(f"{len(answers)} answers for 1 item")
            return answers[0]
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            self._inline -= 1
            if self._queue and len(self._workers) + self._inline < self._max_in_flight:
                self._start_worker()

    def _start_worker(self) -> None:
        # A fresh context: a worker serves many requests, so its log lines must not
        # carry the request id of the one that happened to start it.
        worker = asyncio.get_running_loop().create_task(self._work(), context=contextvars.Context())
        self._workers.add(worker)

    async def _work(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue[: self._max_items], self._queue[self._max_items :]
                try:
                    answers = await self._run([item for item, _ in group])
                    if len(answers) != len(group):
                        raise RuntimeError(f"{len(answers)} answers for {len(group)} items")
                except asyncio.CancelledError:
                    for _, waiter in group:
                        waiter.cancel()
                    raise
                except Exception as exc:
                    for _, waiter in group:
                        if not waiter.done():  # a waiter whose request was cancelled needs no answer
                            waiter.set_exception(self._error(exc))
                    continue
                for (_, waiter), answer in zip(group, answers, strict=True):
                    if not waiter.done():
                        waiter.set_result(answer)
        finally:
            # Leave the set at once, not in a done-callback a loop pass later: a
            # submit() in between would count this worker as running and start none.
            current = asyncio.current_task()
            if current is not None:
                self._workers.discard(current)
            if self._queue and len(self._workers) + self._inline < self._max_in_flight:
                self._start_worker()  # left early (cancelled): the queue still needs a worker
