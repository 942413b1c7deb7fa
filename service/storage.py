"""The system of record: one row per decision, in PostgreSQL or embedded SQLite.

Both stores speak the same small protocol, built from the same column list, so
routes and tests do not care which one runs. A call that cannot reach the
database raises StoreUnavailable (answered 503); nothing here retries a write,
because a retried INSERT whose first COMMIT did land would duplicate the record.
Clients retry with an Idempotency-Key instead.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import logging
import operator
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, get_type_hints

import psycopg
import psycopg_pool
from psycopg.types.json import Jsonb

from service import metrics
from service.coalesce import Coalescer
from service.errors import StoreUnavailable
from service.schemas import APPLICANT_FIELDS, Applicant, Decision, encoder, reasons_decoder
from service.settings import mask_url
from service.tasks import abandon

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Any number works as long as every worker and the release phase use the same one.
MIGRATION_LOCK_ID = 0x63726564  # "cred"


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


# -- schema --------------------------------------------------------------------

_PG_TYPES = {int: "integer", float: "double precision", str: "text", bool: "boolean"}
_SQLITE_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT", bool: "INTEGER"}


def _applicant_columns() -> list[tuple[str, type]]:
    hints = get_type_hints(Applicant)
    columns = []
    for name in APPLICANT_FIELDS:
        hint = hints[name]
        base = hint if hint in _PG_TYPES else str  # Literal[...] categories are text
        columns.append((name, base))
    return columns


_COLUMNS: list[tuple[str, type | None]] = [
    ("id", None),
    ("created_at", None),
    ("model_version", str),
    *_applicant_columns(),
    ("probability_of_default", float),
    ("risk_category", str),
    ("score", int),
    ("decision", str),
    ("reasons", None),
    ("idempotency_key", None),
    ("request_hash", None),
    ("batch_id", None),
    ("batch_position", None),
]
_SPECIAL = {
    "postgres": {
        "id": "uuid PRIMARY KEY",
        "created_at": "timestamptz NOT NULL",
        "reasons": "jsonb NOT NULL",
        "idempotency_key": "text UNIQUE",
        "request_hash": "text",
        "batch_id": "uuid",
        "batch_position": "integer",
    },
    "sqlite": {
        "id": "TEXT PRIMARY KEY",
        "created_at": "TEXT NOT NULL",
        "reasons": "TEXT NOT NULL",
        "idempotency_key": "TEXT UNIQUE",
        "request_hash": "TEXT",
        "batch_id": "TEXT",
        "batch_position": "INTEGER",
    },
}


def _create_table(dialect: str) -> str:
    types = _PG_TYPES if dialect == "postgres" else _SQLITE_TYPES
    lines = [
        f"{name} {_SPECIAL[dialect][name] if kind is None else types[kind] + ' NOT NULL'}" for name, kind in _COLUMNS
    ]
    return "CREATE TABLE IF NOT EXISTS decisions (\n  " + ",\n  ".join(lines) + "\n)"


# Append-only: a deployed migration is never edited, only followed by a new one.
MIGRATIONS: list[tuple[int, str, dict[str, list[str]]]] = [
    (
        1,
        "create decisions",
        {
            dialect: [
                _create_table(dialect),
                "CREATE INDEX IF NOT EXISTS decisions_created_at ON decisions (created_at)",
                "CREATE INDEX IF NOT EXISTS decisions_batch ON decisions (batch_id, batch_position)"
                " WHERE batch_id IS NOT NULL",
            ]
            for dialect in ("postgres", "sqlite")
        },
    ),
]


class SchemaError(Exception):
    """The database's schema history does not match the migrations in this code."""


def _checksum(statements: list[str]) -> str:
    return hashlib.sha256("\n".join(statements).encode()).hexdigest()


def _to_apply(done: dict[int, str], dialect: str) -> list[tuple[int, str, list[str]]]:
    """The migrations not applied yet; refuses if an applied one was edited since."""
    pending = []
    for version, description, statements in MIGRATIONS:
        checksum = _checksum(statements[dialect])
        if version not in done:
            pending.append((version, description, statements[dialect]))
        elif done[version] != checksum:
            raise SchemaError(
                f"Migration {version} ({description!r}) was changed after this database applied it "
                f"(checksum {done[version][:12]}, now {checksum[:12]}): add a new migration instead of editing one."
            )
    return pending


