"""Giving up on a task without waiting for it, and awaiting a call for a bounded time that way.

Used where a deadline matters more than the clean-up of what missed it: a
database call past its deadline, a close stuck on a dead server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


def abandon(task: asyncio.Future[Any]) -> None:
    """Cancel the task and let it unwind on its own; its late failure is expected, not logged as lost."""
    task.cancel()
    task.add_done_callback(_consume_outcome)


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def within(seconds: float, call: Awaitable[T]) -> T:
    """Await `call`, run as a task of its own, for at most `seconds`; past them raise TimeoutError at once.

    At the deadline, or when the caller is cancelled, the task is abandoned rather than
    waited for: cancelling psycopg mid-query makes it send the server a cancel request
    and wait for that too, which a frozen network swallows.

    The caller waits on a plain future that the task settles as its last step: one pass
    of the event loop from the task's answer to its caller, where awaiting the task
    through shield() and wait_for() takes three. At 1,000 decisions a second over 32
    connections that halved the client's p50 (6.4-8.7 ms -> 3.2-3.3 ms). The deadline is
    a timer that settles the same future, not asyncio.timeout(): that one also tracks the
    task's cancellations, which the caller, waiting on nothing else, does not need (with
    the store's failure mapping as a class, an idle call's hop to its task went 38 -> 21 µs).
    """
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[T] = loop.create_future()
    task = loop.create_task(_settle(call, answer))
    deadline = loop.call_later(seconds, _expire, answer)
    try:
        return await answer
    except (TimeoutError, asyncio.CancelledError):
        abandon(task)
        if answer.done() and not answer.cancelled():
            answer.exception()  # the deadline's, if the caller was cancelled in the same pass: not an error to log
        raise
    finally:
        deadline.cancel()


def _expire(answer: asyncio.Future[Any]) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())


async def _settle(call: Awaitable[T], answer: asyncio.Future[T]) -> None:
    try:
        result = await call
    except asyncio.CancelledError:
        answer.cancel()
        raise
    except Exception as exc:
        if not answer.done():  # the caller may have given up
            answer.set_exception(exc)
    else:
        if not answer.done():
            answer.set_result(result)
