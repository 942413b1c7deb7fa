"""The start-up steps of the model lifecycle: registry and champion, the challenger's queue, the watcher.

Their shutdown handlers run in reverse: stop following the assignment, let the
challenger score what is queued (bounded; the rest is dropped and counted),
then stop the challenger's process.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import logging
import math
import random
from typing import Any

from starlette.datastructures import State

from service import metrics, monitoring, storage
from service.models.assignment import AssignmentWatcher, ModelManager, worker_id
from service.models.challenger import ChallengerQueue
from service.models.metadata import ModelError
from service.models.registry import Registry, UnknownVersion
from service.settings import Settings

logger = logging.getLogger("service.lifecycle")

# Seconds the challenger may take at shutdown to score what is queued; the rest is dropped (and counted).
CHALLENGER_DRAIN_SECONDS = 2.0
# How long shutdown tries to remove this worker's report from the admin view.
FORGET_SECONDS = 0.5
# The monitoring gauges: the champion over the last day, refreshed at most once a minute per worker.
GAUGE_WINDOW = dt.timedelta(hours=24)
GAUGE_REFRESH_SECONDS = 60.0
GAUGE_FIRST_SECONDS = 10.0


async def load_models(state: State) -> str:
    """The registry, the stored assignment (written on first start) and its champion; the challenger follows."""
    settings: Settings = state.settings
    registry = Registry(settings.model_dir)
    entries = await asyncio.to_thread(registry.scan)  # fails clearly if MODEL_DIR is missing
    manager = ModelManager(registry, settings.refer_band)
    assignment = await state.store.read_assignment()
    if assignment is None:
        # First start: MODEL_VERSION, else the newest logistic version. Verified before it is recorded.
        version = settings.model_version
        if version is None:
            newest = await asyncio.to_thread(registry.newest, "logistic")
            if newest is None:
                raise ModelError(f"The model registry {registry.root} holds no logistic version; run `make train`.")
            version = newest.version
        manager.prepare(await manager.load_champion(version))
        chosen_by = "MODEL_VERSION" if settings.model_version else "newest in registry"
        assignment = await state.store.change_assignment(
            lambda current: None if current is not None else ("initial", (version, None)), chosen_by
        )
    elif settings.model_version and settings.model_version != assignment.champion:
        logger.warning(
            "MODEL_VERSION=%s is only read on first start; the system of record assigns %s (revision %d, by %s). "
            "Promote with POST /admin/models/{version}/promote.",
            settings.model_version,
            assignment.champion,
            assignment.revision,
            assignment.changed_by,
        )
    # The champion now; the challenger (a process of its own for boosting) once the watcher runs.
    try:
        models = await manager.start(assignment)
    except UnknownVersion:
        raise ModelError(
            f"The system of record assigns champion {assignment.champion} (revision {assignment.revision}, by "
            f"{assignment.changed_by}), but {registry.root} has no such version: deploy a MODEL_DIR that holds it, "
            "or promote one this registry holds (POST /admin/models/{version}/promote on any running replica)."
        ) from None
    state.models = manager
    pending = f"; challenger {assignment.challenger.version} loads next" if assignment.challenger else ""
    return (
        f"serving champion {models.champion.version} (revision {assignment.revision}, set by "
        f"{assignment.changed_by}) from {registry.root} ({len(entries)} versions), "
        f"self-check {models.champion.max_difference:.1e}{pending}"
    )


async def close_models(state: State) -> str:
    await state.models.close()
    return "stopped the challenger's process, if any"


async def start_challenger(state: State) -> str:
    manager: ModelManager = state.models

    def challenger() -> Any:
        current = manager.current
        return current.challenger if current is not None else None

    state.challenger_queue = ChallengerQueue(state.store.record_challenger, challenger)
    return "challenger queue open (scored off the response path, bounded)"


async def stop_challenger(state: State) -> str:
    budget = CHALLENGER_DRAIN_SECONDS
    dropped = await state.challenger_queue.close(budget)
    return f"challenger queue drained ({dropped} dropped)" if dropped else "challenger queue drained"


async def start_watcher(state: State) -> str:
    state.worker = worker_id()
    state.watcher = AssignmentWatcher(state.store, state.models, state.worker)
    # Visible to GET /admin/models from the first request on (best effort, as every report).
    await state.watcher.report()
    # A fresh context: the watcher's lines belong to no request.
    state.watcher_task = asyncio.get_running_loop().create_task(state.watcher.run(), context=contextvars.Context())
    how = "PostgreSQL LISTEN/NOTIFY" if isinstance(state.store, storage.PostgresStore) else "polling SQLite"
    return f"following the model assignment ({how}) as worker {state.worker}"


async def stop_watcher(state: State) -> str:
    await state.watcher.stop(state.watcher_task, grace=1.0)
    try:
        # Best effort, and brief: with the database down, the report goes stale on its own.
        await asyncio.wait_for(state.store.forget_worker(state.worker), FORGET_SECONDS)
    except Exception as exc:  # a report others will see as stale soon enough
        return f"stopped following the model assignment (could not remove this worker's report: {exc})"
    return "stopped following the model assignment"


async def start_gauges(state: State) -> str:
    """Refresh the monitoring gauges from the database now and then, never on a request's path."""

    async def refresh() -> None:
        # Workers started together should not all ask at once.
        await asyncio.sleep(random.uniform(1.0, GAUGE_FIRST_SECONDS))
        failing = False
        while True:
            try:
                await _refresh_gauges(state)
                failing = False
            except Exception as exc:  # the database is down or slow: the gauges keep their last values
                if not failing:
                    logger.warning(
                        "Could not refresh the monitoring gauges (%s: %s); will retry", type(exc).__name__, exc
                    )
                failing = True
            await asyncio.sleep(GAUGE_REFRESH_SECONDS)

    state.gauges_task = asyncio.get_running_loop().create_task(refresh(), context=contextvars.Context())
    return f"monitoring gauges refreshed every {GAUGE_REFRESH_SECONDS:g} s from the database"


async def _refresh_gauges(state: State) -> None:
    manager: ModelManager = state.models
    current = manager.current
    if current is None:
        return
    metadata = current.champion.metadata
    until = dt.datetime.now(dt.UTC)
    since = until - GAUGE_WINDOW
    counts = await state.store.monitoring_counts(
        metadata.version, since, until, metadata.training_distribution, full=False
    )
    figures = monitoring.report(metadata, since, until, counts)
    metrics.model_score_psi.set(_value(figures.probability.get("psi")))
    metrics.model_approval_rate.set(_value(figures.decisions.get("approve")))
    for feature in figures.features:
        metrics.model_feature_psi.labels(feature.name).set(_value(feature.psi))


def _value(figure: Any) -> float:
    return float(figure) if isinstance(figure, (int, float)) else math.nan


async def stop_gauges(state: State) -> str:
    state.gauges_task.cancel()
    await asyncio.wait({state.gauges_task}, timeout=1.0)
    return "stopped refreshing the monitoring gauges"