_NAMES = [name for name, _ in _COLUMNS]
# The batch that holds a key, in order; a key held by a single decision has no batch.
_BATCH_OF_KEY = " WHERE batch_id = (SELECT batch_id FROM decisions WHERE idempotency_key = {p}) ORDER BY batch_position"
_SELECT = (
    "SELECT id, decision, probability_of_default, risk_category, score, CAST(reasons AS TEXT), model_version,"
    " created_at, request_hash FROM decisions"
)


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
            reasons=reasons_decoder.decode(row[5]),
            model_version=row[6],
            created_at=created_at.astimezone(dt.UTC),
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


# -- PostgreSQL ------------------------------------------------------------------

_PG_INSERT = (
    f"INSERT INTO decisions ({', '.join(_NAMES)}) VALUES ({', '.join(['%s'] * len(_NAMES))})"
    " ON CONFLICT (idempotency_key) DO NOTHING"
)
# Binary COPY: PostgreSQL skips parsing text into uuid, timestamptz and float8 for
# every field, and psycopg dumps each column with the dumper named below instead
# of looking one up per value.
_PG_COPY = f"COPY decisions ({', '.join(_NAMES)}) FROM STDIN (FORMAT BINARY)"
# Taken from the declarations CREATE TABLE is built from ("uuid PRIMARY KEY" -> "uuid").
_PG_COPY_TYPES = [
    _PG_TYPES[kind] if kind is not None else _SPECIAL["postgres"][name].split()[0] for name, kind in _COLUMNS
]
# Errors that are our bugs, not the database's state: let them surface as such.
_PG_BUGS = (psycopg.ProgrammingError, psycopg.DataError, psycopg.IntegrityError, psycopg.NotSupportedError)
# How long migrations wait for another migrator's lock before start-up gives up.
MIGRATION_LOCK_TIMEOUT = "15s"
MIGRATION_TIMEOUT = 30.0


# Most records (or ids) one group commit (or read) takes; the rest wait for the next.
MAX_GROUP = 256
# Group commits in flight at once, each on its own connection: while one waits
# for its WAL flush, the next is already on its way.
MAX_COMMITTERS = 4
# Grouped reads in flight at once, each on its own connection.
MAX_READERS = 4


def _own_exception(exc: Exception) -> Exception:
    """What each request of a failed group raises: a 503 of its own, or the bug as it is (shared: rare, and a 500)."""
    return StoreUnavailable(exc.detail) if isinstance(exc, StoreUnavailable) else exc


