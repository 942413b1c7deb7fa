"""The service through PgBouncer in transaction pooling mode, with DATABASE_DIRECT_URL for its LISTEN.

Every kind of call the service makes goes through a real PgBouncer: single and
grouped inserts (COPY), an idempotent batch, the search, an outcome, monitoring,
migrations with their advisory lock, a promotion that must reach a second app by
LISTEN/NOTIFY on the direct session. PostgreSQL must see no more connections than
PgBouncer's pool and one listening session per app.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import ADMIN_URL, REQUIRE_SERVICES, Versions, wait_until
from tests.pooler import Missing, PgBouncer

POOL = 3
ADMIN = {"Authorization": "Bearer pool-admin-tok"}


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    try:
        running = PgBouncer(pool_size=POOL)
    except Missing as exc:
        if REQUIRE_SERVICES:
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    try:
        yield running
    finally:
        running.close()


def _backends(dbname: str) -> int:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (dbname,)).fetchone()
        return int(row[0]) if row else 0


def test_everything_the_service_does_works_through_a_transaction_pooler(
    bouncer: PgBouncer, own_postgres_url: str, versions: Versions, applicants: list[dict[str, Any]]
) -> None:
    dbname = urlsplit(own_postgres_url).path.lstrip("/")
    settings = Settings(
        database_url=bouncer.url(dbname),
        database_direct_url=own_postgres_url,
        database_pool_size=10,  # more than the pooler's: PostgreSQL still sees only the pooler's
        model_dir=versions.root,
        model_version=versions.shipped,
        admin_keys=(("ops", "pool-admin-tok"),),
    )
    with TestClient(create_app(settings)) as first, TestClient(create_app(settings)) as second:
        # Many runs of the same statements: psycopg would prepare them after five, and fail on the next session.
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda a: first.post("/decisions", json=a), applicants[:200]))
            assert _backends(dbname) <= POOL + 2, "the pooler's connections and two listening sessions"
        assert [a.status_code for a in answers] == [201] * 200
        key = {"Idempotency-Key": "pooled-batch-1"}
        batch = {"applicants": [{**a, "reference": "POOLED"} for a in applicants[:50]]}
        made = first.post("/decisions/batch", json=batch, headers=key)
        again = second.post("/decisions/batch", json=batch, headers=key)
        assert (made.status_code, again.status_code) == (201, 200) and made.json() == again.json()
        found = second.get("/decisions", params={"reference": "POOLED", "limit": 1000}).json()["decisions"]
        assert len(found) == 50
        decision = answers[0].json()
        outcome = {"defaulted": True, "observed_at": dt.datetime.now(dt.UTC).isoformat()}
        assert first.put(f"/decisions/{decision['id']}/outcome", json=outcome).status_code == 201
        assert second.get("/monitoring").status_code == 200
        # A promotion on one app reaches the other by NOTIFY on its direct session.
        promoted = first.post(f"/admin/models/{versions.logistic}/promote", headers=ADMIN)
        assert promoted.status_code == 200, promoted.text
        assert wait_until(lambda: second.get("/model").json()["version"] == versions.logistic)
        assert _backends(dbname) <= POOL + 2
