"""Start-up and shutdown: the only place where resources open and close.

Start-up runs an ordered list of steps; each step that succeeds pushes its
closing handler, so shutdown runs exactly the handlers of what was opened, in
reverse. A failing step closes everything opened before it and stops start-up:
the service never serves half-initialised. Every step logs what it opened or
closed, where (passwords masked) and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import State

from service import logs, model, storage
from service.cache import MemoryCache, RedisCache
from service.settings import Settings

logger = logging.getLogger("service.lifecycle")

STARTING = "Starting API and initializing all objects"
STARTED = "Successfully started API and initialized all objects"
CLOSING = "Closing API."
CLOSED = "Successfully closed API."


class StartupError(Exception):
    """A start-up step failed; what earlier steps opened has been closed."""


Opener = Callable[[State], Awaitable[str | None]]
Closer = Callable[[State], Awaitable[str | None]]


@dataclass(frozen=True)
class Step:
    """One start-up handler, and the shutdown handler that undoes it.

    `start` returns a phrase for the log (what was opened, where); `stop` likewise.
    `stop_timeout` bounds the stop: a hung close is abandoned so the rest still run.
    """

    name: str
    start: Opener
    stop: Closer | None = None
    stop_timeout: float = 5.0


def _application_name() -> str:
    # Names our connections on both servers, so operators (and tests) can find them.
    return f"credit-scoring-{os.getpid()}"


# -- the steps -------------------------------------------------------------------------


def _settings_step(configured: Settings | None) -> Step:
    async def start(state: State) -> str:
        settings = configured or Settings.from_env()
        logs.configure(settings.log_level, settings.log_format)
        state.settings = settings
        state.api_keys = tuple(k.encode() for k in settings.api_keys)
        state.shutting_down = False
        state.idempotency_in_flight = set()
        auth = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API keys (open)"
        return f"read configuration: log {settings.log_level}/{settings.log_format}, {auth}"

    return Step("settings", start)


async def _open_store(state: State) -> str:
    state.store = await storage.open_store(state.settings, _application_name())
    return f"opened {state.store.description}"


async def _close_store(state: State) -> str:
    await state.store.close()
    return f"closed {state.store.description}"


async def _migrate(state: State) -> str:
    applied = await state.store.migrate()
    return f"schema up to date (applied migrations {applied})" if applied else "schema up to date (nothing to apply)"


async def _open_cache(state: State) -> str:
    settings: Settings = state.settings
    if not settings.redis_url:
        state.cache = MemoryCache(ttl=settings.cache_ttl)
        return f"opened {state.cache.description}"
    cache = RedisCache(
        settings.redis_url,
        timeout=settings.redis_timeout,
        prefix=settings.redis_key_prefix,
        ttl=settings.cache_ttl,
        client_name=_application_name(),
    )
    state.cache = cache
    # Not fatal: the cache is best-effort. ping() logs the outage and backs off.
    if await cache.ping():
        return f"opened {cache.description}"
    return f"opened {cache.description}, which does not answer yet; serving without it until it does"


async def _close_cache(state: State) -> str:
    await state.cache.close()
    return f"closed {state.cache.description}"


async def _load_model(state: State) -> str:
    path = state.settings.model_path
    # Unpickling and the self-check take ~1 s of CPU: keep them off the event loop.
    credit_model = await asyncio.to_thread(model.load, path)
    state.model = credit_model
    return (
        f"loaded model {credit_model.metadata.version} from {path} "
        f"(self-check: max |direct - sklearn| = {credit_model.max_difference:.1e})"
    )


def default_steps(settings: Settings | None = None) -> list[Step]:
    return [
        _settings_step(settings),
        Step("store", _open_store, _close_store, stop_timeout=5.0),
        Step("migrations", _migrate),
        Step("cache", _open_cache, _close_cache, stop_timeout=2.0),
        Step("model", _load_model),
    ]


# -- running them -----------------------------------------------------------------------


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
                done = await step.start(state)
            except BaseException as exc:
                reason = str(exc) or type(exc).__name__
                logger.error("Startup step %r failed after %s: %s", step.name, _elapsed(started), reason)
                await self._run_shutdown(state, shutdown, budget=_budget(state))
                if isinstance(exc, Exception):
                    raise StartupError(f"Startup failed at step {step.name!r}: {reason}") from None
                raise
            logger.info("Startup step %r: %s in %s", step.name, done, _elapsed(started))
            if step.stop is not None:
                shutdown.append(step)
        logger.info(STARTED)
        try:
            yield
        finally:
            logger.info(CLOSING)
            state.shutting_down = True
            await self._run_shutdown(state, shutdown, budget=_budget(state))
            logger.info(CLOSED)

    @staticmethod
    async def _run_shutdown(state: State, opened: list[Step], budget: float) -> None:
        """Run the stop handlers of what was opened, newest first, each bounded; never raise."""
        deadline = time.monotonic() + budget
        for step in reversed(opened):
            assert step.stop is not None
            timeout = max(0.0, min(step.stop_timeout, deadline - time.monotonic()))
            started = time.perf_counter()
            try:
                done = await asyncio.wait_for(step.stop(state), timeout)
            except TimeoutError:
                logger.error("Shutdown step %r did not finish within %.1f s; abandoned it", step.name, timeout)
            except Exception as exc:
                logger.error("Shutdown step %r failed after %s: %s", step.name, _elapsed(started), exc)
            else:
                logger.info("Shutdown step %r: %s in %s", step.name, done, _elapsed(started))
        opened.clear()


def _budget(state: State) -> float:
    settings = getattr(state, "settings", None)
    return settings.shutdown_timeout if settings is not None else Settings().shutdown_timeout


def _elapsed(started: float) -> str:
    return f"{(time.perf_counter() - started) * 1000:.1f} ms"
