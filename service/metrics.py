"""Prometheus metrics: what operators of a scoring service watch.

With several workers each process keeps its own counters, so the scrape would
see only the worker that answered it. prometheus-client's multiprocess mode
fixes that: when PROMETHEUS_MULTIPROC_DIR is set (the Procfile sets it), every
worker writes its samples to files there, and /metrics aggregates them.

Requests do not write those files themselves: each write is a locked update of a
memory-mapped file (3 to 5 µs, six of them per decision, ~10 % of a request under
load). They `count` and `observe` into plain dicts instead, and `flush` folds the
totals into the shared metrics once a second, before every scrape this worker
answers, and at shutdown. A scrape can therefore miss up to a second of another
worker's requests; it never loses any.
"""

from __future__ import annotations

import bisect
import math
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
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
latency = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
decisions = Counter("decisions", "Decisions committed, by outcome and risk category.", ["decision", "risk_category"])
PROBABILITY_BUCKETS = (0.02, 0.05, 0.1, 1 / 6, 0.25, 0.35, 0.5, 0.6, 0.75, 0.9, 1.0)
probability = Histogram(
    "probability_of_default",
    "Probability of default of committed decisions: a shift here is drift.",
    buckets=PROBABILITY_BUCKETS,
)
requests_by_key = Counter(
    "http_requests_by_key",
    "HTTP requests answered, by API key id (never the secret), route and status.",
    ["key", "route", "status"],
)
connection_problems = Counter(
    "http_connection_problems",
    "Connections closed or refused at the connection layer, by reason (service/protocol.py).",
    ["reason"],
)
requests_shed = Counter("requests_shed", "Requests refused at once (503) because the worker was at capacity.")
store_errors = Counter("store_errors", "Calls to the system of record that failed (answered 503).")
store_fast_failures = Counter(
    "store_fast_failures", "Calls answered 503 at once because the system of record is known to be down."
)
cache_errors = Counter("cache_errors", "Cache calls that failed (the request went on without the cache).")
cache_hits = Counter("cache_hits", "Decision lookups answered from the cache.")
cache_misses = Counter("cache_misses", "Decision lookups the cache could not answer.")
pool_size = Gauge("db_pool_connections", "Connections open in the PostgreSQL pool.", multiprocess_mode="livesum")
pool_in_use = Gauge(
    "db_pool_connections_in_use", "Pooled PostgreSQL connections lent out.", multiprocess_mode="livesum"
)
shutting_down = Gauge("shutting_down", "1 while the process is shutting down.", multiprocess_mode="livemax")
# The model lifecycle. One sample per worker (pid label): 1 for each version it serves, by role.
model_loaded = Gauge(
    "model_loaded",
    "1 for the model version this worker serves, by role.",
    ["role", "version"],
    multiprocess_mode="liveall",
)
model_reloads = Counter("model_reloads", "Model versions loaded and swapped in, by role.", ["role"])
model_reload_failures = Counter(
    "model_reload_failures", "Model versions that failed to load (the worker kept what it served), by role.", ["role"]
)
# Monitoring, refreshed from the system of record at most once a minute per worker (the same figures on every
# worker; a scrape shows the most recent). NaN when there is nothing to measure yet.
model_score_psi = Gauge(
    "model_score_psi",
    "The champion's population stability index of the probability of default over the last 24 h.",
    multiprocess_mode="livemostrecent",
)
model_feature_psi = Gauge(
    "model_feature_psi",
    "The champion's characteristic stability index per feature over the last 24 h.",
    ["feature"],
    multiprocess_mode="livemostrecent",
)
model_approval_rate = Gauge(
    "model_approval_rate", "The champion's share of approvals over the last 24 h.", multiprocess_mode="livemostrecent"
)
challenger_scored = Counter("challenger_scored", "Decisions the challenger scored and recorded.")
challenger_dropped = Counter(
    "challenger_dropped",
    "Decisions sampled for the challenger but not scored, by reason (never the champion's work).",
    ["reason"],
)


# -- per-process tally ------------------------------------------------------------------

# Upper bounds as prometheus-client keeps them (with +Inf last), to pick a bucket the way it does.
_BOUNDS: dict[Histogram, tuple[float, ...]] = {
    latency: (*LATENCY_BUCKETS, math.inf),
    probability: (*PROBABILITY_BUCKETS, math.inf),
}
_counts: dict[tuple[Counter, tuple[str, ...]], float] = {}
# Per histogram and labels: [sum, count in bucket 0, count in bucket 1, ...].
_observations: dict[tuple[Histogram, tuple[str, ...]], list[float]] = {}


def count(metric: Counter, *labels: str, amount: float = 1.0) -> None:
    """Add `amount` (one) to the counter (with these label values) at the next flush."""
    key = (metric, labels)
    _counts[key] = _counts.get(key, 0.0) + amount


def observe(metric: Histogram, value: float, *labels: str) -> None:
    """Record one observation in the histogram (with these label values) at the next flush."""
    bounds = _BOUNDS[metric]
    key = (metric, labels)
    tally = _observations.get(key)
    if tally is None:
        tally = _observations[key] = [0.0] * (len(bounds) + 1)
    tally[0] += value
    # prometheus-client puts a value in the first bucket whose bound is >= it.
    tally[1 + bisect.bisect_left(bounds, value)] += 1


def flush() -> None:
    """Fold everything counted since the last flush into the shared metrics."""
    counts, observations = dict(_counts), dict(_observations)
    _counts.clear()
    _observations.clear()
    for (counter, labels), amount in counts.items():
        (counter.labels(*labels) if labels else counter).inc(amount)
    for (histogram, labels), tally in observations.items():
        child = histogram.labels(*labels) if labels else histogram
        # Histogram.observe() takes one value at a time; these are the two values it
        # updates (pinned prometheus-client, checked by tests/test_metrics.py).
        child._sum.inc(tally[0])
        for bucket, amount in zip(child._buckets, tally[1:], strict=True):
            if amount:
                bucket.inc(amount)


def render() -> tuple[bytes, str]:
    """The exposition text for a scrape, aggregated over workers in multiprocess mode."""
    flush()
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop the live gauges of a worker that is gone, so they stop counting."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
