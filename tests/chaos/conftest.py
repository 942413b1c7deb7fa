"""The chaos suite's servers, and its table at the end of the run."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.chaos.servers import PrivatePostgres, PrivateRedis
from tests.conftest import REQUIRE_SERVICES

LONG = os.environ.get("CHAOS", "").lower() == "long"
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


def table() -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in ROWS]
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    terminalreporter.section(f"chaos suite ({'long' if LONG else 'short'})")
    terminalreporter.write_line(table())
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(table() + "\n")
