"""What every store shares: the records it takes and returns, the Store protocol, and row helpers.

Routes and tests speak only the Store protocol, so they do not care which back
end runs. The helpers here turn a Record into a row and a selected row back into
a Decision, and hold the SELECT both back ends read with, so the two stores
cannot disagree on what a decision looks like in a table. Nothing here opens a
connection or imports a back end: postgres.py and sqlite.py build on this module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import operator
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from psycopg.types.json import Jsonb

from service.errors import StoreUnavailable
from service.models.metadata import TrainingDistribution
from service.monitoring import Ranking, WindowCounts
from service.reasons import completed
from service.schemas import (
    APPLICANT_FIELDS,
    Applicant,
    Assignment,
    AssignmentChange,
    ChallengerDecision,
    Comparison,
    Decision,
    Erasure,
    Outcome,
    OutcomeRequest,
    WorkerModels,
    encoder,
    reasons_decoder,
)
from service.storage.model_records import Change


# Not frozen: a frozen dataclass's __init__ costs 3x more, once per decision stored.
@dataclass(slots=True)
class Record:
    """A decision as stored: the answer, the applicant it answers, and its idempotency data."""

    decision: Decision
    applicant: Applicant
    # A batch stores its key and request hash on its first row only.
    idempotency_key: str | None = None
    request_hash: str | None = None
    batch_id: uuid.UUID | None = None
    batch_position: int | None = None
    # The id of the API key that asked for it (never the secret); None when the API is open.
    key_id: str | None = None


@dataclass(frozen=True)
class ExistingBatch:
    """The batch already stored under an Idempotency-Key, in its original order."""

    decisions: list[Decision]
    request_hash: str | None


@dataclass(frozen=True)
class Existing:
    """The record already stored under an Idempotency-Key."""

    decision: Decision
    request_hash: str | None


@dataclass(frozen=True)
class Search:
    """One page of a search: the window [since, until), optional filters, and where the previous page ended."""

    since: dt.datetime
    until: dt.datetime
    decision: str | None
    reference: str | None
    after: tuple[dt.datetime, uuid.UUID] | None
    limit: int


@dataclass(frozen=True)
class Audited:
    """A decision as an auditor sees it: its inputs (None once erased), its erasure, the key it was made with."""

    decision: Decision
    applicant: dict[str, Any] | None
    erasure: Erasure | None
    key_id: str | None


# How long after its time a decision's row may still commit, in DATABASE_REQUEST_TIMEOUTs: a write is sent within
# one (refuse_late) and each call is bounded by two. A window search lists only decisions older than this, so no
# decision can commit into a page already served.
COMMIT_BOUND = 3


def refuse_late(records: Sequence[Record], waited_at_most: float) -> None:
    """Refuse (503) to write decisions made longer ago than `waited_at_most` seconds: they queued too long.

    Called on the connection, just before the write is sent. A decision's time is taken before it is
    queued; without this, one that waited behind a slow call could commit with a time the search
    has already passed.
    """
    seconds = waited(records)
    if seconds > waited_at_most:
        raise StoreUnavailable(
            f"The decision waited {seconds:.1f} s to be written (more than {waited_at_most:g} s); it was not recorded."
        )


def waited(records: Sequence[Record]) -> float:
    """Seconds since the oldest of the records was decided."""
    return (dt.datetime.now(dt.UTC) - min(record.decision.created_at for record in records)).total_seconds()


class Store(Protocol):
    description: str

    async def migrate(self) -> list[int]: ...

    async def insert(self, record: Record) -> Existing | None:
        """Commit the record, or return the one already stored under its idempotency key."""

    async def insert_many(self, records: Sequence[Record]) -> ExistingBatch | None:
        """Commit all records in one transaction, or none; or return the batch already stored under the key."""

    async def get(self, decision_id: uuid.UUID) -> Decision | None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    def observe_pool(self) -> None:
        """Publish the pool's size and use to the metrics."""

    # -- the model lifecycle (model_records.py) --

    async def read_assignment(self) -> Assignment | None: ...

    async def change_assignment(self, change: Change, changed_by: str) -> Assignment:
        """Apply `change` to the current assignment under a lock and record it; tell every worker."""

    async def assignment_history(self, limit: int) -> list[AssignmentChange]: ...

    def assignment_revisions(self, tick: float, stop: asyncio.Event) -> AsyncGenerator[int, None]:
        """The newest revision now, and again whenever it may have changed (at least every `tick` seconds).

        Ends once `stop` is set, between calls to the server (never cutting one short).
        """

    async def report_worker(self, report: WorkerModels) -> None: ...

    async def forget_worker(self, worker: str) -> None: ...

    async def workers(self, seen_since: dt.datetime) -> list[WorkerModels]: ...

    async def record_challenger(self, rows: Sequence[ChallengerDecision]) -> None: ...

    async def compare(self, champion: str, challenger: str, since: dt.datetime, until: dt.datetime) -> Comparison: ...

    async def compare_outcomes(
        self, champion: str, challenger: str, since: dt.datetime, until: dt.datetime
    ) -> tuple[Ranking, Ranking]: ...

    # -- outcomes and monitoring (monitoring_records.py) --

    async def record_outcome(
        self, decision_id: uuid.UUID, outcome: OutcomeRequest, recorded_by: str | None
    ) -> tuple[str, Outcome | None, dt.datetime | None]:
        """("created" | "same" | "different" | "unknown" | "too_early", the outcome on record, the decision's time)."""

    async def monitoring_counts(
        self,
        version: str,
        since: dt.datetime,
        until: dt.datetime,
        distribution: TrainingDistribution | None,
        full: bool = True,
    ) -> WindowCounts:
        """The window's counts and bins; with `full`, its quantiles and its back-test too."""

    async def roc_points(self, version: str, since: dt.datetime, until: dt.datetime) -> list[tuple[int, int, int]]: ...

    # -- integrators and auditors (audit_records.py) --

    async def search(self, search: Search) -> list[Decision]: ...

    async def audited(self, decision_id: uuid.UUID) -> Audited | None: ...

    async def erase(self, decision_id: uuid.UUID, erased_by: str) -> Erasure | None: ...

    async def erase_older_than(self, cutoff: dt.datetime, limit: int) -> list[uuid.UUID]: ...

    async def cursor_secret(self) -> bytes: ...


