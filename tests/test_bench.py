"""The benchmarks' own parts that a figure rests on, checked against the real PostgreSQL.

bench/latency.py judges the service's p99 at 1,000 requests a second against the
committing ceiling (bench/baseline.py): it must really commit each request's row
before it answers, or the bound it sets is no bound.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from starlette.testclient import TestClient

from bench.baseline import committing_app
from service.migrate import migrate
from service.settings import Settings


def test_the_committing_ceiling_commits_each_decision_before_it_answers(
    own_postgres_url: str, applicant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(migrate(Settings.from_env({"DATABASE_URL": own_postgres_url})))
    monkeypatch.setenv("DATABASE_URL", own_postgres_url)
    monkeypatch.setenv("DATABASE_POOL_SIZE", "2")
    with TestClient(committing_app) as client:
        answers = [client.post("/decisions", json=applicant) for _ in range(3)]
        assert [a.status_code for a in answers] == [201, 201, 201]
        ids = [uuid.UUID(a.json()["id"]) for a in answers]
        with psycopg.connect(own_postgres_url) as conn:
            # Read while the app still runs: each row was committed before its answer.
            stored = conn.execute("SELECT id, age FROM decisions WHERE id = ANY(%s)", (ids,)).fetchall()
    assert sorted(stored) == sorted((i, applicant["age"]) for i in ids)
