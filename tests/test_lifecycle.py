"""Start-up and shutdown: order, logs, failure handling, and no connection left on either server."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import time
from pathlib import Path

import pytest
from starlette.datastructures import State
from starlette.testclient import TestClient

from service.app import create_app
from service.lifecycle import CLOSED, CLOSING, STARTED, STARTING, StartupError, Step, default_steps
from service.settings import Settings
from tests.conftest import postgres_connections, redis_clients, redis_prefix, wait_until

APP_NAME = f"credit-scoring-{os.getpid()}"


def lifecycle_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "service.lifecycle"]


def served_settings(postgres_url: str, redis_url: str, **changes: object) -> Settings:
    base = Settings(database_url=postgres_url, redis_url=redis_url, redis_key_prefix=redis_prefix(), cache_ttl=600)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_startup_and_shutdown_run_steps_in_order_and_log_each(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(create_app(settings)):
        pass
    lines = lifecycle_lines(caplog)
    steps = [
        "settings",
        "store",
        "migrations",
        "cache",
        "budget",
        "metrics",
        "models",
        "challenger",
        "watcher",
        "gauges",
        "signals",
    ]
    assert lines[0] == STARTING
    started = [re.match(r"Startup step '(\w+)': .* in [\d.]+ ms$", line) for line in lines[1 : 1 + len(steps)]]
    assert [m.group(1) for m in started if m] == steps
    rest = lines[1 + len(steps) :]
    assert rest[0] == STARTED
    assert rest[1] == CLOSING
    stopped = [re.match(r"Shutdown step '(\w+)': (.*) in [\d.]+ ms$", line) for line in rest[2:10]]
    assert [m.group(1) for m in stopped if m] == [
        "signals",
        "gauges",
        "watcher",
        "challenger",
        "models",
        "metrics",
        "cache",
        "store",
    ]
    assert all(m.group(2).startswith("closed") for m in stopped[6:] if m)
    assert rest[10:] == [CLOSED]


def test_startup_puts_model_store_cache_on_app_state(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        state = client.app.state  # type: ignore[attr-defined]
        assert state.settings is settings
        for name in ("models", "store", "cache", "challenger_queue"):
            assert getattr(state, name) is not None


def test_shutdown_closes_postgres_pool_and_redis_client(postgres_url: str, redis_url: str, applicant: dict) -> None:
    with TestClient(create_app(served_settings(postgres_url, redis_url))) as client:
        assert client.post("/decisions", json=applicant).status_code == 201
        assert postgres_connections(postgres_url, APP_NAME) >= 1
        assert redis_clients(APP_NAME) >= 1
    assert wait_until(lambda: postgres_connections(postgres_url, APP_NAME) == 0)
    assert wait_until(lambda: redis_clients(APP_NAME) == 0)


def test_missing_model_fails_startup_and_closes_pool_and_redis(
    postgres_url: str, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = served_settings(postgres_url, redis_url, model_dir=tmp_path / "missing")
    seen: dict[str, int] = {}

    async def count_open_connections(state: State) -> str:
        # What the earlier steps opened, seen from the servers just before the model step fails.
        seen["postgres"] = await asyncio.to_thread(postgres_connections, postgres_url, APP_NAME)
        seen["redis"] = await asyncio.to_thread(redis_clients, APP_NAME)
        return "counted"

    steps = default_steps(settings)
    steps.insert([s.name for s in steps].index("models"), Step("probe", count_open_connections))
    with (
        pytest.raises(StartupError, match=r"step 'models'.*does not exist; set MODEL_DIR or run `make train`"),
        TestClient(create_app(steps=steps)),
    ):
        pass
    assert seen["postgres"] >= 1 and seen["redis"] >= 1
    assert wait_until(lambda: postgres_connections(postgres_url, APP_NAME) == 0)
    assert wait_until(lambda: redis_clients(APP_NAME) == 0)
    lines = lifecycle_lines(caplog)
    assert any(line.startswith("Startup step 'models' failed") for line in lines)
    assert [line.split("'")[1] for line in lines if line.startswith("Shutdown step")] == ["metrics", "cache", "store"]
    assert STARTED not in lines


def test_unreachable_database_fails_startup_fast(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(database_url="postgresql://postgres:hunter2@127.0.0.1:1/credit", database_connect_timeout=1.0)
    started = time.monotonic()
    with (
        pytest.raises(StartupError, match=r"step 'store'.*did not accept a connection within 1 s"),
        TestClient(create_app(settings)),
    ):
        pass
    assert time.monotonic() - started < 4
    assert "hunter2" not in caplog.text
    assert "postgresql://postgres:***@127.0.0.1:1/credit" in caplog.text


@pytest.mark.parametrize(
    ("name", "value"), [("SHUTDOWN_TIMEOUT", "-1"), ("LOG_FORMAT", "xml"), ("DATABASE_URL", "mysql://x/y")]
)
def test_bad_configuration_stops_startup_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(StartupError, match=f"step 'settings': {name} "), TestClient(create_app()):
        pass
    failure = [r for r in caplog.records if "Startup step 'settings' failed" in r.getMessage()]
    assert len(failure) == 1 and name in failure[0].getMessage()


def test_redis_unreachable_at_startup_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, applicant: dict
) -> None:
    settings = Settings(sqlite_path=tmp_path / "d.sqlite3", redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2)
    with TestClient(create_app(settings)) as client:
        assert client.post("/decisions", json=applicant).status_code == 201
        ready = client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"]["cache"] == "unavailable"
    assert "Redis cache unavailable" in caplog.text
    assert "does not answer yet" in caplog.text


def test_hung_shutdown_step_is_abandoned_and_the_rest_still_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def nothing(state: State) -> str:
        return "opened nothing"

    async def hang(state: State) -> str:
        await asyncio.sleep(3600)
        return "never"

    steps = [
        *default_steps(Settings(sqlite_path=tmp_path / "d.sqlite3")),
        Step("hang", nothing, hang, stop_timeout=0.2),
    ]
    started = time.monotonic()
    with TestClient(create_app(steps=steps)):
        pass
    assert time.monotonic() - started < 5
    lines = lifecycle_lines(caplog)
    assert "Shutdown step 'hang' did not finish within 0.2 s; abandoned it" in lines
    assert any(line.startswith("Shutdown step 'store': closed") for line in lines)
    assert lines[-1] == CLOSED


def test_shutdown_budget_bounds_all_steps(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def nothing(state: State) -> str:
        return "opened nothing"

    async def slow(state: State) -> str:
        await asyncio.sleep(3600)
        return "never"

    settings = Settings(sqlite_path=tmp_path / "d.sqlite3", shutdown_timeout=0.5)
    steps = [
        *default_steps(settings),
        Step("a", nothing, slow, stop_timeout=10),
        Step("b", nothing, slow, stop_timeout=10),
    ]
    started = time.monotonic()
    with TestClient(create_app(steps=steps)):
        pass
    assert time.monotonic() - started < 2.5
    assert "Shutdown step 'a' did not finish" in caplog.text


def test_connection_budget_is_logged(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with TestClient(create_app(dataclasses.replace(settings, web_concurrency=3))):
        pass
    line = next(line for line in lifecycle_lines(caplog) if line.startswith("Startup step 'budget'"))
    if settings.database_url:
        # Each worker's pool, and its session that LISTENs for model assignment changes.
        size = settings.database_pool_size
        assert f"PostgreSQL 3 x ({size} + 1 listening) = {3 * (size + 1)} of " in line
        assert "Redis 3 x 10 = 30 of " in line
    else:
        assert "no network connections" in line


def test_connection_budget_over_max_connections_refuses_to_start(
    postgres_url: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = served_settings(postgres_url, redis_url, web_concurrency=200, database_pool_size=50)
    with (
        pytest.raises(StartupError, match=r"WEB_CONCURRENCY=200 workers x \(DATABASE_POOL_SIZE=50 \+ 1\) = 10200"),
        TestClient(create_app(settings)),
    ):
        pass
    assert wait_until(lambda: postgres_connections(postgres_url, APP_NAME) == 0)
    assert wait_until(lambda: redis_clients(APP_NAME) == 0)
