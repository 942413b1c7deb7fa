"""SQLite's part of what integrators and auditors need: the search, the inputs for audit, erasure, retention."""

from __future__ import annotations

import datetime as dt
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from service.schemas import Decision, Erasure
from service.storage import audit_records as audit
from service.storage.base import Audited, Search, _decision


class SQLiteAudit:
    """Mixed into SQLiteStore, which provides `_run` (a call on the store's own thread)."""

    _run: Callable[..., Awaitable[Any]]

    async def search(self, search: Search) -> list[Decision]:
        # SQLite keeps times as ISO 8601 text in UTC, and ids as text.
        sql, params = audit.search_query(search, "?", dt.datetime.isoformat, str)

        def read(conn: sqlite3.Connection) -> list[Decision]:
            return [_decision(row).decision for row in conn.execute(sql, params).fetchall()]

        result: list[Decision] = await self._run(read)
        return result

    async def audited(self, decision_id: uuid.UUID) -> Audited | None:
        def read(conn: sqlite3.Connection) -> Any:
            return conn.execute(audit.AUDIT.format(p="?"), (str(decision_id),)).fetchone()

        row = await self._run(read)
        if row is None:
            return None
        audited = audit.audit_view(row)
        if audited.applicant is not None:
            audited.applicant["telephone"] = bool(audited.applicant["telephone"])  # SQLite keeps booleans as 0 and 1
        return audited

    async def erase(self, decision_id: uuid.UUID, erased_by: str) -> Erasure | None:
        def write(conn: sqlite3.Connection) -> Erasure | None:
            now = dt.datetime.now(dt.UTC).isoformat()
            conn.execute(audit.ERASE_ONE.format(p="?"), (now, erased_by, str(decision_id)))
            row = conn.execute(audit.ERASURE.format(p="?"), (str(decision_id),)).fetchone()
            if row is None:
                return None
            return Erasure(erased_at=dt.datetime.fromisoformat(row[0]).astimezone(dt.UTC), erased_by=row[1])

        result: Erasure | None = await self._run(write)
        return result

    async def erase_older_than(self, cutoff: dt.datetime, limit: int) -> list[uuid.UUID]:
        def write(conn: sqlite3.Connection) -> list[uuid.UUID]:
            conn.execute("BEGIN IMMEDIATE")  # the write lock: runs side by side take turns
            try:
                ids = [row[0] for row in conn.execute(audit.SELECT_OLD_SQLITE, (cutoff.isoformat(), limit))]
                now = dt.datetime.now(dt.UTC).isoformat()
                conn.executemany(audit.ERASE_IDS_SQLITE, [(now, i) for i in ids])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return [uuid.UUID(i) for i in ids]

        result: list[uuid.UUID] = await self._run(write)
        return result

    async def cursor_secret(self) -> bytes:
        def read(conn: sqlite3.Connection) -> bytes:
            row = conn.execute("SELECT value FROM service_secrets WHERE name = 'cursor'").fetchone()
            return bytes(row[0])

        result: bytes = await self._run(read)
        return result
