"""Giving up on a task without waiting for it.

Used where a deadline matters more than the clean-up of what missed it: a
database call past its deadline, a close stuck on a dead server.
"""

from __future__ import annotations

import asyncio
from typing import Any


def abandon(task: asyncio.Future[Any]) -> None:
    """Cancel the task and let it unwind on its own; its late failure is expected, not logged as lost."""
    task.cancel()
    task.add_done_callback(_consume_outcome)


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
