"""Which model a worker serves, and how a change of assignment reaches it.

The assignment (champion; challenger and its share) lives in the system of
record, with its history. Every worker follows it: the store tells it when the
assignment may have changed (PostgreSQL `LISTEN/NOTIFY`, re-read on every
reconnect and every few seconds; SQLite, one file, by polling), and the worker's
`ModelManager` loads what the new assignment names beside what it serves, checks
it, and only then swaps.

What a worker serves is one immutable `ModelSet`, replaced as a whole: a request
takes the set once, at its start, and finishes on it whatever happens meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Protocol

from service import metrics
from service.models.boosting import BoostingChallenger
from service.models.challenger import Challenger, ScorecardChallenger
from service.models.metadata import ModelError
from service.models.policy import Policy
from service.models.registry import Registry, ScorecardModel, load_scorecard
from service.schemas import Assignment, WorkerModels

logger = logging.getLogger(__name__)

# A worker re-reads the assignment at least this often, whatever NOTIFY did or did not say.
TICK_SECONDS = 5.0
# ...and tells the others what it serves this often.
REPORT_SECONDS = 15.0
# A revision this worker failed to load is retried this often, not on every tick.
RETRY_FAILED_SECONDS = 60.0


def worker_id() -> str:
    """This process, as the other workers and the admin endpoints know it: host (the pod) and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ModelSet:
    """What one worker serves now; replaced as a whole, never changed in place."""

    champion: ScorecardModel
    challenger: Challenger | None
    share: float
    assignment: Assignment

    def sampled(self, decision_id: uuid.UUID) -> bool:
        """Whether the challenger also scores this decision: uuid4's random bits decide, reproducibly."""
        return self.challenger is not None and (decision_id.int & 0xFFFFFFFF) < self.share * 0x100000000


