"""Running the start-up steps in order and their shutdown handlers in reverse, each bounded and logged.

Each step that succeeds pushes its closing handler, so shutdown runs exactly the
handlers of what was opened, in reverse. A failing step closes everything opened
before it and stops start-up: the service never serves half-initialised.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics, storage
from service.errors import StoreUnavailable
from service.lifecycle.signals import begin_shutdown
from service.models.metadata import ModelError
from service.settings import ConfigError, Settings
from service.tasks import abandon

logger = logging.getLogger("service.lifecycle")

STARTING = "Starting API and initializing all objects"
STARTED = "Successfully started API and initialized all objects"
CLOSED = "Successfully closed API."

# Allocations between young-generation collections once started (CPython's default: 700).
GC_YOUNG_THRESHOLD = 10_000
# Failures whose message says it all; anything else is logged with its traceback.
EXPECTED_STARTUP_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ModelError,
    StoreUnavailable,
    storage.SchemaError,
    OSError,
)


class StartupError(Exception):
    """A start-up step failed; what earlier steps opened has been closed."""


Opener = Callable[[State], Awaitable[str | None]]
Closer = Callable[[State], Awaitable[str | None]]


@dataclass(frozen=True)
class Step:
    """One start-up handler, and the shutdown handler that undoes it.

    `start` returns a phrase for the log (what was opened, where); `stop` likewise.
    Both are bounded: a start that hangs fails start-up; a stop that hangs is
    abandoned so the rest still run.
    """

    name: str
    start: Opener
    stop: Closer | None = None
    start_timeout: float = 30.0
    stop_timeout: float = 5.0


class Lifecycle:
    """The application's lifespan: start-up steps in order, shutdown handlers in reverse."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.startup = list(steps)

    @contextlib.asynccontextmanager
    async def __call__(self, app: Any) -> AsyncIterator[None]:
        state: State = app.state
        # Log from the first line on; the settings step re-applies these once validated.
        logs.configure(*logs.lenient_config(os.environ))
        logger.info(STARTING)
        shutdown: list[Step] = []
        for step in self.startup:
            started = time.perf_counter()
            try:
                done = await asyncio.wait_for(step.start(state), step.start_timeout)
            except BaseException as exc:
                if isinstance(exc, TimeoutError):
                    reason = f"did not finish within {step.start_timeout:g} s"
                else:
                    reason = str(exc) or type(exc).__name__
                # Expected failures get one clear line; anything else is a bug and gets its traceback.
                expected = isinstance(exc, (TimeoutError, *EXPECTED_STARTUP_ERRORS))
                logger.error(
                    "Startup step %r failed after %s: %s",
                    step.name,
                    _elapsed(started),
                    reason,
                    exc_info=None if expected else exc,
                )
                state.startup_failure = reason
                await self._run_shutdown(state, shutdown, budget=_budget(state))
                if isinstance(exc, Exception):
                    raise StartupError(f"Startup failed at step {step.name!r}: {reason}") from None
                raise
            logger.info("Startup step %r: %s in %s", step.name, done, _elapsed(started))
            if step.stop is not None:
                shutdown.append(step)
        # Start-up leaves many long-lived objects (modules, the model, the pools):
        # move them out of the collector's sight, so a full collection under load
        # scans only what requests create instead of stalling the loop.
        gc.collect()
        gc.freeze()
        # A request allocates and frees hundreds of containers, nearly all freed by
        # reference counting; at the default threshold (700) the young generation is
        # still collected every request or two, scanning every in-flight request's
        # objects each time: ~20 µs of collection per request under load.
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        logger.info(STARTED)
        try:
            yield
        finally:
            begin_shutdown(state)
            # One budget for the whole stop: what draining used is gone.
            spent = time.monotonic() - state.shutdown_began
            await self._run_shutdown(state, shutdown, budget=max(0.0, _budget(state) - spent))
            # The last counts: every request is answered by now, and closing the cache
            # and the store (after the metrics step) can still count errors.
            metrics.flush()
            logger.info(CLOSED)

    @staticmethod
    async def _run_shutdown(state: State, opened: list[Step], budget: float) -> None:
        """Run the stop handlers of what was opened, newest first, each bounded; never raise."""
        deadline = time.monotonic() + budget
        for step in reversed(opened):
            assert step.stop is not None
            timeout = max(0.0, min(step.stop_timeout, deadline - time.monotonic()))
            started = time.perf_counter()
            # asyncio.wait, not wait_for: wait_for waits for the cancelled close to
            # unwind, and a close stuck on a dead server may never do so.
            task = asyncio.ensure_future(step.stop(state))
            await asyncio.wait({task}, timeout=timeout)
            if not task.done():
                abandon(task)
                logger.error("Shutdown step %r did not finish within %.1f s; abandoned it", step.name, timeout)
                continue
            try:
                done = task.result()
            except Exception as exc:
                logger.error("Shutdown step %r failed after %s: %s", step.name, _elapsed(started), exc)
            else:
                logger.info("Shutdown step %r: %s in %s", step.name, done, _elapsed(started))
        opened.clear()


class QuietStartupFailure:
    """Keeps uvicorn from logging a traceback after a failed start-up.

    Starlette reports a failed lifespan start-up to the server with the traceback
    as its message, which uvicorn logs. The failing step has already logged one
    clear line (with the traceback only when it was a bug), so we send none.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_quietly(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, send_quietly)


def _budget(state: State) -> float:
    settings = getattr(state, "settings", None)
    return settings.shutdown_timeout if settings is not None else Settings().shutdown_timeout


def _elapsed(started: float) -> str:
    return f"{(time.perf_counter() - started) * 1000:.1f} ms"
