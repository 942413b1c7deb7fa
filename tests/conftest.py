"""Fixtures: a private PostgreSQL database and Redis key prefix per test run, and apps on both back ends.

The servers are real (the machine's PostgreSQL and Redis). Outside CI a missing
server skips the tests that need it, with the reason; in CI (CI=true or
REQUIRE_SERVICES=1) it fails them, so a green CI run always means they ran.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import psycopg
import pytest
import redis
from psycopg import sql
from starlette.testclient import TestClient

from service import dataset
from service.app import create_app
from service.models.registry import Registry, ScorecardModel, load_scorecard
from service.settings import DEFAULT_MODEL_DIR, Settings
from tests.procfile import service_environment

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("CI", "").lower() == "true" or os.environ.get("REQUIRE_SERVICES") == "1"
RUN_ID = uuid.uuid4().hex[:10]


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({exc}); start it, or point TEST_DATABASE_URL / TEST_REDIS_URL at one."
    if REQUIRE_SERVICES:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def database_url(dbname: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{dbname}"))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this run's own, dropped at the end."""
    dbname = f"credit_test_{RUN_ID}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
        raise
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        try:
            yield database_url(dbname)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


@pytest.fixture
def own_postgres_url(postgres_url: str) -> Iterator[str]:
    """A database of this test's own, for tests that change the model assignment (every app on a database shares it)."""
    dbname = f"credit_test_{RUN_ID}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        try:
            yield database_url(dbname)
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        _unavailable("Redis", exc)
        raise
    try:
        yield REDIS_URL
    finally:
        keys = list(client.scan_iter(match=f"{redis_prefix()}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def redis_prefix() -> str:
    """Every key this run writes starts with it, so runs never see each other's entries."""
    return f"test-{RUN_ID}:"


@pytest.fixture(params=["postgres+redis", "sqlite+memory"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The service's settings on each pair of back ends; tests using it run once per pair."""
    if request.param == "postgres+redis":
        return Settings(
            database_url=request.getfixturevalue("postgres_url"),
            redis_url=request.getfixturevalue("redis_url"),
            redis_key_prefix=redis_prefix(),
            # Short-lived, so a run that dies before its clean-up leaves nothing for long.
            cache_ttl=600,
        )
    return Settings(sqlite_path=tmp_path / "decisions.sqlite3")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture(scope="session")
def applicants() -> list[dict[str, Any]]:
    """The data set's applicants as API request bodies."""
    return [msgspec.to_builtins(a) for a in dataset.load().applicants]


@pytest.fixture
def applicant(applicants: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(applicants[1])


def count_rows(settings: Settings, where: str = "TRUE", params: tuple[Any, ...] = ()) -> int:
    """Rows in the system of record, read over a connection of the test's own."""
    if settings.database_url:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            row = conn.execute(f"SELECT count(*) FROM decisions WHERE {where}", params).fetchone()  # type: ignore[arg-type]
            assert row is not None
            return int(row[0])
    import sqlite3

    with sqlite3.connect(settings.sqlite_path) as conn:
        return int(
            conn.execute(f"SELECT count(*) FROM decisions WHERE {where.replace('%s', '?')}", params).fetchone()[0]
        )


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll: servers notice a closed connection a moment after the client closes it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def postgres_connections(dbname_url: str, application_name: str | None = None) -> int:
    """Server-side count of connections to the run's database (from pg_stat_activity)."""
    dbname = urlsplit(dbname_url).path.lstrip("/")
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
        params: tuple[Any, ...] = (dbname,)
        if application_name is not None:
            query += " AND application_name = %s"
            params += (application_name,)
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
        assert row is not None
        return int(row[0])


def redis_clients(name: str) -> int:
    """Server-side count of Redis connections with this client name (from CLIENT LIST)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return sum(1 for c in client.client_list() if c.get("name") == name)
    finally:
        client.close()


@pytest.fixture
def service_env(postgres_url: str, redis_url: str) -> dict[str, str]:
    """The environment for a service process started from the Procfile, on this run's database and prefix."""
    return service_environment(postgres_url, redis_url, REDIS_KEY_PREFIX=redis_prefix(), SHUTDOWN_TIMEOUT="10")


# -- models ----------------------------------------------------------------------------------

# The version shipped in artifacts/models.
SHIPPED_VERSION = "german-credit-lr-2026.11.28"


def shipped_model() -> ScorecardModel:
    return load_scorecard(Registry(DEFAULT_MODEL_DIR).get(SHIPPED_VERSION), None)


@dataclass(frozen=True)
class Versions:
    """A registry of the run's own: the shipped version, a second logistic one, a boosting one."""

    root: Path
    shipped: str
    logistic: str
    boosting: str


@pytest.fixture(scope="session")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    from service import training

    root = tmp_path_factory.mktemp("registry")
    shutil.copytree(DEFAULT_MODEL_DIR / SHIPPED_VERSION, root / SHIPPED_VERSION)
    boosting = training.train(root, "test-gb-1", "boosting").version
    logistic = training.train(root, "test-lr-2", "logistic").version
    return Versions(root, SHIPPED_VERSION, logistic, boosting)


def corrupt_copy(versions: Versions, source: str, name: str, file: str = "scorecard.json") -> str:
    """A copy of a version under a new name (its metadata renamed to match) with one file damaged."""
    folder = versions.root / name
    if not folder.exists():
        shutil.copytree(versions.root / source, folder)
        meta = json.loads((folder / "metadata.json").read_text())
        meta["version"] = name
        (folder / "metadata.json").write_text(json.dumps(meta))
        with (folder / file).open("ab") as handle:
            handle.write(b" ")
    return name
