"""The PostgreSQL store: a psycopg pool, group commits and grouped reads, binary COPY.

This is the production back end. Inserts that arrive together share one
transaction (one round trip, one WAL flush) through a Coalescer, records without
an Idempotency-Key go in by binary COPY, and every call is bounded so that a
server that stops answering is a 503 (StoreUnavailable) rather than a hung
request. Migrations take an advisory lock, so several workers and the release
phase can start at once. Rows and the schema come from base.py and schema.py.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
import psycopg_pool

from service import metrics
from service.coalesce import Coalescer
from service.errors import StoreUnavailable
from service.schemas import Decision
from service.settings import mask_url
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
    waited,
)
from service.storage.outage import Outage, idle_too_long, mark_used
from service.storage.postgres_audit import PostgresAudit
from service.storage.postgres_models import PostgresModelRecords
from service.storage.postgres_monitoring import PostgresMonitoring
from service.storage.postgres_threads import CommitThreads
from service.storage.schema import _COLUMNS, _NAMES, _PG_TYPES, _SPECIAL, MIGRATION_LOCK_ID, _checksum, _to_apply
from service.tasks import within

T = TypeVar("T")

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
# for its WAL flush, the next is already on its way. Groups without idempotency keys
# (nearly all under load) commit on as many threads of their own (postgres_threads.py),
# whose connections come out of DATABASE_POOL_SIZE: up to half of it, the rest for the asynchronous pool.
MAX_COMMITTERS = 4
# Grouped reads in flight at once, each on its own connection.
MAX_READERS = 4
# A group whose oldest decision has waited longer than this to be written says the event loop's passes are long
# (a storm of clients), and commits on a thread, which needs no pass of it. On a loop that keeps up, a thread costs
# more than it saves: at saturation (64 connections, no refusals) every group on a thread cost 10-20 % of the
# throughput (the threads wait for the interpreter lock the busy loop holds). Waits measured, p10/p50/p90 ms:
# saturated 0.1/2.1/3.0, 1,000 req/s 0.1/0.2/0.4, 1,000 connections 3.2/10.6/20.6.
SLOW_LOOP = 0.005


def _own_exception(exc: Exception) -> Exception:
    """What each request of a failed group raises: a 503 of its own, or the bug as it is (shared: rare, and a 500)."""
    return StoreUnavailable(exc.detail) if isinstance(exc, StoreUnavailable) else exc


async def _copy(conn: psycopg.AsyncConnection[Any], rows: Sequence[tuple[Any, ...]]) -> None:
    async with conn.cursor() as cur, cur.copy(_PG_COPY) as copy:
        copy.set_types(_PG_COPY_TYPES)
        for row in rows:
            await copy.write_row(row)


async def _insert_group(
    conn: psycopg.AsyncConnection[Any], *, records: Sequence[Record], late: float
) -> list[Existing | None]:
    """Insert the records in one transaction; for each, None, or the record already under its key."""
    refuse_late(records, late)
    if len(records) == 1:
        # A request that did not have to wait for others (the common case below
        # saturation): one INSERT, one round trip, autocommitted.
        return [await _insert_one(conn, records[0])]
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


async def _check_writable(conn: psycopg.AsyncConnection[Any]) -> None:
    cur = await conn.execute("SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'")
    row = await cur.fetchone()
    # A standby (or a read-only database after a failover) answers, but cannot record.
    if row is None or row[0]:
        raise StoreUnavailable("The system of record is read-only.")


async def _insert_one(conn: psycopg.AsyncConnection[Any], record: Record) -> Existing | None:
    """One record in one statement; the record already under its key, if it is taken."""
    if record.idempotency_key is None:
        await conn.execute(_PG_INSERT, _row(record, "postgres"))
        return None
    cur = await conn.execute(_PG_INSERT + " RETURNING id", _row(record, "postgres"))
    if await cur.fetchone() is not None:
        return None
    cur = await conn.execute(_SELECT + " WHERE idempotency_key = %s", (record.idempotency_key,))
    row = await cur.fetchone()
    if row is None:  # pragma: no cover - a conflict implies the row exists
        raise StoreUnavailable("The idempotency record vanished; retry the request.")
    return _decision(row)


async def _check_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    if idle_too_long(conn):
        await psycopg_pool.AsyncConnectionPool.check_connection(conn)


class _Failures:
    """What PostgresStore._failures gives: a class, not a @contextmanager, whose generator costs more on every
    call to the database (1.02 against 0.25 µs warm, 30.7 against 20.2 µs alone after a 10 ms sleep)."""

    __slots__ = ("_outage", "_outage_on_timeout")

    def __init__(self, outage: Outage, outage_on_timeout: bool) -> None:
        self._outage = outage
        self._outage_on_timeout = outage_on_timeout

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: object) -> None:
        if kind is None or not issubclass(kind, (TimeoutError, psycopg.Error)) or issubclass(kind, _PG_BUGS):
            return  # success, our own bugs, cancellation: as they are
        metrics.count(metrics.store_errors)
        if issubclass(kind, TimeoutError):
            if self._outage_on_timeout:
                self._outage.began("it did not answer in time")
            raise StoreUnavailable("The system of record did not answer in time.") from None
        # Connection lost, read-only after failover, admin shutdown...
        self._outage.began(kind.__name__)
        raise StoreUnavailable(f"The system of record is unavailable: {kind.__name__}.") from exc


class PostgresStore(PostgresModelRecords, PostgresMonitoring, PostgresAudit):
    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool,
        url: str,
        request_timeout: float,
        connection_kwargs: dict[str, Any] | None = None,
        direct_url: str | None = None,
        commits: CommitThreads | None = None,
    ) -> None:
        self._pool = pool
        self._commits = commits
        self._outage = Outage(self._probe)
        # The probe's own connection during an outage: to where the pool connects, opened like a pooled one.
        self._probe_url = url
        self._probe_kwargs = dict(connection_kwargs or {"autocommit": True})
        # The session that LISTENs for assignment changes is opened like a pooled one, to PostgreSQL itself
        # when the pool goes through a transaction pooler (a LISTEN needs a session of its own).
        self._url = direct_url or url
        self._listen_kwargs = {
            k: v for k, v in (connection_kwargs or {"autocommit": True}).items() if k != "prepare_threshold"
        }
        self.through_pooler = direct_url is not None
        self._request_timeout = request_timeout
        self._inserts = Coalescer(
            self._insert_group, max_items=MAX_GROUP, max_in_flight=MAX_COMMITTERS, error=_own_exception
        )
        self._reads = Coalescer(self._get_group, max_items=MAX_GROUP, max_in_flight=MAX_READERS, error=_own_exception)
        self.description = f"PostgreSQL at {mask_url(url)} ({pool.max_size} pooled connections"
        self.description += f", {commits.size} for commit threads)" if commits is not None else ")"
        if direct_url is not None:
            self.description += f" through a transaction pooler; listening at {mask_url(direct_url)}"

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int,
        connect_timeout: float,
        request_timeout: float,
        application_name: str,
        direct_url: str | None = None,
    ) -> PostgresStore:
        """Open the pool and wait, bounded, for its first connection; close it again on failure.

        With `direct_url`, `url` is a transaction pooler (PgBouncer): a pooled connection is then a
        different server session from one transaction to the next, so it prepares no statements
        (psycopg would otherwise prepare a statement after its fifth run and find it gone on the next
        server session), and the LISTEN session goes to `direct_url`.
        """
        kwargs: dict[str, Any] = {
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
        }
        if direct_url is not None:
            kwargs["prepare_threshold"] = None
        threads = min(MAX_COMMITTERS, pool_size // 2)
        pool = psycopg_pool.AsyncConnectionPool(
            url,
            # Opened with one connection, then held at a fixed size (below): a pool that grows on demand can
            # try to grow while the database is frozen, and psycopg_pool then waits 1, 2, 4 s... between
            # attempts, so once the database answered again requests found no connection for seconds (back
            # after 2.5-5.5 s in 3 of 9 frozen outages measured; 0.39-0.41 s in 12 of 12 with a fixed size).
            min_size=1,
            max_size=pool_size - threads,
            open=False,
            timeout=request_timeout,
            # Verifies a connection idle for a while before handing it out, so a
            # connection broken by a database restart is replaced instead of failing a request.
            check=_check_if_idle,
            kwargs=kwargs,
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
        # The rest fill in the background: start-up does not wait for every connection, so a budget that does not
        # fit fails at its own step with its own message rather than here as a connection timeout.
        await pool.resize(pool.max_size, pool.max_size)
        commits = CommitThreads(url, kwargs, threads, _PG_COPY, _PG_COPY_TYPES) if threads else None
        if commits is not None:
            commits.open()
        return cls(pool, url, request_timeout, kwargs, direct_url, commits)

    async def _run(
        self, action: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], limit: float | None = None
    ) -> T:
        """Run `action` on a pooled connection; any outage, including a server that stops answering, is a 503."""
        # Bounds the whole call, not just the wait for a connection: a server that
        # accepts but never answers must not hold a request (or shutdown) forever.
        # The call runs as its own task (`within`): we answer at the deadline and let
        # psycopg's clean-up (a cancel request it waits for) finish in the background.
        # Once a call has seen the database fail, the next ones answer at once while a probe asks it.
        self._outage.check()
        with self._failures(outage_on_timeout=limit is None):  # a request's bound, not an analyst's long query
            return await within(limit or self._request_timeout * 2, self._on_connection(action))

    def _failures(self, *, outage_on_timeout: bool = True) -> _Failures:
        """A database failure as a 503 (StoreUnavailable) that starts an outage; our own bugs as they are."""
        return _Failures(self._outage, outage_on_timeout)

    async def _probe(self) -> None:
        """Whether the database is back: a connection of the probe's own says the database can record, then every
        idle pooled connection is checked (the broken ones replaced).

        The pool's connections are left alone until the database answers: `pool.check()` takes every idle
        connection out at once and checks them in turn, so a probe cut at its bound while a frozen network
        swallows the check would keep them from requests for seconds after the database is back (psycopg
        waits 5 s for the cancel request it sends, and 5 s more).
        """
        conn = await psycopg.AsyncConnection.connect(self._probe_url, **self._probe_kwargs)
        try:
            await _check_writable(conn)
        finally:
            await conn.close()
        await self._pool.check()
        if self._commits is not None:
            await self._commits.check()

    async def _on_connection(self, action: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        # getconn/putconn rather than pool.connection(): that one also enters the connection as a context
        # (commit or rollback on leaving, no-ops on an autocommit connection) through two context managers,
        # which cost ~75 µs of an idle request's p50. putconn still rolls back and discards what it must.
        conn = await self._pool.getconn(timeout=self._request_timeout)
        try:
            result = await action(conn)
            mark_used(conn)
            return result
        finally:
            await self._pool.putconn(conn)

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
        commits = self._commits
        if (
            commits is not None
            and len(records) > 1
            and all(r.idempotency_key is None for r in records)
            and waited(records) > SLOW_LOOP
            and commits.ready()
        ):
            # Nothing can conflict, so nothing to answer but "committed", and the loop is slow: commit on a thread.
            # The asynchronous path below takes it instead while the threads' pool has no free connection.
            self._outage.check()
            with self._failures():
                await commits.copy(records, self._request_timeout * 2, late=self._request_timeout)
            return [None] * len(records)
        return await self._run(functools.partial(_insert_group, records=records, late=self._request_timeout))

    async def insert_many(self, records: Sequence[Record]) -> ExistingBatch | None:
        rows = [_row(r, "postgres") for r in records]

        async def insert_all(conn: psycopg.AsyncConnection[Any]) -> ExistingBatch | None:
            refuse_late(records[:1], self._request_timeout)  # a batch's decisions share one time
            if records[0].idempotency_key is None:
                # Nothing can conflict: one autocommit COPY, all rows or none.
                await _copy(conn, rows)
                return None
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
        await self._run(_check_writable)

    async def close(self) -> None:
        await self._outage.close()
        closing = [self._pool.close(timeout=5.0)]
        if self._commits is not None:
            closing.append(self._commits.close(5.0))
        await asyncio.gather(*closing)  # both within the one bound

    @property
    def pool_size(self) -> int:
        """Connections each worker may open for requests: the asynchronous pool's and the commit threads'."""
        return int(self._pool.max_size) + (self._commits.size if self._commits is not None else 0)

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
        size = in_use = 0
        for pool in (self._pool, self._commits.pool) if self._commits is not None else (self._pool,):
            stats = pool.get_stats()
            size += stats["pool_size"]
            in_use += stats["pool_size"] - stats["pool_available"]
        metrics.pool_size.set(size)
        metrics.pool_in_use.set(in_use)
