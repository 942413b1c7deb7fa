"""The chaos suite's servers, and its table at the end of the run."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.servers import PrivatePostgres, PrivateRedis
from tests.conftest import REQUIRE_SERVICES
from tests.procfile import Service, service_environment

LONG = os.environ.get("CHAOS", "").lower() == "long"
SHUTDOWN_TIMEOUT = 10
RESULTS = Path(__file__).resolve().parents[2] / "var" / "chaos-results.md"


@dataclass
class Row:
    scenario: str
    answered_201: int = 0
    replays_200: int = 0
    answered_503: int = 0
    unexpected_5xx: int = 0
    refused: int = 0
    dropped: int = 0
    lost: int = 0
    # requests that got no answer at all, yet whose decision was committed: an
    # in-flight request dropped at shutdown would show here
    committed_unanswered: int = 0
    pg_left: int = 0
    redis_left: int = 0
    shutdown_seconds: list[float] = field(default_factory=list)
    unanswered_keys: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        shutdown = f"{max(self.shutdown_seconds):.2f}" if self.shutdown_seconds else "-"
        return [
            self.scenario,
            str(self.answered_201),
            str(self.replays_200),
            str(self.answered_503),
            str(self.lost),
            str(self.committed_unanswered),
            str(self.unexpected_5xx),
            str(self.refused),
            str(self.dropped),
            str(self.pg_left),
            str(self.redis_left),
            shutdown,
        ]


HEADER = [
    "scenario",
    "201",
    "200 replays",
    "503",
    "lost",
    "unanswered but committed",
    "5xx not 503",
    "refused",
    "dropped",
    "PG conns left",
    "Redis conns left",
    "max shutdown s",
]
ROWS: list[Row] = []
# test_pressure.py's rows: latency during outages and overload.
PRESSURE_ROWS: list = []  # list[PressureRow]; typed loosely to keep this module free of the test modules
PRESSURE_HEADER = [
    "scenario",
    "2xx",
    "503",
    "2xx p99 ms",
    "503 p50 ms",
    "503 p99 ms (after the first)",
    "first 503 s",
    "back s after the database",
    "peak RSS MiB",
    "lost",
]
# test_hostile.py's rows: hostile clients at the connection layer.
HOSTILE_ROWS: list = []  # list[HostileRow]
HOSTILE_HEADER = [
    "scenario",
    "connections",
    "closed by the deadline (or cap)",
    "closed late",
    "/health/live probes",
    "probe p99 ms",
    "probe max ms",
    "RSS growth MiB",
    "5xx or no answer",
]


@pytest.fixture(scope="package")
def servers() -> Iterator[tuple[PrivatePostgres, PrivateRedis]]:
    try:
        pg = PrivatePostgres()
    except Exception as exc:  # binaries missing, or initdb refused
        message = f"cannot start a private PostgreSQL for the chaos suite: {exc}"
        if REQUIRE_SERVICES:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    redis_server = PrivateRedis()
    try:
        yield pg, redis_server
    finally:
        redis_server.close()
        pg.close()


def table(header: list[str], rows: list[Any]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS and not PRESSURE_ROWS and not HOSTILE_ROWS:
        return
    terminalreporter.section(f"chaos suite ({'long' if LONG else 'short'})")
    tables = []
    if ROWS:
        tables.append(table(HEADER, ROWS))
    if PRESSURE_ROWS:
        tables.append(table(PRESSURE_HEADER, PRESSURE_ROWS))
    if HOSTILE_ROWS:
        tables.append(table(HOSTILE_HEADER, HOSTILE_ROWS))
    for text in tables:
        terminalreporter.write_line(text)
        terminalreporter.write_line("")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n\n".join(tables) + "\n")


@pytest.fixture
def env(servers: tuple[PrivatePostgres, PrivateRedis]) -> dict[str, str]:
    pg, redis_server = servers
    return service_environment(
        pg.url(),
        redis_server.url,
        REDIS_KEY_PREFIX=f"chaos-{uuid.uuid4().hex[:8]}:",
        SHUTDOWN_TIMEOUT=str(SHUTDOWN_TIMEOUT),
        # Outages should turn into 503s quickly, not after the 3 s default.
        DATABASE_REQUEST_TIMEOUT="1",
    )


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    """Every service a scenario starts; any still running at the end is killed."""
    started: list[Service] = []
    yield started
    for service in started:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()
