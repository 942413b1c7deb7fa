"""The lifecycle under fire: uvicorn from the Procfile, 32 clients, and servers that come and go.

Every scenario ends the same way: connections left on each server are counted
from the server side once the service has exited, and every decision the service
said it committed is read back through a freshly started service with an empty
cache. Lost decisions, 5xx other than 503, and leaked connections must all be 0.
The short version runs in CI; `make chaos` runs the long one (CHAOS=long).
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.conftest import LONG, ROWS, SHUTDOWN_TIMEOUT, Row
from tests.chaos.load import Load, LoadResult, read_all
from tests.chaos.servers import PrivatePostgres, PrivateRedis
from tests.conftest import wait_until
from tests.procfile import STOPPED, Service

pytestmark = pytest.mark.chaos

CLIENTS = 32
LOAD_SECONDS = 10.0 if LONG else 2.0
CYCLES = 10
CYCLE_LOAD_SECONDS = 3.0 if LONG else 0.8
CLEAN_EXIT = STOPPED

Servers = tuple[PrivatePostgres, PrivateRedis]


def start(services: list[Service], env: dict[str, str], tmp_path: Path) -> Service:
    service = Service(env, tmp_path / f"service-{len(services)}.log")
    services.append(service)
    service.wait_ready()
    return service


def record(row: Row, result: LoadResult) -> None:
    row.answered_201 += result.statuses[201]
    row.replays_200 += result.statuses[200]
    row.answered_503 += result.statuses[503]
    row.unexpected_5xx += result.unexpected_5xx
    row.refused += result.refused
    row.dropped += result.dropped
    row.unanswered_keys += result.unanswered


def count_leftovers(row: Row, servers: Servers) -> None:
    pg, redis_server = servers
    wait_until(lambda: pg.connections() == 0, timeout=10)
    row.pg_left = max(row.pg_left, pg.connections())
    wait_until(lambda: redis_server.clients() == 0, timeout=10)
    row.redis_left = max(row.redis_left, redis_server.clients())


def count_lost(row: Row, committed: list[str], services: list[Service], env: dict[str, str], tmp_path: Path) -> None:
    """Read every committed decision back through a new service whose cache is empty."""
    fresh = start(services, {**env, "REDIS_KEY_PREFIX": f"verify-{uuid.uuid4().hex[:8]}:"}, tmp_path)
    statuses = read_all(fresh.url, committed)
    row.lost = len(committed) - statuses[200]
    code, _ = fresh.stop(signal.SIGTERM)
    assert code in CLEAN_EXIT


def check(row: Row, service_logs: list[str], servers: Servers, *, in_flight_may_drop: bool = False) -> None:
    row.committed_unanswered = servers[0].stored_keys(row.unanswered_keys)
    ROWS.append(row)
    if not in_flight_may_drop:  # SIGKILL drops in-flight requests by definition
        assert row.committed_unanswered == 0, row
    assert row.answered_201 > 0, row
    assert row.lost == 0, row
    assert row.unexpected_5xx == 0, row
    assert row.pg_left == 0 and row.redis_left == 0, row
    assert all(s < SHUTDOWN_TIMEOUT for s in row.shutdown_seconds), row
    for log in service_logs:
        assert "Traceback" not in log


def stop_cleanly(service: Service, row: Row) -> None:
    code, seconds = service.stop(signal.SIGTERM, timeout=SHUTDOWN_TIMEOUT + 20)
    row.shutdown_seconds.append(seconds)
    log = service.log()
    assert code in CLEAN_EXIT, log[-3000:]
    assert "Successfully closed API." in log, log[-3000:]


def test_sigterm_under_load(
    servers: Servers, env: dict[str, str], services: list[Service], tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    row = Row("SIGTERM under load")
    service = start(services, env, tmp_path)
    with Load(service.url, applicants, CLIENTS) as load:
        time.sleep(LOAD_SECONDS)
        stop_cleanly(service, row)
    record(row, load.result)
    count_leftovers(row, servers)
    count_lost(row, load.result.committed, services, env, tmp_path)
    check(row, [service.log()], servers)


def test_start_load_stop_cycles(
    servers: Servers, env: dict[str, str], services: list[Service], tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    row = Row(f"{CYCLES} start/load/stop cycles")
    committed: list[str] = []
    for _ in range(CYCLES):
        service = start(services, env, tmp_path)
        with Load(service.url, applicants, CLIENTS) as load:
            time.sleep(CYCLE_LOAD_SECONDS)
            stop_cleanly(service, row)
        record(row, load.result)
        committed += load.result.committed
        count_leftovers(row, servers)
    count_lost(row, committed, services, env, tmp_path)
    check(row, [s.log() for s in services], servers)


def test_sigkill_under_load(
    servers: Servers, env: dict[str, str], services: list[Service], tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    row = Row("SIGKILL under load")
    service = start(services, env, tmp_path)
    with Load(service.url, applicants, CLIENTS) as load:
        time.sleep(LOAD_SECONDS)
        code, _ = service.stop(signal.SIGKILL)
        assert code == -signal.SIGKILL
    record(row, load.result)
    assert "Closing API." not in service.log()
    count_leftovers(row, servers)
    count_lost(row, load.result.committed, services, env, tmp_path)
    check(row, [], servers, in_flight_may_drop=True)


def test_postgres_restarted_under_load(
    servers: Servers, env: dict[str, str], services: list[Service], tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    pg, _ = servers
    row = Row("PostgreSQL restarted under load")
    service = start(services, env, tmp_path)
    with Load(service.url, applicants, CLIENTS) as load:
        time.sleep(LOAD_SECONDS / 2)
        pg.restart()
        after_restart = load.result.statuses[201]
        time.sleep(LOAD_SECONDS)
        # It recovered by itself: decisions were committed after the restart ...
        assert load.result.statuses[201] > after_restart
        # ... and the session that listens for model assignment changes is back (it re-reads on reconnect).
        assert wait_until(lambda: "Listening for model assignment changes again" in service.log(), timeout=10)
        stop_cleanly(service, row)
    record(row, load.result)
    count_leftovers(row, servers)
    count_lost(row, load.result.committed, services, env, tmp_path)
    check(row, [service.log()], servers)


def test_redis_stopped_and_started_under_load(
    servers: Servers, env: dict[str, str], services: list[Service], tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    _, redis_server = servers
    row = Row("Redis stopped and started under load")
    service = start(services, env, tmp_path)
    with Load(service.url, applicants, CLIENTS) as load:
        time.sleep(LOAD_SECONDS / 2)
        redis_server.stop()
        time.sleep(LOAD_SECONDS)
        assert "Redis cache unavailable" in service.log()
        redis_server.start()
        # Back-off starts at 1 s and doubles up to 30 s: a probe finds Redis again.
        assert wait_until(lambda: "Redis cache is back" in service.log(), timeout=40)
        time.sleep(1)
        stop_cleanly(service, row)
    record(row, load.result)
    log = service.log()
    # One line per transition, not one per request.
    assert log.count("Redis cache unavailable") == 1 and log.count("Redis cache is back") == 1
    # The cache is best-effort: the outage costs no decision.
    assert load.result.statuses[503] == 0
    count_leftovers(row, servers)
    count_lost(row, load.result.committed, services, env, tmp_path)
    check(row, [log], servers)


def test_sigterm_while_postgres_down(
    servers: Servers, env: dict[str, str], services: list[Service], tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    pg, _ = servers
    row = Row("SIGTERM while PostgreSQL is down")
    service = start(services, env, tmp_path)
    try:
        with Load(service.url, applicants, CLIENTS) as load:
            time.sleep(LOAD_SECONDS / 2)
            pg.stop()
            time.sleep(1)
            stop_cleanly(service, row)
    finally:
        pg.start()
    record(row, load.result)
    count_leftovers(row, servers)
    count_lost(row, load.result.committed, services, env, tmp_path)
    check(row, [service.log()], servers)


def test_sigterm_to_parent_stops_every_worker(
    servers: Servers, env: dict[str, str], services: list[Service], tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    row = Row("SIGTERM under load, WEB_CONCURRENCY=2")
    service = start(services, {**env, "WEB_CONCURRENCY": "2"}, tmp_path)
    # Both workers are up (each logged its start-up) before the load begins.
    assert wait_until(lambda: service.log().count("Successfully started API") == 2, timeout=30)
    with Load(service.url, applicants, CLIENTS) as load:
        time.sleep(LOAD_SECONDS)
        stop_cleanly(service, row)
    record(row, load.result)
    log = service.log()
    # Every worker ran its own shutdown steps.
    assert log.count("Closing API.") == 2 and log.count("Successfully closed API.") == 2
    assert log.count("Shutdown step 'store': closed") == 2
    assert "connection budget: PostgreSQL 2 x (10 + 1 listening) = 22" in log
    count_leftovers(row, servers)
    count_lost(row, load.result.committed, services, env, tmp_path)
    check(row, [log], servers)
