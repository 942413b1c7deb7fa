"""Under concurrent load every 201 is a committed row.

Group commit answers a request only after the COMMIT that holds its row. Here
64 clients drive two workers at once, mixing plain POSTs, POSTs with an
Idempotency-Key (some of them repeated), and batches, so that requests share
commits; afterwards every decision answered 200 or 201 must be in PostgreSQL,
exactly as answered, and nothing else may have been written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import uuid
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest

from tests.procfile import STOPPED, Service

pytestmark = pytest.mark.process

CLIENTS = 64
REQUESTS_PER_CLIENT = 30
BATCH_SIZE = 20


async def _client(
    http: httpx.AsyncClient, number: int, applicants: list[dict[str, Any]], run: str, answered: list[dict[str, Any]]
) -> None:
    for i in range(REQUESTS_PER_CLIENT):
        if i % 10 == 9:  # a batch
            start = (number + i) % (len(applicants) - BATCH_SIZE)
            response = await http.post("/decisions/batch", json={"applicants": applicants[start : start + BATCH_SIZE]})
            assert response.status_code == 201, response.text
            answered.extend(response.json()["decisions"])
            continue
        headers = {}
        applicant = applicants[(number * REQUESTS_PER_CLIENT + i) % len(applicants)]
        if i % 3 == 0:
            # Clients 2k and 2k+1 send the same key and body at the same step: they
            # race, and both must end up with one and the same record.
            pair = number // 2
            headers["Idempotency-Key"] = f"load-{run}-{pair}-{i}"
            applicant = applicants[(pair * REQUESTS_PER_CLIENT + i) % len(applicants)]
        for _ in range(100):
            response = await http.post("/decisions", json=applicant, headers=headers)
            if response.status_code != 409:  # its twin is still in flight in the same worker
                break
            await asyncio.sleep(0.01)
        assert response.status_code in (200, 201), response.text
        answered.append(response.json())


def _keyed_per_client() -> int:
    return sum(1 for i in range(REQUESTS_PER_CLIENT) if i % 10 != 9 and i % 3 == 0)


async def _load(url: str, applicants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answered: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        run = uuid.uuid4().hex[:8]
        await asyncio.gather(*(_client(http, n, applicants, run, answered) for n in range(CLIENTS)))
    return answered


def test_every_decision_answered_under_concurrent_load_is_committed(
    service_env: dict[str, str], postgres_url: str, tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        # Earlier tests share this run's database: only rows from now on are ours.
        started = conn.execute("SELECT clock_timestamp()").fetchone()[0]  # type: ignore[index]
    service = Service({**service_env, "WEB_CONCURRENCY": "2"}, tmp_path / "load.log")
    try:
        service.wait_ready()
        answered = asyncio.run(_load(service.url, applicants))
    finally:
        code, _ = service.stop(signal.SIGTERM)
    assert code in STOPPED, service.log()

    by_id = {uuid.UUID(d["id"]): d for d in answered}
    # Each pair of keyed twins got one record between them.
    assert len(by_id) == len(answered) - CLIENTS // 2 * _keyed_per_client()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, decision, probability_of_default, risk_category, score, created_at FROM decisions"
            " WHERE created_at >= %s",
            (started,),
        ).fetchall()
    stored = {row[0]: row[1:] for row in rows}
    assert len(rows) == len(stored)
    missing = by_id.keys() - stored.keys()
    assert not missing, f"{len(missing)} of {len(by_id)} answered decisions are not in PostgreSQL"
    assert stored.keys() == by_id.keys(), "rows were written that no answer reported"
    for decision_id, d in by_id.items():
        created_at = dt.datetime.fromisoformat(d["created_at"].replace("Z", "+00:00"))
        expected = (d["decision"], d["probability_of_default"], d["risk_category"], d["score"], created_at)
        assert stored[decision_id] == expected
