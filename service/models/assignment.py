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
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from service import metrics
from service.models.boosting import BoostingChallenger
from service.models.challenger import Challenger, ScorecardChallenger
from service.models.metadata import ModelError
from service.models.policy import Policy
from service.models.registry import Registry, ScorecardModel, load_scorecard
from service.schemas import Assignment, ChallengerAssignment, WorkerModels

logger = logging.getLogger(__name__)

# A worker re-reads the assignment at least this often, whatever NOTIFY did or did not say.
TICK_SECONDS = 5.0
# ...and tells the others what it serves this often.
REPORT_SECONDS = 15.0
# A revision this worker failed to load is retried this often, not on every tick.
RETRY_FAILED_SECONDS = 60.0
# An assignment the store could not give is asked for again this often.
RETRY_READ_SECONDS = 0.5


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
    """Loads what an assignment names beside what is serving, checks it, and swaps; one change at a time.

    Every change goes through `refresh`, which reads the newest stored assignment
    while holding the lock: whatever order the watcher, SIGHUP and admin calls run
    in, an older assignment can never replace a newer one.
    """

    def __init__(self, registry: Registry, refer_band: tuple[float, float] | None) -> None:
        self.registry = registry
        self.refer_band = refer_band
        self.current: ModelSet | None = None
        # The assignment this worker has applied in full (champion and challenger), if any.
        self.applied: Assignment | None = None
        self.error: str | None = None
        self.loaded_at = time.time()
        self._lock = asyncio.Lock()
        # Verified ahead of an assignment change by the admin call that makes it.
        self._prepared: dict[str, ScorecardModel | Challenger] = {}
        # Challengers swapped out, closing in the background (a batch may still be in flight on one).
        self._retiring: set[asyncio.Task[None]] = set()
        # When to try again what failed to load (the champion of a revision, or a challenger).
        self._failed: tuple[int, float] | None = None
        self._closed = False

    @property
    def applied_revision(self) -> int:
        return self.applied.revision if self.applied is not None else 0

    @property
    def failed_revision(self) -> int:
        return self._failed[0] if self._failed is not None else 0

    def wants(self, revision: int) -> bool:
        """Whether the stored revision calls for a refresh: it differs from what was applied, or a retry is due.

        What failed to load is tried again every RETRY_FAILED_SECONDS, not on every tick.
        """
        failed = self._failed
        if failed is not None and time.monotonic() - failed[1] < RETRY_FAILED_SECONDS:
            return revision != failed[0] and revision != self.applied_revision
        return failed is not None or revision != self.applied_revision

    async def load_champion(self, version: str) -> ScorecardModel:
        entry = self.registry.get(version)
        try:
            # Hashing and the self-check are quick, but file reads block: off the event loop.
            return await asyncio.to_thread(load_scorecard, entry, self.refer_band)
        except (OSError, ValueError) as exc:  # unreadable files: a reason to refuse, like any other
            raise ModelError(f"{version} cannot be read: {exc}") from exc

    async def load_challenger(self, version: str) -> Challenger:
        entry = self.registry.get(version)
        if entry.metadata is None:
            raise ModelError(entry.error or f"{version} cannot be read.")
        try:
            if entry.metadata.kind == "logistic":
                return ScorecardChallenger(await asyncio.to_thread(load_scorecard, entry, self.refer_band))
            policy = Policy.of(entry.metadata, self.refer_band)
            return await BoostingChallenger.start(entry.path, entry.metadata, policy)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{version} cannot be loaded: {exc}") from exc

    def prepare(self, loaded: ScorecardModel | Challenger) -> None:
        """Keep a model an admin call has just verified, for the swap its assignment change brings."""
        earlier = self._prepared.get(loaded.version)
        if earlier is not None and earlier is not loaded and not isinstance(earlier, ScorecardModel):
            self._retire(earlier)
        self._prepared[loaded.version] = loaded

    def discard(self, version: str) -> None:
        """Drop what was prepared for `version` (its assignment change did not happen)."""
        prepared = self._prepared.pop(version, None)
        if prepared is not None and not isinstance(prepared, ScorecardModel):
            self._retire(prepared)

    async def start(self, assignment: Assignment) -> ModelSet:
        """Start-up: the champion only; the challenger (a process of its own for boosting) follows a refresh."""
        async with self._lock:
            return await self._apply(assignment, force=False, with_challenger=False)

    async def refresh(self, read: Callable[[], Awaitable[Assignment | None]], *, force: bool = False) -> ModelSet:
        """Serve the newest stored assignment; ModelError (and the champion stays) if its champion cannot be loaded.

        `force` reloads even versions already loaded (SIGHUP: the registry may have
        changed on disk).
        """
        async with self._lock:
            assignment = await read()
            current = self.current
            if self._closed or assignment is None:
                assert current is not None
                return current
            return await self._apply(assignment, force=force, with_challenger=True)

    async def _apply(self, assignment: Assignment, *, force: bool, with_challenger: bool) -> ModelSet:
        current = self.current
        if current is not None and not force and self._failed is None and assignment == self.applied:
            return current
        started = time.perf_counter()
        try:
            champion = await self._champion(assignment.champion, current, force)
        except ModelError as exc:
            metrics.count(metrics.model_reload_failures, "champion")
            self.error = f"champion {assignment.champion}: {exc}"
            self._failed = (assignment.revision, time.monotonic())
            raise
        wanted = assignment.challenger if with_challenger else None
        # The champion first: a challenger still to be loaded (seconds, for a process) must not hold it up.
        # Meanwhile the challenger that serves keeps shadowing; its verdicts carry its own version.
        ready = self._ready_challenger(wanted, current, force)
        interim = ready if ready is not None or wanted is None else (current.challenger if current else None)
        models = self._swap(current, ModelSet(champion, interim, _share(interim, assignment), assignment), started)
        if wanted is not None and ready is None:
            started = time.perf_counter()
            try:
                loaded = await self.load_challenger(wanted.version)
            except ModelError as exc:
                metrics.count(metrics.model_reload_failures, "challenger")
                self.error = f"challenger {wanted.version}: {exc}"
                self._failed = (assignment.revision, time.monotonic())
                logger.error(
                    "Cannot load the challenger %s; %s: %s",
                    wanted.version,
                    f"{interim.version} keeps shadowing" if interim is not None else "serving without one",
                    exc,
                )
                return models
            if self._closed:  # shut down while it loaded
                self._retire(loaded)
                return models
            models = self._swap(models, ModelSet(champion, loaded, wanted.share, assignment), started)
        self.error = None
        self._failed = None
        if with_challenger:
            self.applied = assignment
        return models

    def _ready_challenger(
        self, wanted: ChallengerAssignment | None, current: ModelSet | None, force: bool
    ) -> Challenger | None:
        """The wanted challenger if it needs no loading: prepared by an admin call, or already serving."""
        if wanted is None:
            return None
        prepared = self._prepared.pop(wanted.version, None)
        if isinstance(prepared, ScorecardModel):
            return ScorecardChallenger(prepared)
        if prepared is not None:
            return prepared
        serving = current.challenger if current is not None else None
        if serving is not None and serving.version == wanted.version and not force:
            return serving
        return None

    def _swap(self, old: ModelSet | None, new: ModelSet, started: float) -> ModelSet:
        """Make `new` what requests take from now on; count, log, publish; retire what nothing serves any more."""
        self.current = new
        self.loaded_at = time.time()
        _publish(old, new)
        if old is None or old.champion is not new.champion:
            metrics.count(metrics.model_reloads, "champion")
        if new.challenger is not None and (old is None or old.challenger is not new.challenger):
            metrics.count(metrics.model_reloads, "challenger")
        _log_swap(old, new, time.perf_counter() - started)
        if old is not None and old.challenger is not None and old.challenger is not new.challenger:
            self._retire(old.challenger)
        # Whatever was prepared and not taken by now belongs to an assignment that lost.
        for leftover in [p for p in self._prepared.values() if not isinstance(p, ScorecardModel)]:
            if leftover is not new.challenger:
                self._retire(leftover)
        self._prepared = {}
        return new

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
        """Stop every challenger process this worker started (the serving one, prepared and retiring ones).

        It does not wait for a change in progress (loading a challenger takes seconds): that change, when its
        process is ready, sees the manager closed and stops it.
        """
        self._closed = True
        models = self.current
        leftovers = [c for c in self._prepared.values() if not isinstance(c, ScorecardModel)]
        self._prepared = {}
        if models is not None and models.challenger is not None:
            leftovers.append(models.challenger)
        for challenger in leftovers:
            self._retire(challenger)
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)


