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
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics, model, storage
from service.cache import MemoryCache, RedisCache
from service.errors import StoreUnavailable
from service.model import ModelError
from service.settings import ConfigError, Settings
from service.tasks import abandon

logger = logging.getLogger("service.lifecycle")

STARTING = "Starting API and initializing all objects"
STARTED = "Successfully started API and initialized all objects"
CLOSING = "Closing API."
CLOSED = "Successfully closed API."


SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)
METRICS_FLUSH_SECONDS = 1.0
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
        state.shutdown_began = None
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
        max_connections=settings.redis_pool_size,
    )
    state.cache = cache
    # Not fatal: the cache is best-effort. ping() logs the outage and backs off.
    if await cache.ping():
        return f"opened {cache.description}"
    return f"opened {cache.description}, which does not answer yet; serving without it until it does"


async def _close_cache(state: State) -> str:
    await state.cache.close()
    return f"closed {state.cache.description}"


async def _check_connection_budget(state: State) -> str:
    """Every worker opens its own pools: make sure all of them fit on the servers."""
    settings: Settings = state.settings
    workers = settings.web_concurrency
    found = []
    if isinstance(state.store, storage.PostgresStore):
        need = workers * state.store.pool_size
        max_connections, reserved, in_use = await state.store.capacity()
        usable = max_connections - reserved
        if need > usable:
            raise ConfigError(
                f"WEB_CONCURRENCY={workers} workers x DATABASE_POOL_SIZE={state.store.pool_size} = {need} "
                f"PostgreSQL connections, but the server allows {usable} (max_connections {max_connections} - "
                f"{reserved} reserved). Lower WEB_CONCURRENCY or DATABASE_POOL_SIZE, or raise max_connections."
            )
        found.append(
            f"PostgreSQL {workers} x {state.store.pool_size} = {need} of {usable} allowed ({in_use} in use now)"
        )
    if isinstance(state.cache, RedisCache):
        need = workers * state.cache.max_connections
        max_clients = await state.cache.max_clients()
        if max_clients is not None and need > max_clients:
            raise ConfigError(
                f"WEB_CONCURRENCY={workers} workers x REDIS_POOL_SIZE={state.cache.max_connections} = {need} Redis "
                f"connections, but the server's maxclients is {max_clients}. Lower WEB_CONCURRENCY or REDIS_POOL_SIZE."
            )
        allowed = f"of {max_clients} allowed" if max_clients is not None else "(maxclients not readable)"
        found.append(f"Redis {workers} x {state.cache.max_connections} = {need} {allowed}")
    return "connection budget: " + ("; ".join(found) if found else "no network connections (SQLite, in-process cache)")


async def _start_metrics(state: State) -> str:
    metrics.shutting_down.set(0)

    async def publish() -> None:
        # Each worker publishes its own tally and pool gauges; a scrape aggregates them.
        while True:
            await asyncio.sleep(METRICS_FLUSH_SECONDS)
            metrics.flush()
            state.store.observe_pool()

    state.store.observe_pool()
    state.metrics_task = asyncio.ensure_future(publish())
    mode = "multiprocess, aggregated over workers" if metrics.MULTIPROCESS else "single process"
    return f"serving /metrics ({mode})"


async def _stop_metrics(state: State) -> str:
    state.metrics_task.cancel()
    metrics.process_exited(os.getpid())
    return "stopped publishing and retired this worker's live gauges"


async def _load_model(state: State) -> str:
    path = state.settings.model_path
    # Unpickling and the self-check take ~1 s of CPU: keep them off the event loop.
    credit_model = await asyncio.to_thread(model.load, path)
    state.model = credit_model
    return (
        f"loaded model {credit_model.metadata.version} from {path} "
        f"(self-check: max |direct - sklearn| = {credit_model.max_difference:.1e})"
    )


def begin_shutdown(state: State, signal_name: str | None = None) -> None:
    """Mark the start of shutdown: readiness turns 503 and the shutdown budget starts counting."""
    if state.shutdown_began is None:
        state.shutdown_began = time.monotonic()
        state.shutting_down = True
        metrics.shutting_down.set(1)
        logger.info(CLOSING)
        if signal_name:
            logger.info("Received %s: no new connections; draining in-flight requests", signal_name)


async def _watch_signals(state: State) -> str:
    # uvicorn catches SIGTERM/SIGINT itself and only calls the lifespan shutdown
    # after draining; we chain onto its handlers so shutdown (and its budget,
    # and readiness 503) begins the moment the signal arrives.
    if threading.current_thread() is not threading.main_thread():
        return "not on the main thread (in-process test client); shutdown begins with the lifespan"
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(begin_shutdown, state, signal.Signals(signum).name)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # nobody else handles it: let it act as it would have
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for sig in SHUTDOWN_SIGNALS:
        previous[sig] = signal.signal(sig, on_signal)
    state.previous_signal_handlers = previous
    return "watching SIGTERM and SIGINT"


async def _unwatch_signals(state: State) -> str:
    for sig, handler in getattr(state, "previous_signal_handlers", {}).items():
        signal.signal(sig, handler)
    return "restored the signal handlers"


def default_steps(settings: Settings | None = None) -> list[Step]:
    return [
        _settings_step(settings),
        Step("store", _open_store, _close_store, start_timeout=60.0, stop_timeout=5.0),
        Step("migrations", _migrate, start_timeout=60.0),
        Step("cache", _open_cache, _close_cache, start_timeout=5.0, stop_timeout=2.0),
        Step("budget", _check_connection_budget, start_timeout=10.0),
        Step("metrics", _start_metrics, _stop_metrics, stop_timeout=1.0),
        Step("model", _load_model, start_timeout=120.0),
        Step("signals", _watch_signals, _unwatch_signals, stop_timeout=1.0),
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
        # Start-up leaves many long-lived objects (scikit-learn, numpy, the model):
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