class ModelManager:
    """Loads what an assignment names beside what is serving, checks it, and swaps; one change at a time."""

    def __init__(
        self,
        registry: Registry,
        refer_band: tuple[float, float] | None,
        on_swap: Callable[[ModelSet], None] = lambda models: None,
    ) -> None:
        self.registry = registry
        self.refer_band = refer_band
        self._on_swap = on_swap
        self.current: ModelSet | None = None
        # The revision whose champion and challenger this worker has applied (0: none yet).
        self.applied_revision = 0
        self.error: str | None = None
        self.loaded_at = time.time()
        self._lock = asyncio.Lock()
        # Verified ahead of an assignment change by the admin call that makes it.
        self._prepared: dict[str, ScorecardModel | Challenger] = {}
        # Challengers swapped out, closing in the background (a batch may still be in flight on one).
        self._retiring: set[asyncio.Task[None]] = set()

    async def load_champion(self, version: str) -> ScorecardModel:
        entry = self.registry.get(version)
        # Hashing and the self-check are quick, but file reads block: off the event loop.
        model = await asyncio.to_thread(load_scorecard, entry, self.refer_band)
        return model

    async def load_challenger(self, version: str) -> Challenger:
        entry = self.registry.get(version)
        if entry.metadata is None:
            raise ModelError(entry.error or f"{version} cannot be read.")
        if entry.metadata.kind == "logistic":
            return ScorecardChallenger(await asyncio.to_thread(load_scorecard, entry, self.refer_band))
        return await BoostingChallenger.start(entry.path, entry.metadata, Policy.of(entry.metadata, self.refer_band))

    def prepare(self, loaded: ScorecardModel | Challenger) -> None:
        """Keep a model an admin call has just verified, for the swap its assignment change brings."""
        self._prepared[loaded.version] = loaded

    def discard(self, version: str) -> None:
        """Drop what was prepared for `version` (its assignment change did not happen)."""
        prepared = self._prepared.pop(version, None)
        if prepared is not None and not isinstance(prepared, ScorecardModel):
            self._retire(prepared)

    async def apply(self, assignment: Assignment, *, force: bool = False, with_challenger: bool = True) -> ModelSet:
        """Serve what the assignment names; ModelError (and nothing changes) if its champion cannot be loaded.

        `force` reloads even versions already loaded (SIGHUP: the registry may have
        changed on disk). A challenger that cannot be loaded is logged, counted and
        left out; the champion still changes.
        """
        async with self._lock:
            current = self.current
            if current is not None and not force and assignment.revision <= self.applied_revision:
                return current
            started = time.perf_counter()
            try:
                champion = await self._champion(assignment.champion, current, force)
            except ModelError as exc:
                metrics.count(metrics.model_reload_failures, "champion")
                self.error = f"champion {assignment.champion}: {exc}"
                raise
            challenger, error = None, None
            if with_challenger and assignment.challenger is not None:
                try:
                    challenger = await self._challenger(assignment.challenger.version, current, force)
                except ModelError as exc:
                    metrics.count(metrics.model_reload_failures, "challenger")
                    error = f"challenger {assignment.challenger.version}: {exc}"
                    logger.error("Cannot load the challenger %s; serving without one: %s", assignment.challenger, exc)
            share = assignment.challenger.share if challenger is not None and assignment.challenger else 0.0
            models = ModelSet(champion, challenger, share, assignment)
            self.current = models
            self.error = error
            self.loaded_at = time.time()
            if with_challenger:
                self.applied_revision = assignment.revision
            self._on_swap(models)
            _publish(current, models)
            if current is None or current.champion is not champion:
                metrics.count(metrics.model_reloads, "champion")
            if challenger is not None and (current is None or current.challenger is not challenger):
                metrics.count(metrics.model_reloads, "challenger")
            _log_swap(current, models, time.perf_counter() - started)
            # Whatever was prepared and not taken by now belongs to an assignment that lost.
            leftovers = [p for p in self._prepared.values() if not isinstance(p, ScorecardModel)]
            self._prepared = {}
            if current is not None and current.challenger is not None and current.challenger is not challenger:
                leftovers.append(current.challenger)
            for leftover in leftovers:
                self._retire(leftover)
            return models

    def _retire(self, challenger: Challenger) -> None:
        task = asyncio.ensure_future(challenger.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _champion(self, version: str, current: ModelSet | None, force: bool) -> ScorecardModel:
        prepared = self._prepared.pop(version, None)
        if isinstance(prepared, ScorecardModel):
            return prepared
        if prepared is not None:  # verified as a challenger: still good to keep
            self._prepared[version] = prepared
        if current is not None and current.champion.version == version and not force:
            return current.champion
        return await self.load_champion(version)

    async def _challenger(self, version: str, current: ModelSet | None, force: bool) -> Challenger:
        prepared = self._prepared.pop(version, None)
        if prepared is not None and not isinstance(prepared, ScorecardModel):
            return prepared
        if isinstance(prepared, ScorecardModel):
            return ScorecardChallenger(prepared)
        serving = current.challenger if current is not None else None
        if serving is not None and serving.version == version and not force:
            return serving
        return await self.load_challenger(version)

    def report(self, worker: str) -> WorkerModels:
        models = self.current
        assert models is not None
        return WorkerModels(
            worker=worker,
            revision=self.applied_revision,
            champion=models.champion.version,
            challenger=models.challenger.version if models.challenger else None,
            loaded_at=_utc(self.loaded_at),
            seen_at=_utc(time.time()),
            error=self.error,
        )

    async def close(self) -> None:
        """Stop every challenger process this worker started (the serving one, prepared and retiring ones)."""
        async with self._lock:
            models = self.current
            leftovers = [c for c in self._prepared.values() if not isinstance(c, ScorecardModel)]
            self._prepared = {}
            if models is not None and models.challenger is not None:
                leftovers.append(models.challenger)
            for challenger in leftovers:
                self._retire(challenger)
            if self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def _publish(old: ModelSet | None, new: ModelSet) -> None:
    """The info gauge: 1 for what this worker serves, 0 for what it served before."""
    if old is not None:
        metrics.model_loaded.labels("champion", old.champion.version).set(0)
        if old.challenger is not None:
            metrics.model_loaded.labels("challenger", old.challenger.version).set(0)
    metrics.model_loaded.labels("champion", new.champion.version).set(1)
    if new.challenger is not None:
        metrics.model_loaded.labels("challenger", new.challenger.version).set(1)


def _describe(models: ModelSet | None) -> str:
    if models is None:
        return "nothing"
    challenger = models.challenger
    shadow = f", challenger {challenger.version} ({challenger.kind}) at share {models.share:g}" if challenger else ""
    return f"champion {models.champion.version}{shadow}"


def _log_swap(old: ModelSet | None, new: ModelSet, seconds: float) -> None:
    if old is not None and _describe(old) == _describe(new):
        return
    logger.info(
        "Serving %s (revision %d, was %s), loaded in %.1f ms",
        _describe(new),
        new.assignment.revision,
        _describe(old),
        seconds * 1000,
    )


class AssignmentSource(Protocol):
    """What the watcher needs from the system of record."""

    def assignment_revisions(self, tick: float, stop: asyncio.Event) -> AsyncGenerator[int, None]: ...

    async def read_assignment(self) -> Assignment | None: ...

    async def report_worker(self, report: WorkerModels) -> None: ...


class AssignmentWatcher:
    """Follows the stored assignment for one worker: applies each new revision, and reports what it serves."""

    def __init__(self, source: AssignmentSource, manager: ModelManager, worker: str) -> None:
        self.source = source
        self.manager = manager
        self.worker = worker
        self._reported_at = 0.0
        self._failed: tuple[int, float] | None = None
        self._stop = asyncio.Event()

    async def run(self) -> None:
        # aclosing: if the task is cancelled after all, the store's listening session closes with it.
        async with contextlib.aclosing(self.source.assignment_revisions(TICK_SECONDS, self._stop)) as revisions:
            async for revision in revisions:
                if revision != self.manager.applied_revision and self._due(revision):
                    await self._follow()
                if time.monotonic() - self._reported_at >= REPORT_SECONDS:
                    await self.report()

    async def stop(self, task: asyncio.Task[None], grace: float) -> None:
        """End between calls to the store (a call cut short would strand its connection); cancel only past `grace`."""
        self._stop.set()
        await asyncio.wait({task}, timeout=grace)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=grace)

    def _due(self, revision: int) -> bool:
        # A revision this worker could not load is retried now and then, not on every tick.
        failed = self._failed
        return failed is None or failed[0] != revision or time.monotonic() - failed[1] >= RETRY_FAILED_SECONDS

    async def _follow(self, force: bool = False) -> None:
        try:
            assignment = await self.source.read_assignment()
        except Exception as exc:  # the store is down: the next tick tries again
            logger.warning("Could not read the model assignment (%s: %s); will retry", type(exc).__name__, exc)
            return
        if assignment is None:
            return
        try:
            await self.manager.apply(assignment, force=force)
            self._failed = None
        except ModelError as exc:
            self._failed = (assignment.revision, time.monotonic())
            revision = assignment.revision
            logger.error(
                "Cannot serve revision %d of the model assignment; still serving %s: %s",
                revision,
                _describe(self.manager.current),
                exc,
            )
        await self.report()

    async def rescan(self) -> None:
        """SIGHUP: re-read the registry on disk and the stored assignment, and reload both models."""
        logger.info(
            "Rescanning the model registry %s and re-applying the stored assignment", self.manager.registry.root
        )
        await self._follow(force=True)

    async def report(self) -> None:
        if self.manager.current is None:
            return
        self._reported_at = time.monotonic()
        try:
            await self.source.report_worker(self.manager.report(self.worker))
        except Exception as exc:  # only a status line for the admin view: never worth more than a debug note
            logger.debug("Could not report this worker's models: %s", exc)
