"""Store and cache, each back end through the same test functions, on real servers."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from service import dataset, storage
from service.cache import Cache, MemoryCache, RedisCache
from service.errors import StoreUnavailable
from service.models.registry import ScorecardModel
from service.schemas import Decision, encoder
from service.storage import PostgresStore, Record, SQLiteStore, Store, postgres, schema
from tests.conftest import redis_prefix, shipped_model

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["postgres", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "postgres":
        opened = await PostgresStore.open(
            request.getfixturevalue("postgres_url"),
            pool_size=2,
            connect_timeout=3,
            request_timeout=3,
            application_name="credit-scoring-test-store",
        )
    else:
        opened = await SQLiteStore.open(tmp_path / "store.sqlite3")
    await opened.migrate()
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(params=["redis", "memory"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[Cache]:
    opened: Cache
    if request.param == "redis":
        opened = RedisCache(
            request.getfixturevalue("redis_url"),
            timeout=1,
            prefix=redis_prefix(),
            ttl=60,
            client_name="credit-scoring-test-cache",
        )
    else:
        opened = MemoryCache(ttl=60)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="module")
def credit_model() -> ScorecardModel:
    return shipped_model()


def make_record(credit_model: ScorecardModel, index: int = 1, key: str | None = None) -> Record:
    applicant = dataset.load().applicants[index]
    decision = credit_model.decide(applicant, uuid.uuid4(), dt.datetime.now(dt.UTC))
    return Record(decision, applicant, key, "hash-" + str(index) if key else None)


# -- store ---------------------------------------------------------------------------------


async def test_store_round_trips_a_decision_exactly(store: Store, credit_model: ScorecardModel) -> None:
    record = make_record(credit_model)
    assert await store.insert(record) is None
    loaded = await store.get(record.decision.id)
    assert loaded == record.decision
    # Byte-identical JSON whether it comes from the cache or the store.
    assert encoder.encode(loaded) == encoder.encode(record.decision)


async def test_concurrent_reads_each_get_their_own_decision(store: Store, credit_model: ScorecardModel) -> None:
    """PostgreSQL answers reads that arrive together with one query; each still gets its own row, or None."""
    records = [make_record(credit_model, index) for index in range(30)]
    await asyncio.gather(*(store.insert(r) for r in records))
    ids = [r.decision.id for r in records] + [uuid.uuid4() for _ in range(5)] + [records[0].decision.id] * 3
    loaded = await asyncio.gather(*(store.get(i) for i in ids))
    expected = {r.decision.id: r.decision for r in records}
    assert loaded == [expected.get(i) for i in ids]


async def test_postgres_groups_without_keys_commit_on_threads_when_the_loop_is_slow_and_keyed_ones_on_the_pool(
    postgres_url: str, credit_model: ScorecardModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await PostgresStore.open(
        postgres_url, pool_size=10, connect_timeout=3, request_timeout=3, application_name="credit-scoring-test"
    )
    try:
        await store.migrate()
        # The threads' connections come out of DATABASE_POOL_SIZE, which the connection budget counts.
        assert store._commits is not None and (store._commits.size, store._pool.max_size, store.pool_size) == (4, 6, 10)
        await asyncio.to_thread(store._commits.pool.wait, 5.0)
        # Groups that did not wait long (a loop that keeps up) stay on the asynchronous pool.
        monkeypatch.setattr(postgres, "SLOW_LOOP", 60.0)
        records = [make_record(credit_model, index) for index in range(40)]
        assert await asyncio.gather(*(store.insert(r) for r in records)) == [None] * 40
        assert store._commits.pool.get_stats().get("requests_num", 0) == 0
        # Groups that waited longer go to the threads.
        monkeypatch.setattr(postgres, "SLOW_LOOP", 0.0)
        records += [make_record(credit_model, index) for index in range(40)]
        assert await asyncio.gather(*(store.insert(r) for r in records[40:])) == [None] * 40
        threaded = store._commits.pool.get_stats()["requests_num"]
        assert threaded >= 1
        loaded = await asyncio.gather(*(store.get(r.decision.id) for r in records))
        assert loaded == [r.decision for r in records]
        # Keyed records may conflict and answer with the stored one: their groups stay on the asynchronous pool.
        keyed = [make_record(credit_model, index, key=f"group-{uuid.uuid4()}") for index in range(20)]
        assert await asyncio.gather(*(store.insert(r) for r in keyed)) == [None] * 20
        again = await asyncio.gather(*(store.insert(r) for r in keyed))
        assert [a.decision if a else None for a in again] == [r.decision for r in keyed]
        assert store._commits.pool.get_stats()["requests_num"] == threaded
    finally:
        await store.close()
    one = await PostgresStore.open(
        postgres_url, pool_size=1, connect_timeout=3, request_timeout=3, application_name="credit-scoring-test"
    )
    await one.close()
    assert one._commits is None and one.pool_size == 1


async def test_store_get_unknown_is_none(store: Store) -> None:
    assert await store.get(uuid.uuid4()) is None


async def test_store_returns_existing_record_for_repeated_key(store: Store, credit_model: ScorecardModel) -> None:
    key = f"k-{uuid.uuid4()}"
    first = make_record(credit_model, 1, key)
    second = make_record(credit_model, 2, key)
    assert await store.insert(first) is None
    existing = await store.insert(second)
    assert existing is not None
    assert existing.decision == first.decision
    assert existing.request_hash == first.request_hash
    assert await store.get(second.decision.id) is None


async def test_store_insert_many_commits_all(store: Store, credit_model: ScorecardModel) -> None:
    records = [make_record(credit_model, i) for i in range(50)]
    await store.insert_many(records)
    for record in records:
        assert await store.get(record.decision.id) == record.decision


async def test_store_insert_many_is_all_or_nothing(store: Store, credit_model: ScorecardModel) -> None:
    committed = make_record(credit_model, 0)
    await store.insert_many([committed])
    batch = [make_record(credit_model, i) for i in range(1, 6)]
    # The last row reuses a committed id: the database refuses it after the others went in.
    clash = Record(msgspec.structs.replace(batch[-1].decision, id=committed.decision.id), batch[-1].applicant)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await store.insert_many([*batch[:-1], clash])
    for record in batch[:-1]:
        assert await store.get(record.decision.id) is None


async def test_store_keyed_insert_many_is_all_or_nothing(store: Store, credit_model: ScorecardModel) -> None:
    """A batch with an idempotency key: its key row and the rest commit together or not at all."""
    committed = make_record(credit_model, 0)
    await store.insert_many([committed])
    key = f"k-{uuid.uuid4()}"
    batch = [make_record(credit_model, 1, key), *(make_record(credit_model, i) for i in range(2, 6))]
    clash = Record(msgspec.structs.replace(batch[-1].decision, id=committed.decision.id), batch[-1].applicant)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await store.insert_many([*batch[:-1], clash])
    for record in batch[:-1]:
        assert await store.get(record.decision.id) is None
    # The key was not taken by the failed batch: the same key now records the whole batch.
    assert await store.insert_many(batch) is None
    for record in batch:
        assert await store.get(record.decision.id) == record.decision


async def test_store_ping_answers_and_refuses_a_database_that_cannot_record(
    store: Store, request: pytest.FixtureRequest
) -> None:
    assert await store.ping() is None
    if isinstance(store, PostgresStore):
        # A session that can read but not write, as on a standby after a failover.
        read_only = await PostgresStore.open(
            request.getfixturevalue("postgres_url") + "?options=-c%20default_transaction_read_only%3Don",
            pool_size=1,
            connect_timeout=3,
            request_timeout=3,
            application_name="credit-scoring-test-store",
        )
        try:
            with pytest.raises(StoreUnavailable, match="read-only"):
                await read_only.ping()
        finally:
            await read_only.close()


async def test_store_migration_is_idempotent(store: Store) -> None:
    assert await store.migrate() == []
    assert await store.migrate() == []


async def test_postgres_store_open_fails_fast_when_unreachable() -> None:
    import time

    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="did not accept a connection"):
        await PostgresStore.open(
            "postgresql://postgres:secret@127.0.0.1:1/nowhere",
            pool_size=2,
            connect_timeout=1,
            request_timeout=1,
            application_name="credit-scoring-test",
        )
    assert time.monotonic() - started < 3


async def test_postgres_store_error_hides_password() -> None:
    with pytest.raises(StoreUnavailable) as info:
        await PostgresStore.open(
            "postgresql://postgres:hunter2@127.0.0.1:1/nowhere",
            pool_size=1,
            connect_timeout=0.5,
            request_timeout=0.5,
            application_name="credit-scoring-test",
        )
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)


def test_migrations_are_append_only_and_numbered() -> None:
    versions = [version for version, _, _ in storage.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    for _, _, statements in storage.MIGRATIONS:
        assert set(statements) == {"postgres", "sqlite"}


# -- cache ---------------------------------------------------------------------------------


async def test_cache_returns_what_was_set(cache: Cache) -> None:
    decision_id = uuid.uuid4()
    assert await cache.get(decision_id) is None
    cache.set_many([(decision_id, b'{"id": 1}')])
    assert await cache.get(decision_id) == b'{"id": 1}'
    assert cache.hits == 1 and cache.misses == 1


async def test_cache_set_many_stores_each(cache: Cache) -> None:
    items = [(uuid.uuid4(), f"payload-{i}".encode()) for i in range(20)]
    cache.set_many(items)
    for decision_id, payload in items:
        assert await cache.get(decision_id) == payload


async def test_cache_ping_answers(cache: Cache) -> None:
    assert await cache.ping() is True


async def test_an_erased_decision_is_not_cached_again_by_a_write_that_raced_its_erasure(cache: Cache) -> None:
    """A GET that read the row just before the erasure writes its copy just after: the marker refuses it."""
    erased, other = uuid.uuid4(), uuid.uuid4()
    cache.set_many([(erased, b"with the reference")])
    await _flushed(cache)
    assert await cache.delete([erased])
    assert await cache.get(erased) is None
    cache.set_many([(erased, b"read before the erasure"), (other, b"another decision")])
    await _flushed(cache)
    assert await cache.get(erased) is None
    assert await cache.get(other) == b"another decision"


async def _flushed(cache: Cache) -> None:
    # Redis writes go out beside the response, a moment later.
    flusher = getattr(cache, "_flusher", None)
    if flusher is not None:
        await flusher


@pytest.mark.parametrize("kind", ["single", "batch", "group"])
async def test_a_decision_that_waited_too_long_to_be_written_is_refused(
    store: Store, credit_model: ScorecardModel, kind: str
) -> None:
    """Its time is taken before it queues: written late, it could land under a search page already served.

    A late group waited long, so on PostgreSQL it goes to a commit thread, which refuses it too."""
    applicant = dataset.load().applicants[2]
    made = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    late = [Record(credit_model.decide(applicant, uuid.uuid4(), made), applicant) for _ in range(4)]
    record = late[0]
    threads = store._commits if isinstance(store, PostgresStore) else None
    if threads is not None:
        await asyncio.to_thread(threads.pool.wait, 5.0)
    if kind == "group":  # the first alone, the rest as one group (on PostgreSQL, on a commit thread)
        refused = await asyncio.gather(*(store.insert(r) for r in late), return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) and "waited" in str(r) for r in refused), refused
        if threads is not None:
            assert threads.pool.get_stats()["requests_num"] == 1
    else:
        with pytest.raises(StoreUnavailable, match="waited"):
            if kind == "single":
                await store.insert(record)
            else:
                await store.insert_many([record])
    assert [await store.get(r.decision.id) for r in late] == [None] * 4


async def test_memory_cache_expires_and_evicts() -> None:
    cache = MemoryCache(ttl=60, max_entries=3)
    ids = [uuid.uuid4() for _ in range(4)]
    cache.set_many([(i, b"x") for i in ids])
    assert await cache.get(ids[0]) is None  # least recently used, evicted
    assert await cache.get(ids[3]) == b"x"
    expired = MemoryCache(ttl=0)
    expired.set_many([(ids[0], b"x")])
    assert await expired.get(ids[0]) is None


async def test_redis_cache_down_is_skipped_then_probed(caplog: pytest.LogCaptureFixture) -> None:
    cache = RedisCache("redis://127.0.0.1:1/0", timeout=0.2, prefix="", ttl=60, client_name="credit-scoring-test")
    try:
        decision_id = uuid.uuid4()
        assert await cache.get(decision_id) is None
        assert cache.errors == 1
        # Backing off: the next calls do not touch the dead server at all.
        for _ in range(5):
            assert await cache.get(decision_id) is None
            cache.set_many([(decision_id, b"x")])
        assert cache.errors == 1
        warnings = [r for r in caplog.records if "Redis cache unavailable" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        await cache.close()


async def test_decision_json_round_trips_through_msgspec(credit_model: ScorecardModel) -> None:
    record = make_record(credit_model)
    assert msgspec.json.decode(encoder.encode(record.decision), type=Decision) == record.decision


async def test_store_refuses_a_migration_edited_after_it_was_applied(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    version, description, statements = schema.MIGRATIONS[0]
    edited = {dialect: [*sql, "SELECT 1"] for dialect, sql in statements.items()}
    # Patched where the stores read it (service/storage/schema.py), not the package's re-export.
    monkeypatch.setattr(schema, "MIGRATIONS", [(version, description, edited), *schema.MIGRATIONS[1:]])
    with pytest.raises(storage.SchemaError, match="was changed after this database applied it"):
        await store.migrate()


async def _written(cache: Cache) -> None:
    """Wait until the queued writes are in Redis (the in-process cache has no queue)."""
    flusher = getattr(cache, "_flusher", None)
    if flusher is not None:
        await asyncio.wait_for(asyncio.shield(flusher), 5)


async def test_concurrent_cache_reads_each_get_their_own_answer(cache: Cache) -> None:
    """Reads that share a round trip (MGET, for Redis) still each get their own value, or None."""
    stored = [(uuid.uuid4(), f"payload-{i}".encode()) for i in range(50)]
    cache.set_many(stored)
    await _written(cache)  # reads must really go to Redis
    missing = [uuid.uuid4() for _ in range(10)]
    ids = [decision_id for decision_id, _ in stored] + missing + [stored[0][0]] * 5  # repeats, too
    answers = await asyncio.gather(*(cache.get(i) for i in ids))
    expected = dict(stored)
    assert answers == [expected.get(i) for i in ids]
    assert (cache.hits, cache.misses) == (55, 10)


async def test_a_cancelled_redis_read_leaves_the_others_answered(redis_url: str) -> None:
    cache = RedisCache(redis_url, timeout=1, prefix=redis_prefix(), ttl=60, client_name="credit-scoring-test-cache")
    try:
        stored = [(uuid.uuid4(), f"payload-{i}".encode()) for i in range(5)]
        cache.set_many(stored)
        await _written(cache)
        reads = [asyncio.ensure_future(cache.get(i)) for i, _ in stored]
        await asyncio.sleep(0)  # all five are waiting on one MGET
        reads[2].cancel()
        answers = await asyncio.gather(*reads, return_exceptions=True)
        assert isinstance(answers[2], asyncio.CancelledError)
        assert [a for k, a in enumerate(answers) if k != 2] == [p for k, (_, p) in enumerate(stored) if k != 2]
    finally:
        await cache.close()


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
async def test_migration_4_keeps_every_decision_and_outcome_of_an_older_database(
    dialect: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made before references and erasure: its rows survive the upgrade (SQLite's table rebuild too)."""
    from psycopg.types.json import Jsonb

    from service.reasons import reason
    from service.schemas import OutcomeRequest
    from service.storage.base import _row

    async def opened() -> Store:
        if dialect == "postgres":
            url = request.getfixturevalue("own_postgres_url")
            return await PostgresStore.open(
                url, pool_size=2, connect_timeout=3, request_timeout=5, application_name="credit-scoring-test-v4"
            )
        return await SQLiteStore.open(tmp_path / "old.sqlite3")

    credit_model = shipped_model()
    record = make_record(credit_model, 3)
    columns = ", ".join(name for name, _ in schema._COLUMNS_V1)
    old = await opened()
    try:
        with monkeypatch.context() as patch:
            patch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:3])
            assert await old.migrate() == [1, 2, 3]
        values = list(_row(record, dialect)[: len(schema._COLUMNS_V1)])  # the row as version 3 wrote it
        # Reasons as version 3 stored them: no codes, and `age` among them.
        names = [name for name, _ in schema._COLUMNS_V1]
        old_reasons = [{"feature": "age", "contribution": 0.5}, {"feature": "duration_months", "contribution": 0.25}]
        reasons = json.dumps(old_reasons)
        values[names.index("reasons")] = reasons if dialect == "sqlite" else Jsonb(old_reasons)
        marks = ", ".join(["%s" if dialect == "postgres" else "?"] * len(values))
        sql = f"INSERT INTO decisions ({columns}) VALUES ({marks})"
        await old._run(lambda conn: conn.execute(sql, values))  # type: ignore[attr-defined]
        outcome = OutcomeRequest(defaulted=True, observed_at=record.decision.created_at + dt.timedelta(days=30))
        assert (await old.record_outcome(record.decision.id, outcome, "ops"))[0] == "created"
    finally:
        await old.close()

    upgraded = await opened()
    try:
        assert await upgraded.migrate() == [4]
        upgraded_decision = await upgraded.get(record.decision.id)
        # Read back with codes, and without `age`, which is never given as a reason.
        assert upgraded_decision == msgspec.structs.replace(record.decision, reasons=[reason("duration_months", 0.25)])
        audited = await upgraded.audited(record.decision.id)
        assert audited is not None and audited.erasure is None and audited.key_id is None
        assert audited.applicant is not None and audited.applicant["age"] == record.applicant.age
        assert (await upgraded.record_outcome(record.decision.id, outcome, "ops"))[0] == "same"
        assert len(await upgraded.cursor_secret()) >= 30
    finally:
        await upgraded.close()
