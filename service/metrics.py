"""Prometheus metrics: what operators of a scoring service watch.

With several workers each process keeps its own counters, so the scrape would
see only the worker that answered it. prometheus-client's multiprocess mode
fixes that: when PROMETHEUS_MULTIPROC_DIR is set (the Procfile sets it), every
worker writes its samples to files there, and /metrics aggregates them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

requests = Counter(
    "http_requests", "HTTP requests answered, by route template and status.", ["method", "route", "status"]
)
latency = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
decisions = Counter("decisions", "Decisions committed, by outcome and risk category.", ["decision", "risk_category"])
probability = Histogram(
    "probability_of_default",
    "Probability of default of committed decisions: a shift here is drift.",
    buckets=(0.02, 0.05, 0.1, 1 / 6, 0.25, 0.35, 0.5, 0.6, 0.75, 0.9, 1.0),
)
store_errors = Counter("store_errors", "Calls to the system of record that failed (answered 503).")
cache_errors = Counter("cache_errors", "Cache calls that failed (the request went on without the cache).")
cache_hits = Counter("cache_hits", "Decision lookups answered from the cache.")
cache_misses = Counter("cache_misses", "Decision lookups the cache could not answer.")
pool_size = Gauge("db_pool_connections", "Connections open in the PostgreSQL pool.", multiprocess_mode="livesum")
pool_in_use = Gauge(
    "db_pool_connections_in_use", "Pooled PostgreSQL connections lent out.", multiprocess_mode="livesum"
)
shutting_down = Gauge("shutting_down", "1 while the process is shutting down.", multiprocess_mode="livemax")


def render() -> tuple[bytes, str]:
    """The exposition text for a scrape, aggregated over workers in multiprocess mode."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop the live gauges of a worker that is gone, so they stop counting."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
