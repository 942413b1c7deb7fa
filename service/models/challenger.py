"""The challenger: a second opinion on committed decisions, scored off the response path.

A request whose decision is sampled for the challenger only appends it to a
bounded queue after its row is committed; a background task takes batches from
the queue, scores them with whatever challenger the worker has then, and records
the results beside the champion's decisions. A full queue, a failing or stuck
challenger, or a database error drop challenger work (counted by reason); none of
them touches the champion's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from service import metrics
from service.models.policy import Policy, scorecard_points
from service.models.registry import ScorecardModel
from service.schemas import Applicant, ChallengerDecision

logger = logging.getLogger(__name__)

MAX_QUEUED = 10_000
# A boosting pipeline has a fixed cost of ~4 ms a call: batches amortise it.
BATCH = 256
# The in-process scorecard runs on the event loop: small slices, so it never holds it long.
SCORECARD_SLICE = 64
# How often a persistent failure is logged (it is counted every time).
LOG_EVERY = 30.0


class Challenger(Protocol):
    @property
    def version(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def policy(self) -> Policy: ...

    async def score(self, applicants: list[Applicant]) -> list[float]: ...

    async def close(self) -> None: ...


class ScorecardChallenger:
    """A logistic challenger: its folded scorecard, in the worker, a slice at a time."""

    def __init__(self, model: ScorecardModel) -> None:
        self.model = model
        self.version = model.version
        self.kind = model.kind
        self.policy = model.policy

    async def score(self, applicants: list[Applicant]) -> list[float]:
        probabilities: list[float] = []
        probability = self.model.scorer.probability
        for start in range(0, len(applicants), SCORECARD_SLICE):
            probabilities += [probability(a) for a in applicants[start : start + SCORECARD_SLICE]]
            await asyncio.sleep(0)  # let requests in between slices
        return probabilities

    async def close(self) -> None:
        """Nothing to release: the scorecard is plain data."""


Recorder = Callable[[Sequence[ChallengerDecision]], Awaitable[None]]


class ChallengerQueue:
    def __init__(
        self,
        record: Recorder,
        challenger: Callable[[], Challenger | None],
        max_queued: int = MAX_QUEUED,
        batch: int = BATCH,
    ) -> None:
        self._record = record
        # The worker's challenger at the time a batch is scored (it may change between batches).
        self._challenger = challenger
        self._max_queued = max_queued
        self._batch = batch
        self._items: deque[tuple[uuid.UUID, Applicant]] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._logged_at = 0.0
        # A fresh context: the drain serves many requests, and must not log with the id of the one that woke it.
        self._task = asyncio.get_running_loop().create_task(self._drain(), context=contextvars.Context())
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, decision_id: uuid.UUID, applicant: Applicant) -> None:
        """Queue a committed decision for the challenger; O(1), never blocks, never raises."""
        if self._closing or len(self._items) >= self._max_queued:
            metrics.count(metrics.challenger_dropped, "shutdown" if self._closing else "queue_full")
            return
        self._items.append((decision_id, applicant))
        self._idle.clear()
        self._wake.set()

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._items:
                count = min(self._batch, len(self._items))
                batch = [self._items.popleft() for _ in range(count)]
                try:
                    await self._score(batch)
                except asyncio.CancelledError:  # shutdown's budget ran out with this batch in flight
                    metrics.count(metrics.challenger_dropped, "shutdown", amount=len(batch))
                    raise
                except Exception:  # a bug: it costs this batch, never the queue
                    metrics.count(metrics.challenger_dropped, "failed", amount=len(batch))
                    logger.exception("A challenger batch of %d failed unexpectedly; dropped it", len(batch))
            self._idle.set()

    async def _score(self, batch: list[tuple[uuid.UUID, Applicant]]) -> None:
        challenger = self._challenger()
        if challenger is None:
            metrics.count(metrics.challenger_dropped, "no_challenger", amount=len(batch))
            return
        try:
            probabilities = await challenger.score([applicant for _, applicant in batch])
        except Exception as exc:  # a failing challenger costs its own work, nothing else
            self._failed("scoring", challenger.version, exc, len(batch))
            return
        now = dt.datetime.now(dt.UTC)
        policy = challenger.policy
        rows = [
            ChallengerDecision(
                decision_id=decision_id,
                model_version=challenger.version,
                probability_of_default=p,
                risk_category=policy.risk_category(p),
                score=scorecard_points(p),
                decision=policy.decision(p),
                scored_at=now,
            )
            for (decision_id, _), p in zip(batch, probabilities, strict=True)
        ]
        try:
            await self._record(rows)
        except Exception as exc:
            self._failed("recording", challenger.version, exc, len(batch))
            return
        metrics.count(metrics.challenger_scored, amount=len(rows))

    def _failed(self, what: str, version: str, exc: Exception, count: int) -> None:
        metrics.count(metrics.challenger_dropped, "failed", amount=count)
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            self._logged_at = now
            logger.warning(
                "Challenger %s: %s a batch of %d failed (%s: %s); dropped it (the champion is unaffected)",
                version,
                what,
                count,
                type(exc).__name__,
                exc,
            )

    async def close(self, budget: float) -> int:
        """Stop taking work, score what is queued within `budget` seconds, drop the rest; returns how many dropped."""
        self._closing = True
        if self._items:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), budget)
        self._task.cancel()
        # Let the cancelled batch count itself as dropped before the queue's own count.
        await asyncio.wait({self._task}, timeout=0.5)
        dropped = len(self._items)
        self._items.clear()
        if dropped:
            metrics.count(metrics.challenger_dropped, "shutdown", amount=dropped)
        return dropped
