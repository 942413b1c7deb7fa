"""PostgreSQL's part of what integrators and auditors need: the search, the inputs for audit, erasure, retention."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from service.schemas import Decision, Erasure
from service.storage import audit_records as audit
from service.storage.base import Audited, Search, _decision


class PostgresAudit:
    """Mixed into PostgresStore, which provides `_run` (a bounded call on a pooled connection)."""

    _run: Callable[..., Awaitable[Any]]

    async def search(self, search: Search) -> list[Decision]:
        sql, params = audit.search_query(search, "%s")

        async def read(conn: psycopg.AsyncConnection[Any]) -> list[Decision]:
            rows = await (await conn.execute(sql, params)).fetchall()
            return [_decision(row).decision for row in rows]

        result: list[Decision] = await self._run(read)
        return result

    async def audited(self, decision_id: uuid.UUID) -> Audited | None:
        async def read(conn: psycopg.AsyncConnection[Any]) -> Any:
            return await (await conn.execute(audit.AUDIT.format(p="%s"), (decision_id,))).fetchone()

        row = await self._run(read)
        return None if row is None else audit.audit_view(row)

    async def erase(self, decision_id: uuid.UUID, erased_by: str) -> Erasure | None:
        """Erase one decision's inputs now (or find when they were); None for an unknown id."""

        async def write(conn: psycopg.AsyncConnection[Any]) -> Erasure | None:
            now = dt.datetime.now(dt.UTC)
            await conn.execute(audit.ERASE_ONE.format(p="%s"), (now, erased_by, decision_id))
            row = await (await conn.execute(audit.ERASURE.format(p="%s"), (decision_id,))).fetchone()
            return None if row is None else Erasure(erased_at=row[0].astimezone(dt.UTC), erased_by=row[1])

        result: Erasure | None = await self._run(write)
        return result

    async def erase_older_than(self, cutoff: dt.datetime, limit: int) -> list[uuid.UUID]:
        """One batch of retention: at most `limit` old decisions no other run holds; their ids."""

        async def write(conn: psycopg.AsyncConnection[Any]) -> list[uuid.UUID]:
            now = dt.datetime.now(dt.UTC)
            rows = await (await conn.execute(audit.ERASE_OLD_POSTGRES, (cutoff, limit, now))).fetchall()
            return [row[0] for row in rows]

        result: list[uuid.UUID] = await self._run(write, 60.0)
        return result

    async def cursor_secret(self) -> bytes:
        async def read(conn: psycopg.AsyncConnection[Any]) -> bytes:
            row = await (await conn.execute("SELECT value FROM service_secrets WHERE name = 'cursor'")).fetchone()
            assert row is not None, "migration 4 writes it"
            return bytes(row[0])

        result: bytes = await self._run(read)
        return result