async def _copy(conn: psycopg.AsyncConnection[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    async with conn.cursor() as cur, cur.copy(_PG_COPY) as copy:
        copy.set_types(_PG_COPY_TYPES)
        for row in rows:
            await copy.write_row(row)


async def _insert_group(conn: psycopg.AsyncConnection[Any], *, records: Sequence[Record]) -> list[Existing | None]:
    """Insert the records in one transaction; for each, None, or the record already under its key."""
    keyed = [i for i, r in enumerate(records) if r.idempotency_key is not None]
    outcomes: list[Existing | None] = [None] * len(records)
    if not keyed:
        # The common case under load: one COPY, which on an autocommit connection is
        # its own transaction (all rows or none) without BEGIN and COMMIT round trips.
        await _copy(conn, [_row(record, "postgres") for record in records])
        return outcomes
    async with conn.transaction(), conn.cursor() as cur:
        if len(keyed) < len(records):
            # Records without a key cannot conflict: COPY is several times cheaper
            # than INSERTs, on both sides of the connection.
            await _copy(conn, [_row(record, "postgres") for record in records if record.idempotency_key is None])
        if keyed:
            # Pipelined: one round trip for all keyed records.
            await cur.executemany(
                _PG_INSERT + " RETURNING id", [_row(records[i], "postgres") for i in keyed], returning=True
            )
            taken = []
            for i in keyed:
                if await cur.fetchone() is None:
                    taken.append(i)
                cur.nextset()
            for i in taken:
                # Its Idempotency-Key is taken: answer with the stored record.
                await cur.execute(_SELECT + " WHERE idempotency_key = %s", (records[i].idempotency_key,))
                row = await cur.fetchone()
                if row is None:  # pragma: no cover - a conflict implies the row exists
                    raise StoreUnavailable("The idempotency record vanished; retry the request.")
                outcomes[i] = _decision(row)
    return outcomes


class PostgresStore:
    def __init__(self, pool: psycopg_pool.AsyncConnectionPool, url: str, request_timeout: float) -> None:
        self._pool = pool
        self._request_timeout = request_timeout
        self._inserts = Coalescer(
            self._insert_group, max_items=MAX_GROUP, max_in_flight=MAX_COMMITTERS, error=_own_exception
        )
        self._reads = Coalescer(self._get_group, max_items=MAX_GROUP, max_in_flight=MAX_READERS, error=_own_exception)
        self.description = f"PostgreSQL at {mask_url(url)} (pool {pool.min_size}..{pool.max_size})"

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int,
        connect_timeout: float,
        request_timeout: float,
        application_name: str,
    ) -> PostgresStore:
        """Open the pool and wait, bounded, for its first connection; close it again on failure."""
        pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=request_timeout,
            # Verifies each connection before handing it out, so a connection broken
            # by a database restart is replaced instead of failing a request.
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            kwargs={
                # One INSERT is one transaction: autocommit saves a BEGIN/COMMIT round trip.
                "autocommit": True,
                "application_name": application_name,
                "connect_timeout": max(1, round(connect_timeout)),
                # Notice a peer that vanished without closing (a failover, a cut
                # network) within ~20 s even on an idle pooled connection.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 2,
            },
            name="decisions",
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except BaseException as exc:
            await pool.close(timeout=1.0)
            if isinstance(exc, psycopg_pool.PoolTimeout):
                raise StoreUnavailable(
                    f"PostgreSQL at {mask_url(url)} did not accept a connection within {connect_timeout:g} s."
                ) from None
            raise
        return cls(pool, url, request_timeout)

    async def _run(
        self, action: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], limit: float | None = None
    ) -> T:
        """Run `action` on a pooled connection; any outage, including a server that stops answering, is a 503."""
        # Bounds the whole call, not just the wait for a connection: a server that
        # accepts but never answers must not hold a request (or shutdown) forever.
        # The call runs as its own task because cancelling psycopg mid-query makes it
        # send the server a cancel request and wait for that too; we answer at the
        # deadline and let that clean-up finish in the background.
        task = asyncio.ensure_future(self._on_connection(action))
        try:
            return await asyncio.wait_for(asyncio.shield(task), limit or self._request_timeout * 2)
        except TimeoutError:
            abandon(task)
            metrics.count(metrics.store_errors)
            raise StoreUnavailable("The system of record did not answer in time.") from None
        except asyncio.CancelledError:
            abandon(task)
            raise
        except _PG_BUGS:
            raise
        except psycopg.Error as exc:  # connection lost, read-only after failover, admin shutdown...
            metrics.count(metrics.store_errors)
            raise StoreUnavailable(f"The system of record is unavailable: {type(exc).__name__}.") from exc

    async def _on_connection(self, action: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        async with self._pool.connection(timeout=self._request_timeout) as conn:
            return await action(conn)

    async def migrate(self) -> list[int]:
        async def apply(conn: psycopg.AsyncConnection[Any]) -> list[int]:
            async with conn.transaction():
                # Serialises concurrent migrators (several workers, the release phase);
                # released at COMMIT. Bounded, so a stuck migrator cannot stall start-up.
                await conn.execute(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT}'")
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_ID,))
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations"
                    " (version integer PRIMARY KEY, description text NOT NULL, checksum text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cur = await conn.execute("SELECT version, checksum FROM schema_migrations")
                applied = []
                for version, description, statements in _to_apply(dict(await cur.fetchall()), "postgres"):
                    for statement in statements:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, description, checksum) VALUES (%s, %s, %s)",
                        (version, description, _checksum(statements)),
                    )
                    applied.append(version)
                return applied

        return await self._run(apply, limit=MIGRATION_TIMEOUT)

    async def insert(self, record: Record) -> Existing | None:
        """Group commit: the record joins the next transaction; we answer after its COMMIT.

        Requests that arrive while a commit is in flight queue up and go in together
        in the next one, so under load one round trip and one fsync serve many
        decisions, and each request still returns only once its row is durable.
        """
        return await self._inserts.submit(record)

    async def _insert_group(self, records: list[Record]) -> list[Existing | None]:
        return await self._run(functools.partial(_insert_group, records=records))

    async def insert_many(self, records: Sequence[Record]) -> ExistingBatch | None:
        rows = [_row(r, "postgres") for r in records]

        if records[0].idempotency_key is None:
            # Nothing can conflict: one autocommit COPY, all rows or none.
            await self._run(functools.partial(_copy, rows=rows))
            return None

        async def insert_all(conn: psycopg.AsyncConnection[Any]) -> ExistingBatch | None:
            async with conn.transaction(), conn.cursor() as cur:
                # The first row carries the batch's idempotency key, if any: if it is
                # already taken, nothing is written and the stored batch is returned.
                await cur.execute(_PG_INSERT, rows[0])
                if cur.rowcount == 0:
                    await cur.execute(_SELECT + _BATCH_OF_KEY.format(p="%s"), (records[0].idempotency_key,))
                    return _existing_batch(await cur.fetchall())
                # The rest carry no key: COPY moves them several times faster than INSERTs.
                await _copy(conn, rows[1:])
                return None

        return await self._run(insert_all)

    async def get(self, decision_id: uuid.UUID) -> Decision | None:
        # Reads that arrive together share one query (and one pooled connection).
        return await self._reads.submit(decision_id)

    async def _get_group(self, ids: list[uuid.UUID]) -> list[Decision | None]:
        async def select(conn: psycopg.AsyncConnection[Any]) -> list[Decision | None]:
            cur = await conn.execute(_SELECT + " WHERE id = ANY(%s)", (ids,))
            found = {row[0]: _decision(row).decision for row in await cur.fetchall()}
            return [found.get(decision_id) for decision_id in ids]

        return await self._run(select)

    async def ping(self) -> None:
        async def ping(conn: psycopg.AsyncConnection[Any]) -> None:
            cur = await conn.execute("SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'")
            row = await cur.fetchone()
            # A standby (or a read-only database after a failover) answers, but cannot record.
            if row is None or row[0]:
                raise StoreUnavailable("The system of record is read-only.")

        await self._run(ping)

    async def close(self) -> None:
        await self._pool.close(timeout=5.0)

    @property
    def pool_size(self) -> int:
        return int(self._pool.max_size)

    async def capacity(self) -> tuple[int, int, int]:
        """The server's max_connections, how many of them are reserved for superusers, and how many are in use."""

        async def read(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int, int]:
            cur = await conn.execute(
                "SELECT current_setting('max_connections')::int,"
                " current_setting('superuser_reserved_connections')::int,"
                " (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int"
            )
            row = await cur.fetchone()
            assert row is not None
            return int(row[0]), int(row[1]), int(row[2])

        return await self._run(read)

    def observe_pool(self) -> None:
        stats = self._pool.get_stats()
        metrics.pool_size.set(stats["pool_size"])
        metrics.pool_in_use.set(stats["pool_size"] - stats["pool_available"])


