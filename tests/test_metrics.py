"""/metrics: Prometheus text that prometheus-client's own parser reads, in one process and across workers."""

from __future__ import annotations

import dataclasses
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import wait_until
from tests.procfile import Service


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by name and labels (parsing fails on anything that is not valid exposition text)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_decisions_and_cache(client: TestClient, settings: Settings, applicant: dict) -> None:
    before = samples(client.get("/metrics").text)
    created = client.post("/decisions", json=applicant).json()
    client.get(f"/decisions/{created['id']}")
    client.get("/nope")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    after = samples(response.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("http_requests_total", method="POST", route="/decisions", status="201") == 1
    assert delta("http_requests_total", method="GET", route="/decisions/{decision_id:uuid}", status="200") == 1
    assert delta("http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert delta("http_request_duration_seconds_count", method="POST", route="/decisions") == 1
    assert delta("decisions_total", decision=created["decision"], risk_category=created["risk_category"]) == 1
    assert delta("probability_of_default_count") == 1
    assert delta("cache_hits_total") == 1
    assert value(after, "shutting_down") == 0
    if settings.database_url:
        assert value(after, "db_pool_connections") >= 1


@pytest.fixture
def held_store(settings: Settings) -> Iterator[tuple[Settings, Callable[[], None]]]:
    """The test's settings with a short request timeout, and a way to hold the decisions table from outside.

    The lock is a real failure of the real back end: PostgreSQL makes the INSERT wait
    for an ACCESS EXCLUSIVE lock past the request's bound, SQLite answers "database is
    locked" once its busy timeout has passed.
    """
    held: list[Callable[[], None]] = []

    def hold() -> None:
        if settings.database_url:
            pg = psycopg.connect(settings.database_url)
            pg.execute("LOCK TABLE decisions IN ACCESS EXCLUSIVE MODE")
            held.append(pg.close)  # closing without a commit rolls back and releases it
        else:
            lite = sqlite3.connect(settings.sqlite_path, isolation_level=None)
            lite.execute("BEGIN EXCLUSIVE")
            held.append(lite.close)

    try:
        yield dataclasses.replace(settings, database_request_timeout=0.3), hold
    finally:
        for release in held:
            release()


def test_metrics_count_store_errors(held_store: tuple[Settings, Callable[[], None]], applicant: dict) -> None:
    short, hold = held_store
    with TestClient(create_app(short)) as client:
        before = samples(client.get("/metrics").text)
        hold()
        response = client.post("/decisions", json=applicant)
        assert response.status_code == 503, response.text
        after = samples(client.get("/metrics").text)
    assert value(after, "store_errors_total") - value(before, "store_errors_total") == 1


def test_metrics_aggregate_over_workers(service_env: dict[str, str], tmp_path: Path, applicant: dict) -> None:
    prometheus_dir = tmp_path / "prometheus"
    prometheus_dir.mkdir()
    env = {**service_env, "WEB_CONCURRENCY": "2", "PROMETHEUS_MULTIPROC_DIR": str(prometheus_dir)}
    service = Service(env, tmp_path / "workers.log")
    try:
        service.wait_ready()
        assert wait_until(lambda: service.log().count("Successfully started API") == 2, timeout=30)
        with httpx.Client(base_url=service.url, timeout=10) as http:
            for _ in range(40):  # new connections: the kernel spreads them over both workers
                assert httpx.post(f"{service.url}/decisions", json=applicant, timeout=10).status_code == 201

            def posts_counted() -> float:
                found = samples(http.get("/metrics").text)
                assert sum(v for (name, _), v in found.items() if name == "decisions_total") <= 40
                return value(found, "http_requests_total", method="POST", route="/decisions", status="201")

            # The worker that answers the scrape publishes its own counts first; the
            # other publishes its within a second.
            assert wait_until(lambda: posts_counted() == 40, timeout=5)
            found = samples(http.get("/metrics").text)
        assert sum(v for (name, _), v in found.items() if name == "decisions_total") == 40
        # Each worker writes its own files; the scrape adds them up.
        assert len({f.stem.rsplit("_", 1)[1] for f in prometheus_dir.glob("counter_*.db")}) == 2
    finally:
        service.stop(signal.SIGTERM)


def test_tally_publishes_what_direct_updates_would() -> None:
    """count/observe then flush must expose exactly what inc()/observe() one at a time would."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from service import metrics

    def build(registry: CollectorRegistry) -> tuple[Counter, Histogram]:
        counter = Counter("c", "c", ["kind"], registry=registry)
        histogram = Histogram("h", "h", ["kind"], buckets=metrics.LATENCY_BUCKETS, registry=registry)
        return counter, histogram

    direct, batched = CollectorRegistry(), CollectorRegistry()
    direct_counter, direct_histogram = build(direct)
    counter, histogram = build(batched)
    metrics._BOUNDS[histogram] = (*metrics.LATENCY_BUCKETS, float("inf"))
    # Values on, between and beyond the bucket bounds.
    values = [0.0, 0.001, 0.0011, 0.0025, 0.007, 0.1, 4.99, 5.0, 5.01, 100.0]
    try:
        for kind in ("a", "b"):
            for v in values:
                direct_counter.labels(kind).inc()
                direct_histogram.labels(kind).observe(v)
                metrics.count(counter, kind)
                metrics.observe(histogram, v, kind)
        assert generate_latest(batched) != generate_latest(direct)  # nothing published before the flush
        metrics.flush()
    finally:
        del metrics._BOUNDS[histogram]

    def exposition(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert exposition(batched) == exposition(direct)
