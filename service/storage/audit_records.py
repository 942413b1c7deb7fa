"""What integrators and auditors read and erase: the search, the applicant's inputs, erasure and retention.

- The search lists decisions newest first, by keyset on (created_at, id), which
  the `decisions_created_id` index serves in order (and `decisions_reference` for
  a reference). A page continues strictly below the last row of the one before,
  so rows inserted meanwhile can neither repeat nor shift a page.
- Erasure removes the applicant's fields and the reference from a decision and
  keeps the rest (decision, probability, score, reasons, version, time), with who
  erased it and when: `erased_by` is an admin key's id, or `retention`.
- Retention erases in bounded batches, each its own transaction; PostgreSQL's
  `FOR UPDATE SKIP LOCKED` lets runs side by side take different rows.

The SQL is written once with `{p}` for the placeholder.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from service.schemas import APPLICANT_FIELDS, Decision, Erasure
from service.storage.base import DECISION_COLUMNS, _decision

# The applicant's fields, and the reference: what an erasure removes.
ERASED = (*APPLICANT_FIELDS, "reference")
_NULLS = ", ".join(f"{name} = NULL" for name in ERASED)


@dataclass(frozen=True)
class Search:
    """One page of a search: the window [since, until), optional filters, and where the previous page ended."""

    since: dt.datetime
    until: dt.datetime
    decision: str | None
    reference: str | None
    after: tuple[dt.datetime, uuid.UUID] | None
    limit: int


def search_query(search: Search, placeholder: str) -> tuple[str, list[Any]]:
    """The page's SQL and parameters (times and ids as the caller's back end stores them are its business)."""
    p = placeholder
    where = [f"created_at >= {p}", f"created_at < {p}"]
    params: list[Any] = [search.since, search.until]
    if search.decision is not None:
        where.append(f"decision = {p}")
        params.append(search.decision)
    if search.reference is not None:
        where.append(f"reference = {p}")
        params.append(search.reference)
    if search.after is not None:
        where.append(f"(created_at, id) < ({p}, {p})")
        params += list(search.after)
    params.append(search.limit)
    sql = (
        f"SELECT {DECISION_COLUMNS} FROM decisions WHERE "
        + " AND ".join(where)
        + f" ORDER BY created_at DESC, id DESC LIMIT {p}"
    )
    return sql, params


AUDIT = (
    f"SELECT {DECISION_COLUMNS}, {', '.join(APPLICANT_FIELDS)}, key_id, erased_at, erased_by"
    " FROM decisions WHERE id = {p}"
)
ERASE_ONE = (
    f"UPDATE decisions SET {_NULLS}, erased_at = {{p}}, erased_by = {{p}} WHERE id = {{p}} AND erased_at IS NULL"
)
ERASURE = "SELECT erased_at, erased_by FROM decisions WHERE id = {p}"
# PostgreSQL: a batch of old rows no other run holds, erased in one statement.
ERASE_OLD_POSTGRES = (
    "WITH batch AS (SELECT id FROM decisions WHERE created_at < %s AND erased_at IS NULL"
    " ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED)"
    f" UPDATE decisions d SET {_NULLS}, erased_at = %s, erased_by = 'retention' FROM batch WHERE d.id = batch.id"
    " RETURNING d.id"
)
# SQLite: one writer at a time already (BEGIN IMMEDIATE); the batch is chosen and erased under its lock.
SELECT_OLD_SQLITE = "SELECT id FROM decisions WHERE created_at < ? AND erased_at IS NULL ORDER BY created_at LIMIT ?"
ERASE_IDS_SQLITE = f"UPDATE decisions SET {_NULLS}, erased_at = ?, erased_by = 'retention' WHERE id = ?"


@dataclass(frozen=True)
class Audited:
    """A decision as an auditor sees it: its inputs (None once erased), its erasure, the key it was made with."""

    decision: Decision
    applicant: dict[str, Any] | None
    erasure: Erasure | None
    key_id: str | None


def audit_view(row: Any) -> Audited:
    """A row of AUDIT as an Audited."""
    width = len(DECISION_COLUMNS.split(","))
    decision = _decision(row[:width]).decision
    fields = row[width : width + len(APPLICANT_FIELDS)]
    key_id, erased_at, erased_by = row[width + len(APPLICANT_FIELDS) :]
    if erased_at is not None:
        if isinstance(erased_at, str):
            erased_at = dt.datetime.fromisoformat(erased_at)
        return Audited(decision, None, Erasure(erased_at=erased_at.astimezone(dt.UTC), erased_by=erased_by), key_id)
    applicant = dict(zip(APPLICANT_FIELDS, fields, strict=True))
    return Audited(decision, applicant, None, key_id)
