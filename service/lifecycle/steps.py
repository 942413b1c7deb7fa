"""The service's start-up steps, in order, and the shutdown handler of each.

Every step logs what it opened or closed, where (passwords masked) and how long
it took. The model lifecycle's steps are in model_steps.py, the signal handlers
in signals.py; this module puts them all in their order.
"""

from __future__ import annotations

import asyncio
import os

from starlette.datastructures import State

from service import logs, metrics, storage
from service.cache import MemoryCache, RedisCache, open_cache
from service.keys import KeyRing
from service.lifecycle import model_steps
from service.lifecycle.runner import Step
from service.lifecycle.signals import unwatch_signals, watch_signals
from service.settings import ConfigError, Settings

METRICS_FLUSH_SECONDS = 1.0


def _application_name() -> str:
    # Names our connections on both servers, so operators (and tests) can find them.
    return f"credit-scoring-{os.getpid()}"


# -- the steps -------------------------------------------------------------------------


def _settings_step(configured: Settings | None) -> Step:
    async def start(state: State) -> str:
        settings = configured or Settings.from_env()
        logs.configure(settings.log_level, settings.log_format)
        state.settings = settings
        state.api_keys = KeyRing(settings.api_keys)
        state.audit_keys = KeyRing(settings.audit_keys)
        state.admin_keys = KeyRing(settings.admin_keys)
        state.shutting_down = False
        state.shutdown_began = None
        state.idempotency_in_flight = set()
        auth = f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API keys (open)"
        auth += f", {len(settings.audit_keys)} audit key(s)"
        admin = f"{len(settings.admin_keys)} admin key(s)" if settings.admin_keys else "admin endpoints off"
        refer = "referral band [{:g}, {:g})".format(*settings.refer_band) if settings.refer_band else "no referral band"
        admits = f"admits {settings.max_concurrent_requests} requests at once"
        return f"read configuration: log {settings.log_level}/{settings.log_format}, {auth}, {admin}, {refer}, {admits}"

    return Step("settings", start)


async def _open_store(state: State) -> str:
    state.store = await storage.open_store(state.settings, _application_name())
    return f"opened {state.store.description}"


async def _close_store(state: State) -> str:
    await state.store.close()
    return f"closed {state.store.description}"


async def _migrate(state: State) -> str:
    applied = await state.store.migrate()
    # The key search cursors are signed with: one per database, so every replica accepts every cursor.
    state.cursor_key = await state.store.cursor_secret()
    return f"schema up to date (applied migrations {applied})" if applied else "schema up to date (nothing to apply)"


async def _open_cache(state: State) -> str:
    cache = state.cache = open_cache(state.settings, _application_name())
    if isinstance(cache, MemoryCache):
        return f"opened {cache.description}"
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
    if isinstance(state.store, storage.PostgresStore) and state.store.through_pooler:
        # The pools are the pooler's clients (its max_client_conn bounds them); PostgreSQL sees the pooler's
        # own server connections, and one listening session per worker.
        max_connections, reserved, in_use = await state.store.capacity()
        usable = max_connections - reserved
        if workers > usable:
            raise ConfigError(
                f"WEB_CONCURRENCY={workers} listening sessions to PostgreSQL, but the server allows {usable}."
            )
        found.append(
            f"pooler {workers} x {state.store.pool_size} client connections; PostgreSQL {workers} listening of "
            f"{usable} allowed beside the pooler's own ({in_use} in use now)"
        )
    elif isinstance(state.store, storage.PostgresStore):
        # Each worker's pool, and the session each keeps open to LISTEN for model assignment changes.
        need = workers * (state.store.pool_size + 1)
        max_connections, reserved, in_use = await state.store.capacity()
        usable = max_connections - reserved
        if need > usable:
            raise ConfigError(
                f"WEB_CONCURRENCY={workers} workers x (DATABASE_POOL_SIZE={state.store.pool_size} + 1) = {need} "
                f"PostgreSQL connections, but the server allows {usable} (max_connections {max_connections} - "
                f"{reserved} reserved). Lower WEB_CONCURRENCY or DATABASE_POOL_SIZE, or raise max_connections."
            )
        found.append(
            f"PostgreSQL {workers} x ({state.store.pool_size} + 1 listening) = {need} of {usable} allowed "
            f"({in_use} in use now)"
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


def default_steps(settings: Settings | None = None) -> list[Step]:
    return [
        _settings_step(settings),
        Step("store", _open_store, _close_store, start_timeout=60.0, stop_timeout=5.0),
        Step("migrations", _migrate, start_timeout=60.0),
        Step("cache", _open_cache, _close_cache, start_timeout=5.0, stop_timeout=2.0),
        Step("budget", _check_connection_budget, start_timeout=10.0),
        Step("metrics", _start_metrics, _stop_metrics, stop_timeout=1.0),
        Step("models", model_steps.load_models, model_steps.close_models, start_timeout=60.0, stop_timeout=3.0),
        Step(
            "challenger",
            model_steps.start_challenger,
            model_steps.stop_challenger,
            stop_timeout=model_steps.CHALLENGER_DRAIN_SECONDS + 1.0,
        ),
        Step("watcher", model_steps.start_watcher, model_steps.stop_watcher, stop_timeout=2.0),
        Step("gauges", model_steps.start_gauges, model_steps.stop_gauges, stop_timeout=1.5),
        Step("signals", watch_signals, unwatch_signals, stop_timeout=1.0),
    ]
