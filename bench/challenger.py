"""`make bench` (second part): what a boosting challenger at share 1.0 costs the champion, in one run.

Starts the service from the Procfile on the local PostgreSQL (a database of its
own) with a registry holding the shipped logistic champion and a boosting version
trained for the run, then alternates, round by round: no challenger, and the
boosting challenger at share 1.0. For each it measures POST /decisions with wrk
at saturation (64 connections, closed loop) and at a fixed offered load (32
connections, each paced to a total of ~400 req/s), and reads from /metrics what
the challenger scored and dropped. Also the RSS of a worker, and of the
challenger's process. Prints the table and appends it to bench/RESULTS.md.

Options: --seconds per wrk run (default 5), --rounds (default 3), --workers (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import replace_section  # noqa: E402
from bench.run import ADMIN_URL, REDIS_URL, Sample, Server, ensure_wrk, flush_prefix, lua_post, work_directory, wrk  # noqa: E402
from service import dataset, training  # noqa: E402

KEY = "bench-admin-key"
SHIPPED = "german-credit-lr-2026.11.28"
SATURATED = 64
PACED_CONNECTIONS = 32
PACED_RATE = 400  # requests per second over all connections
# The budget: a boosting challenger may cost the champion at most this share of its throughput.
MAX_DROP = 0.15


def admin(url: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def challenger_counts(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "challenger_scored_total":
                counts["scored"] = counts.get("scored", 0.0) + s.value
            elif s.name == "challenger_dropped_total":
                reason = s.labels["reason"]
                counts[reason] = counts.get(reason, 0.0) + s.value
    return counts


def paced(script: Path, target: Path) -> Path:
    """The POST script, with each connection waiting between requests: a fixed offered load, not a closed loop."""
    delay_ms = 1000 * PACED_CONNECTIONS / PACED_RATE
    target.write_text(script.read_text() + f"function delay() return {delay_ms:.0f} end\n")
    return target


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def children(pid: int) -> list[int]:
    listing = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in listing.read_text().split()] if listing.exists() else []


def serving(pid: int, workers: int) -> list[int]:
    """The worker processes: the Procfile's process itself with one worker, else its children."""
    return [pid] if workers == 1 else children(pid)


def challengers(worker_pids: list[int]) -> list[int]:
    return [
        child
        for worker in worker_pids
        for child in children(worker)
        if b"service.models.boosting" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    binary = ensure_wrk()
    work = work_directory("bench-challenger-")
    registry = work / "models"
    shutil.copytree(ROOT / "artifacts" / "models" / SHIPPED, registry / SHIPPED)
    boosting = training.train(registry, "bench-gb", "boosting").version
    applicants = [msgspec.to_builtins(a) for a in dataset.load().applicants]
    post = lua_post("/decisions", json.dumps(applicants[1]).encode(), work / "post.lua")
    post_paced = paced(post, work / "post_paced.lua")

    dbname = f"credit_bench_{uuid.uuid4().hex[:8]}"
    connection = psycopg.connect(ADMIN_URL, autocommit=True)
    connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "API_KEYS", "LOG_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        DATABASE_URL=re.sub(r"/[^/]*$", f"/{dbname}", ADMIN_URL),
        REDIS_URL=REDIS_URL,
        REDIS_KEY_PREFIX=prefix,
        MODEL_DIR=str(registry),
        MODEL_VERSION=SHIPPED,
        ADMIN_API_KEYS=f"bench:{KEY}",
        WEB_CONCURRENCY=str(args.workers),
    )
    service = Server(env, None, work / "service.log")
    samples: dict[tuple[str, str], list[Sample]] = {}
    counts: dict[tuple[str, str], list[dict[str, float]]] = {}
    memory: dict[str, float] = {}
    try:
        service.wait("/health/ready")
        wrk(binary, service.url, post, 32, 2)  # warm up
        workers = serving(service.process.pid, args.workers)
        memory["worker, champion alone"] = statistics.mean(rss_mib(p) for p in workers)
        for _ in range(args.rounds):
            for mode in ("no challenger", "boosting at share 1.0"):
                version = boosting if mode.startswith("boosting") else None
                admin(service.url, "PUT", "/admin/challenger", {"version": version, "share": 1.0})
                time.sleep(3.0)  # every worker has its process (or none) by now
                for load, script, connections in (
                    ("saturated, 64 connections", post, SATURATED),
                    (f"paced, ~{PACED_RATE} req/s", post_paced, PACED_CONNECTIONS),
                ):
                    before = challenger_counts(service.url)
                    samples.setdefault((mode, load), []).append(
                        wrk(binary, service.url, script, connections, args.seconds)
                    )
                    time.sleep(1.0)  # let the queue settle: what is not scored by now was dropped or is queued
                    after = challenger_counts(service.url)
                    counts.setdefault((mode, load), []).append({k: after[k] - before.get(k, 0.0) for k in after})
                if version is not None and "challenger process" not in memory:
                    memory["worker, with a boosting challenger"] = statistics.mean(rss_mib(p) for p in workers)
                    memory["challenger process"] = statistics.mean(rss_mib(p) for p in challengers(workers))
    finally:
        service.stop()
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        connection.close()
        flush_prefix(prefix)
        shutil.rmtree(work, ignore_errors=True)
    table = render(samples, counts, memory, args)
    print(table, flush=True)
    replace_section(table)


def render(
    samples: dict[tuple[str, str], list[Sample]],
    counts: dict[tuple[str, str], list[dict[str, float]]],
    memory: dict[str, float],
    args: argparse.Namespace,
) -> str:
    rows = [
        "## A boosting challenger's cost",
        "",
        f"`bench/challenger.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: POST /decisions, "
        f"{args.workers} worker(s), the champion alone and with a boosting challenger at share 1.0, alternating, "
        f"{args.rounds} rounds of {args.seconds:g} s; medians. The challenger's process runs at nice 19: it gets the "
        "CPU the champion leaves idle, and the bounded queue drops (and counts) what it cannot score.",
        "",
        "| load | challenger | req/s | p50 ms | p99 ms | non-2xx | scored | dropped (queue full) | dropped (failed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    loads = sorted({load for _, load in samples}, reverse=True)
    for load in loads:
        for mode in ("no challenger", "boosting at share 1.0"):
            runs = samples[(mode, load)]
            made = counts[(mode, load)]
            rows.append(
                f"| {load} | {mode} | {statistics.median(s.rps for s in runs):,.0f} | "
                f"{statistics.median(s.p50_ms for s in runs):.2f} | {statistics.median(s.p99_ms for s in runs):.2f} | "
                f"{sum(s.non_2xx for s in runs)} | {sum(c.get('scored', 0) for c in made):,.0f} | "
                f"{sum(c.get('queue_full', 0) for c in made):,.0f} | {sum(c.get('failed', 0) for c in made):,.0f} |"
            )
    rows.append("")
    for load in loads:
        alone = statistics.median(s.rps for s in samples[("no challenger", load)])
        shadowed = statistics.median(s.rps for s in samples[("boosting at share 1.0", load)])
        drop = 1 - shadowed / alone
        verdict = "within" if drop <= MAX_DROP else "OVER"
        rows.append(
            f"- {load}: the champion's req/s with the challenger is {shadowed / alone:.3f} of without "
            f"({drop:+.1%} drop; {verdict} the {MAX_DROP:.0%} budget)."
        )
    rows.append("- RSS: " + "; ".join(f"{name} {mib:.0f} MiB" for name, mib in memory.items()) + ".")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