# The batch that holds a key, in order; a key held by a single decision has no batch.
_BATCH_OF_KEY = " WHERE batch_id = (SELECT batch_id FROM decisions WHERE idempotency_key = {p}) ORDER BY batch_position"
DECISION_COLUMNS = (
    "id, decision, probability_of_default, risk_category, score, CAST(reasons AS TEXT), model_version,"
    " created_at, request_hash, reference"
)
_SELECT = f"SELECT {DECISION_COLUMNS} FROM decisions"


_applicant_values = operator.attrgetter(*APPLICANT_FIELDS)


def _row(record: Record, dialect: str) -> tuple[Any, ...]:
    d, a = record.decision, record.applicant
    reasons: Any = encoder.encode(d.reasons)
    batch_id: Any = record.batch_id
    if dialect == "postgres":
        head: tuple[Any, ...] = (d.id, d.created_at)
        # Already JSON: psycopg sends it as jsonb without encoding it again.
        reasons = Jsonb(reasons, dumps=_as_is)
    else:
        reasons = reasons.decode()
        head = (str(d.id), d.created_at.isoformat())
        batch_id = None if batch_id is None else str(batch_id)
    return (
        *head,
        d.model_version,
        *_applicant_values(a),
        d.probability_of_default,
        d.risk_category,
        d.score,
        d.decision,
        reasons,
        record.idempotency_key,
        record.request_hash,
        batch_id,
        record.batch_position,
        d.reference,
        record.key_id,
        None,  # erased_at: never, yet
        None,  # erased_by
    )


def _as_is(json: bytes) -> bytes:
    return json


def _decision(row: Sequence[Any]) -> Existing:
    decision_id, created_at = row[0], row[7]
    if isinstance(decision_id, str):  # SQLite
        decision_id = uuid.UUID(decision_id)
        created_at = dt.datetime.fromisoformat(created_at)
    return Existing(
        decision=Decision(
            id=decision_id,
            decision=row[1],
            probability_of_default=row[2],
            risk_category=row[3],
            score=row[4],
            reasons=completed(reasons_decoder.decode(row[5])),
            model_version=row[6],
            created_at=created_at.astimezone(dt.UTC),
            reference=row[9],
        ),
        request_hash=row[8],
    )


def _existing_batch(rows: Sequence[Sequence[Any]]) -> ExistingBatch:
    # No rows: the key is held by a single decision, so it cannot match this batch.
    found = [_decision(row) for row in rows]
    return ExistingBatch(
        decisions=[f.decision for f in found],
        request_hash=found[0].request_hash if found else None,
    )
