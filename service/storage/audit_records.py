"""What integrators and auditors read and erase: the search, the applicant's inputs, erasure and retention.

- The search lists decisions newest first, by keyset on (created_at, id), which
  the `decisions_created_id` index serves in order (and `decisions_reference` for
  a reference). A page continues strictly below the last row of the one before,
  so rows inserted meanwhile can neither repeat nor shift a page.
- Erasure removes the applicant's fields and the reference from a decision, and
  the idempotency key and request hash (a lender's key is often its application
  id; the hash would confirm a guess of the inputs), and keeps the rest (decision,
  probability, score, reasons, version, time), with who erased it and when:
  `erased_by` is an admin key's id, or `retention`.
- Retention erases in bounded batches, each its own transaction; PostgreSQL's
  `FOR UPDATE SKIP LOCKED` lets runs side by side take different rows.

Statements both back ends share are written once with `{p}` for the placeholder;
retention's batch differs by back end and is written for each.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

from service.schemas import APPLICANT_FIELDS, Erasure
from service.storage.base import DECISION_COLUMNS, Audited, Search, _decision

# What an erasure removes: the applicant's fields, the reference, and what could lead back to them.
ERASED = (*APPLICANT_FIELDS, "reference", "idempotency_key", "request_hash")
_NULLS = ", ".join(f"{name} = NULL" for name in ERASED)


def _same(value: Any) -> Any:
    return value


def search_query(
    search: Search,
    placeholder: str,
    time: Callable[[dt.datetime], Any] = _same,
    ident: Callable[[uuid.UUID], Any] = _same,
) -> tuple[str, list[Any]]:
    """The page's SQL and parameters; `time` and `ident` turn times and ids into what the back end stores."""
    p = placeholder
    where = [f"created_at >= {p}", f"created_at < {p}"]
    params: list[Any] = [time(search.since), time(search.until)]
    if search.decision is not None:
        where.append(f"decision = {p}")
        params.append(search.decision)
    if search.reference is not None:
        where.append(f"reference = {p}")
        params.append(search.reference)
    if search.after is not None:
        where.append(f"(created_at, id) < ({p}, {p})")
        params += [time(search.after[0]), ident(search.after[1])]
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