def _share(challenger: Challenger | None, assignment: Assignment) -> float:
    if challenger is None:
        return 0.0
    # A challenger kept while its successor loads keeps the share it was given.
    return assignment.challenger.share if assignment.challenger is not None else 0.0


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
        self._stop = asyncio.Event()

    async def run(self) -> None:
        # aclosing: if the task is cancelled after all, the store's listening session closes with it.
        async with contextlib.aclosing(self.source.assignment_revisions(TICK_SECONDS, self._stop)) as revisions:
            async for revision in revisions:
                try:
                    # The store failing now (an outage, or the breaker after one): ask again soon, not at the next tick.
                    while self.manager.wants(revision) and not await self.follow() and not self._stop.is_set():
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), RETRY_READ_SECONDS)
                    if time.monotonic() - self._reported_at >= REPORT_SECONDS:
                        await self.report()
                except Exception:  # a bug must not end the following: log it whole, and go on at the next tick
                    logger.exception("Following the model assignment failed; trying again at the next tick")

    async def stop(self, task: asyncio.Task[None], grace: float) -> None:
        """End between calls to the store (a call cut short would strand its connection); cancel only past `grace`."""
        self._stop.set()
        await asyncio.wait({task}, timeout=grace)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=grace)

    async def follow(self, force: bool = False) -> bool:
        """Serve the newest stored assignment; False when the store could not be read."""
        try:
            await self.manager.refresh(self.source.read_assignment, force=force)
        except ModelError as exc:
            logger.error(
                "Cannot serve revision %d of the model assignment; still serving %s: %s",
                self.manager.failed_revision,
                _describe(self.manager.current),
                exc,
            )
        except Exception as exc:  # the store did not answer
            logger.warning("Could not read the model assignment (%s: %s); will retry", type(exc).__name__, exc)
            return False
        await self.report()
        return True

    async def rescan(self) -> None:
        """SIGHUP: re-read the registry on disk and the stored assignment, and reload both models."""
        logger.info(
            "Rescanning the model registry %s and re-applying the stored assignment", self.manager.registry.root
        )
        await self.follow(force=True)

    async def report(self) -> None:
        if self.manager.current is None:
            return
        self._reported_at = time.monotonic()
        try:
            await self.source.report_worker(self.manager.report(self.worker))
        except Exception as exc:  # only a status line for the admin view: never worth more than a debug note
            logger.debug("Could not report this worker's models: %s", exc)
