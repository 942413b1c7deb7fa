"""The model lifecycle's records, as both back ends keep them.

- `model_assignments`: append-only; the newest revision is the assignment
  (champion, challenger and share), the older ones its history, each with what
  it replaced, who changed it (an admin key id) and when. A change is computed
  from the current row inside the writing transaction, under a lock, so two
  concurrent admin calls cannot both build on the same revision.
- `challenger_decisions`: a challenger's verdict beside each decision it scored.
- `model_workers`: what each worker process serves, as it last reported it.

The SQL both dialects share is written here once, with `{p}` for the
placeholder; so is turning rows into the API's types and the comparison's
figures into its answer. postgres_models.py and sqlite_models.py hold the rest.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from typing import Any

from service.schemas import Assignment, AssignmentChange, ChallengerAssignment, Comparison, WorkerModels

# PostgreSQL NOTIFY channel; the payload is the new revision.
CHANNEL = "model_assignment"
# Serialises assignment changes (any number, shared by every writer).
ASSIGNMENT_LOCK_ID = 0x6D6F646C  # "modl"

# (champion, challenger): what an assignment change asks for.
Next = tuple[str, ChallengerAssignment | None]
# Given the current assignment (None before the first), the change's action and result, or None for no change.
Change = Callable[[Assignment | None], tuple[str, Next] | None]

FLIPS = (
    ("approve", "decline"),
    ("decline", "approve"),
    ("approve", "refer"),
    ("refer", "approve"),
    ("decline", "refer"),
    ("refer", "decline"),
)

_ASSIGNMENT_COLUMNS = "revision, champion, challenger, challenger_share, changed_at, changed_by"
CURRENT = f"SELECT {_ASSIGNMENT_COLUMNS} FROM model_assignments ORDER BY revision DESC LIMIT 1"
REVISION = "SELECT coalesce(max(revision), 0) FROM model_assignments"
HISTORY = (
    "SELECT revision, action, champion, challenger, challenger_share, previous_champion, previous_challenger,"
    " previous_share, changed_at, changed_by FROM model_assignments ORDER BY revision DESC LIMIT {p}"
)
INSERT_ASSIGNMENT = (
    "INSERT INTO model_assignments (revision, action, champion, challenger, challenger_share, previous_champion,"
    " previous_challenger, previous_share, changed_at, changed_by) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p},"
    " {p}, {p})"
)
_WORKER_COLUMNS = "worker, revision, champion, challenger, loaded_at, seen_at, error"
REPORT_WORKER = (
    f"INSERT INTO model_workers ({_WORKER_COLUMNS}) VALUES ({{p}}, {{p}}, {{p}}, {{p}}, {{p}}, {{p}}, {{p}})"
    " ON CONFLICT (worker) DO UPDATE SET revision = excluded.revision, champion = excluded.champion,"
    " challenger = excluded.challenger, loaded_at = excluded.loaded_at, seen_at = excluded.seen_at,"
    " error = excluded.error"
)
FORGET_WORKER = "DELETE FROM model_workers WHERE worker = {p}"
WORKERS = f"SELECT {_WORKER_COLUMNS} FROM model_workers WHERE seen_at >= {{p}} ORDER BY worker"
CHALLENGER_COLUMNS = "decision_id, model_version, probability_of_default, risk_category, score, decision, scored_at"
INSERT_CHALLENGER = (
    f"INSERT INTO challenger_decisions ({CHALLENGER_COLUMNS}) VALUES ({{p}}, {{p}}, {{p}}, {{p}}, {{p}}, {{p}}, {{p}})"
    " ON CONFLICT DO NOTHING"
)
# Decisions both models scored in the window: the champion's row joined to the challenger's verdict.
PAIRS = (
    " FROM decisions d JOIN challenger_decisions c ON c.decision_id = d.id"
    " WHERE c.model_version = {p} AND d.model_version = {p} AND d.created_at >= {p} AND d.created_at < {p}"
)
ABS_DELTA = "abs(d.probability_of_default - c.probability_of_default)"
# count, one sum per flip, the two approval rates, mean |Δp|: the same aggregates in both dialects.
COMPARISON_AGGREGATES = ", ".join(
    [
        "count(*)",
        *(f"sum(CASE WHEN d.decision = '{a}' AND c.decision = '{b}' THEN 1 ELSE 0 END)" for a, b in FLIPS),
        "avg(CASE WHEN d.decision = 'approve' THEN 1.0 ELSE 0.0 END)",
        "avg(CASE WHEN c.decision = 'approve' THEN 1.0 ELSE 0.0 END)",
        f"avg({ABS_DELTA})",
    ]
)


def assignment(row: Sequence[Any]) -> Assignment:
    revision, champion, challenger, share, changed_at, changed_by = row
    return Assignment(
        champion=champion,
        challenger=ChallengerAssignment(version=challenger, share=share) if challenger is not None else None,
        changed_at=_utc(changed_at),
        changed_by=changed_by,
        revision=int(revision),
    )


def change(row: Sequence[Any]) -> AssignmentChange:
    revision, action, champion, challenger, share, previous_champion, previous_challenger, previous_share = row[:8]
    return AssignmentChange(
        revision=int(revision),
        action=action,
        champion=champion,
        challenger=ChallengerAssignment(challenger, share) if challenger is not None else None,
        previous_champion=previous_champion,
        previous_challenger=(
            ChallengerAssignment(previous_challenger, previous_share) if previous_challenger is not None else None
        ),
        changed_at=_utc(row[8]),
        changed_by=row[9],
    )


def assignment_row(
    revision: int, action: str, new: Next, current: Assignment | None, changed_at: Any, changed_by: str
) -> tuple[Any, ...]:
    champion, challenger = new
    previous = current.challenger if current is not None else None
    return (
        revision,
        action,
        champion,
        challenger.version if challenger else None,
        challenger.share if challenger else None,
        current.champion if current is not None else None,
        previous.version if previous else None,
        previous.share if previous else None,
        changed_at,
        changed_by,
    )


def worker(row: Sequence[Any]) -> WorkerModels:
    name, revision, champion, challenger, loaded_at, seen_at, error = row
    return WorkerModels(
        worker=name,
        revision=int(revision),
        champion=champion,
        challenger=challenger,
        loaded_at=_utc(loaded_at),
        seen_at=_utc(seen_at),
        error=error,
    )


def comparison(
    champion: str,
    challenger: str,
    since: dt.datetime,
    until: dt.datetime,
    aggregates: Sequence[Any],
    p95: float | None,
    correlation: float | None,
) -> Comparison:
    count = int(aggregates[0])
    flips = {f"{a}_to_{b}": int(aggregates[1 + i] or 0) for i, (a, b) in enumerate(FLIPS)}
    champion_rate, challenger_rate, mean = aggregates[1 + len(FLIPS) :]
    return Comparison(
        champion=champion,
        challenger=challenger,
        window={"since": since, "until": until},
        count=count,
        flips=flips,
        approval_rate={"champion": _float(champion_rate), "challenger": _float(challenger_rate)},
        abs_delta_p={"mean": _float(mean), "p95": p95},
        score_correlation=correlation,
        outcomes=None,
    )


def correlation_from_sums(n: int, sx: int, sy: int, sxx: int, syy: int, sxy: int) -> float | None:
    """Pearson's r from exact integer sums (as SQLite gives them); None when either side is constant."""
    numerator = n * sxy - sx * sy
    denominator = (n * sxx - sx * sx) * (n * syy - sy * sy)
    return None if n < 2 or denominator <= 0 else numerator / math.sqrt(denominator)


def interpolated(values: Sequence[float], fraction: float) -> float:
    """Two neighbouring order statistics, blended as percentile_cont blends them."""
    return values[0] if len(values) == 1 else values[0] + (values[1] - values[0]) * fraction


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _utc(value: Any) -> dt.datetime:
    if isinstance(value, str):  # SQLite keeps ISO 8601 text
        value = dt.datetime.fromisoformat(value)
    return value.astimezone(dt.UTC)  # type: ignore[no-any-return]
