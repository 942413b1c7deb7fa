"""The challenger off the response path: a bounded queue, and a boosting model in a process of its own.

The queue's logic is tested with small fakes for the challenger and the recorder
(pure logic); the boosting challenger is a real child process running the real
pipeline, which the tests kill and freeze.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from service import dataset, metrics
from service.models import boosting, pipeline
from service.models.boosting import BoostingChallenger, ChallengerFailed
from service.models.challenger import ChallengerQueue, ScorecardChallenger
from service.models.metadata import ModelError
from service.models.policy import Policy
from service.models.registry import Registry, read_metadata
from service.schemas import Applicant, ChallengerDecision
from tests.conftest import Versions, corrupt_copy, shipped_model

APPLICANTS = dataset.load().applicants
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def dropped(reason: str) -> float:
    return metrics._counts.get((metrics.challenger_dropped, (reason,)), 0.0)


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.rows: list[ChallengerDecision] = []
        self.fail = fail

    async def __call__(self, rows: Sequence[ChallengerDecision]) -> None:
        if self.fail:
            raise RuntimeError("the database said no")
        self.rows.extend(rows)


class Slow(ScorecardChallenger):
    """A challenger that takes its time, or fails, for the queue's sake."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        super().__init__(shipped_model())
        self.delay, self.fail = delay, fail

    async def score(self, applicants: list[Applicant]) -> list[float]:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("the challenger fell over")
        return await super().score(applicants)


def offer(queue: ChallengerQueue, count: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    for i, decision_id in enumerate(ids):
        queue.offer(decision_id, APPLICANTS[i % len(APPLICANTS)])
    return ids


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a plain predicate
        await asyncio.sleep(0.01)


async def test_queue_scores_and_records_every_offered_decision_with_the_challengers_policy() -> None:
    scorer = Slow()
    recorder = Recorder()
    queue = ChallengerQueue(recorder, lambda: scorer)
    ids = offer(queue, 300)
    await until(lambda: len(recorder.rows) == 300)
    assert [r.decision_id for r in recorder.rows] == ids
    for row, applicant in zip(recorder.rows, APPLICANTS, strict=False):
        p = scorer.model.scorer.probability(applicant)
        assert row.probability_of_default == p and row.decision == scorer.policy.decision(p)
        assert row.model_version == scorer.version
    assert await queue.close(1.0) == 0


async def test_queue_is_bounded_and_counts_what_it_drops() -> None:
    scorer = Slow(delay=0.5)
    queue = ChallengerQueue(Recorder(), lambda: scorer, max_queued=100, batch=10)
    before = dropped("queue_full")
    started = time.perf_counter()
    offer(queue, 1000)
    # Offering never waits for the challenger, however slow it is.
    assert time.perf_counter() - started < 0.1
    assert len(queue) <= 100
    assert dropped("queue_full") - before >= 900
    await queue.close(0.0)


async def test_failing_challenger_or_store_drops_its_own_work_and_goes_on() -> None:
    before = dropped("failed")
    broken = Slow(fail=True)
    queue = ChallengerQueue(Recorder(), lambda: broken, batch=50)
    offer(queue, 120)
    await until(lambda: dropped("failed") - before == 120)
    assert dropped("failed") - before == 120
    await queue.close(0.1)

    recorder = Recorder(fail=True)
    scorer = Slow()
    queue = ChallengerQueue(recorder, lambda: scorer)
    offer(queue, 10)
    await until(lambda: dropped("failed") - before == 130)
    assert dropped("failed") - before == 130
    await queue.close(0.1)


async def test_without_a_challenger_offered_work_is_dropped_as_such() -> None:
    before = dropped("no_challenger")
    queue = ChallengerQueue(Recorder(), lambda: None)
    offer(queue, 7)
    await until(lambda: dropped("no_challenger") - before == 7)
    assert dropped("no_challenger") - before == 7
    await queue.close(0.1)


async def test_close_drains_within_its_budget_and_drops_the_rest() -> None:
    scorer = Slow(delay=0.2)
    recorder = Recorder()
    queue = ChallengerQueue(recorder, lambda: scorer, batch=10)
    before = dropped("shutdown")
    offer(queue, 100)
    started = time.perf_counter()
    lost = await queue.close(0.5)
    assert time.perf_counter() - started < 0.8
    assert 0 < len(recorder.rows) < 100
    # Whatever was not recorded is counted: still queued, or in flight when the budget ran out.
    assert dropped("shutdown") - before == 100 - len(recorder.rows)
    assert lost <= 100 - len(recorder.rows)
    queue.offer(uuid.uuid4(), APPLICANTS[0])  # after close: counted, not queued
    assert dropped("shutdown") - before == 101 - len(recorder.rows)


# -- the boosting challenger's process ------------------------------------------------------------


async def start(versions: Versions, version: str | None = None) -> BoostingChallenger:
    entry = Registry(versions.root).get(version or versions.boosting)
    assert entry.metadata is not None
    return await BoostingChallenger.start(entry.path, entry.metadata, Policy.of(entry.metadata, None))


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().split()[18])


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return status != "Z"


async def test_boosting_challenger_scores_as_its_pipeline(versions: Versions) -> None:
    process = await start(versions)
    try:
        _, fitted, _ = pipeline.load(versions.root / versions.boosting)
        batch = APPLICANTS[:256]
        assert await process.score(batch) == pipeline.probabilities(fitted, pipeline.to_matrix(batch))
        assert process.pid is not None and niceness(process.pid) == 19
    finally:
        pid = process.pid
        await process.close()
    assert pid is not None and not alive(pid)


async def test_boosting_challenger_that_cannot_load_says_why(versions: Versions) -> None:
    corrupt = corrupt_copy(versions, versions.boosting, "test-corrupt-gb", "model.joblib")
    with pytest.raises(ModelError, match=r"model\.joblib has sha256"):
        await start(versions, corrupt)
    # The folder is fine but the pickle is not what the hash covers: unpickling never happens.
    metadata, _ = read_metadata(versions.root / corrupt)
    assert metadata.kind == "boosting"


async def test_a_killed_challenger_process_fails_its_batch_and_is_replaced(
    versions: Versions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boosting, "RESPAWN_BACKOFF", 0.2)
    process = await start(versions)
    try:
        first = process.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        with pytest.raises(ChallengerFailed):
            await process.score(APPLICANTS[:5])
        with pytest.raises(ChallengerFailed, match="waiting before starting another"):
            await process.score(APPLICANTS[:5])
        await asyncio.sleep(0.3)
        assert len(await process.score(APPLICANTS[:5])) == 5
        assert process.pid not in (None, first)
    finally:
        await process.close()


async def test_a_frozen_challenger_process_times_out_and_is_killed(
    versions: Versions, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boosting, "SCORE_TIMEOUT", 0.3)
    process = await start(versions)
    frozen = process.pid
    assert frozen is not None
    try:
        os.kill(frozen, signal.SIGSTOP)
        started = time.perf_counter()
        with pytest.raises(ChallengerFailed):
            await process.score(APPLICANTS[:5])
        assert time.perf_counter() - started < 1.0
        await until(lambda: not alive(frozen), 3.0)
        assert not alive(frozen)
    finally:
        if alive(frozen):
            os.kill(frozen, signal.SIGCONT)
        await process.close()