# -- SQLite --------------------------------------------------------------------------

_SQLITE_INSERT = (
    f"INSERT INTO decisions ({', '.join(_NAMES)}) VALUES ({', '.join(['?'] * len(_NAMES))})"
    " ON CONFLICT (idempotency_key) DO NOTHING"
)


class SQLiteStore:
    """The embedded default: one connection, used only from one dedicated thread.

    sqlite3 calls block, so they run on that thread and the event loop only awaits
    them; the single thread also serialises writers, which SQLite wants anyway.
    """

    def __init__(self, path: Path, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._path = path
        self._executor = executor
        self._conn = conn
        self.description = f"SQLite at {path}"

    @classmethod
    async def open(cls, path: Path) -> SQLiteStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
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
        return cls(path, executor, conn)

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
            cur = conn.execute(_SQLITE_INSERT, _row(record, "sqlite"))
            if cur.rowcount == 1:
                return None
            row = conn.execute(_SELECT + " WHERE idempotency_key = ?", (record.idempotency_key,)).fetchone()
            return _decision(row)

        return await self._run(insert)

    async def insert_many(self, records: Sequence[Record]) -> ExistingBatch | None:
        rows = [_row(r, "sqlite") for r in records]

        def insert_all(conn: sqlite3.Connection) -> ExistingBatch | None:
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


async def open_store(settings: Any, application_name: str) -> Store:
    """The store the settings ask for: PostgreSQL when DATABASE_URL is set, else SQLite."""
    if settings.database_url:
        return await PostgresStore.open(
            settings.database_url,
            pool_size=settings.database_pool_size,
            connect_timeout=settings.database_connect_timeout,
            request_timeout=settings.database_request_timeout,
            application_name=application_name,
        )
    return await SQLiteStore.open(settings.sqlite_path)
