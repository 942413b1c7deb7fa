"""The SQLite store: the embedded default, one connection on one dedicated thread.

It needs no server, so the service runs out of the box and in tests; PostgreSQL
takes over when DATABASE_URL is set. sqlite3 calls block, so each runs on the
store's own thread while the event loop awaits it, and WAL with synchronous=FULL
makes each COMMIT durable before the service answers. Rows and the schema come
from base.py and schema.py, the same as for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from service import metrics
from service.errors import StoreUnavailable
from service.schemas import Decision
from service.storage.base import (
    _BATCH_OF_KEY,
    _SELECT,
    Existing,
    ExistingBatch,
    Record,
    _decision,
    _existing_batch,
    _row,
    refuse_late,
)
from service.storage.schema import _NAMES, _checksum, _to_apply
from service.storage.sqlite_audit import SQLiteAudit
from service.storage.sqlite_models import SQLiteModelRecords
from service.storage.sqlite_monitoring import SQLiteMonitoring

T = TypeVar("T")

_SQLITE_INSERT = (
    f"INSERT INTO decisions ({', '.join(_NAMES)}) VALUES ({', '.join(['?'] * len(_NAMES))})"
    " ON CONFLICT (idempotency_key) DO NOTHING"
)


class SQLiteStore(SQLiteModelRecords, SQLiteMonitoring, SQLiteAudit):
    """The embedded default: one connection, used only from one dedicated thread.

    sqlite3 calls block, so they run on that thread and the event loop only awaits
    them; the single thread also serialises writers, which SQLite wants anyway.
    """

    def __init__(
        self, path: Path, executor: ThreadPoolExecutor, conn: sqlite3.Connection, request_timeout: float
    ) -> None:
        self._path = path
        self._executor = executor
        self._conn = conn
        self._request_timeout = request_timeout
        self.description = f"SQLite at {path}"

    @classmethod
    async def open(cls, path: Path, request_timeout: float = 3.0) -> SQLiteStore:
        """Open the file on the store's thread; a write waits at most `request_timeout` for another's lock."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=request_timeout)
            # WAL lets readers run beside the writer; synchronous=FULL makes each
            # COMMIT durable before we answer 201.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, conn, request_timeout)

    async def _run(self, action: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, action, self._conn)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise
        except sqlite3.DatabaseError as exc:  # locked, read-only, disk full, file gone
            metrics.count(metrics.store_errors)
            raise StoreUnavailable(f"The system of record is unavailable: {exc}.") from exc

    async def migrate(self) -> list[int]:
        def apply(conn: sqlite3.Connection) -> list[int]:
            # BEGIN IMMEDIATE takes the write lock: SQLite's advisory lock.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                    " description TEXT NOT NULL, checksum TEXT NOT NULL, applied_at TEXT NOT NULL)"
                )
                done = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
                applied = []
                for version, description, statements in _to_apply(done, "sqlite"):
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                        (version, description, _checksum(statements), dt.datetime.now(dt.UTC).isoformat()),
                    )
                    applied.append(version)
                conn.execute("COMMIT")
                return applied
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return await self._run(apply)

    async def insert(self, record: Record) -> Existing | None:
        def insert(conn: sqlite3.Connection) -> Existing | None:
            # It may have queued behind a long read on this one thread: too long, and it is refused.
            refuse_late((record,), self._request_timeout)
            cur = conn.execute(_SQLITE_INSERT, _row(record, "sqlite"))
            if cur.rowcount == 1:
                return None
            row = conn.execute(_SELECT + " WHERE idempotency_key = ?", (record.idempotency_key,)).fetchone()
            return _decision(row)

        return await self._run(insert)

    async def insert_many(self, records: Sequence[Record]) -> ExistingBatch | None:
        rows = [_row(r, "sqlite") for r in records]

        def insert_all(conn: sqlite3.Connection) -> ExistingBatch | None:
            refuse_late(records[:1], self._request_timeout)
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute(_SQLITE_INSERT, rows[0]).rowcount == 0:
                    found = conn.execute(_SELECT + _BATCH_OF_KEY.format(p="?"), (records[0].idempotency_key,))
                    existing = _existing_batch(found.fetchall())
                else:
                    conn.executemany(_SQLITE_INSERT, rows[1:])
                    existing = None
                conn.execute("COMMIT")
                return existing
            except BaseException:
                conn.execute("ROLLBACK")
                raise

        return await self._run(insert_all)

    async def get(self, decision_id: uuid.UUID) -> Decision | None:
        def get(conn: sqlite3.Connection) -> Decision | None:
            row = conn.execute(_SELECT + " WHERE id = ?", (str(decision_id),)).fetchone()
            return None if row is None else _decision(row).decision

        return await self._run(get)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1").fetchone())

    def observe_pool(self) -> None:
        """One embedded connection, always open: nothing to report as a pool."""

    async def close(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._conn.close)
        finally:
            self._executor.shutdown(wait=True)
