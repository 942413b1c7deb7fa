"""`make bench`: the service against the machine's ceiling, measured with wrk in one run.

Starts the service from the Procfile's web: line against the local PostgreSQL
and Redis (a database and key prefix of the bench's own), and a decode-only
Starlette app (bench/baseline.py) with the same uvicorn flags as the ceiling,
and beside it the committing ceiling (the same plus scoring and one autocommitted
INSERT per request): what group commits buy at saturation. Each measurement is
the median of 3 runs, alternating between targets so that drift on the machine
hits all of them alike. Prints the table and writes it,
with the machine and the versions, to bench/RESULTS.md.

Options: --seconds per wrk run (default 5), --workers 1 2 (default: both).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import replace_head  # noqa: E402
from service import dataset  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RUNS = 3
CONNECTIONS = (32, 64)
# Decode, score and one autocommitted INSERT per request (bench/baseline.py): what committing each request costs.
COMMITTING = "ceiling: committing POST"
BATCH_SIZE = 100
# The latency target for POST /decisions at the highest connection count.
P99_TARGET_MS = 15.0


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int


def work_directory(prefix: str) -> Path:
    """A directory for a bench's logs and scripts, removed when the bench's process exits, however it exits."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk (Debian package)", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    )
    return shutil.which("wrk") or "wrk"


def web_command(app: str | None = None) -> str:
    line = next(line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    command = line.partition(":")[2].strip()
    return command.replace("service.app:app", app) if app else command


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, env: dict[str, str], app: str | None, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.started = time.monotonic()
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                ["bash", "-c", "exec " + web_command(app)],
                cwd=ROOT,
                env={**env, "PORT": str(self.port)},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait(self, path: str) -> float:
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited early ({self.process.returncode})")
            try:
                with urllib.request.urlopen(self.url + path, timeout=1):
                    return time.monotonic() - self.started
            except OSError as exc:
                if getattr(exc, "code", None) == 405:  # the baseline has no GET route
                    return time.monotonic() - self.started
            time.sleep(0.02)

    def rss_mib(self) -> float:
        """Resident memory of the serving processes (the workers, or the single process)."""
        pids = [self.process.pid]
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        total = 0
        for pid in pids[1:] or pids:
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        return total / 1024

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wrk(binary: str, url: str, script: Path, connections: int, seconds: float, *script_args: str) -> Sample:
    out = subprocess.run(
        [
            binary,
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(script),
            url,
            "--",
            *script_args,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def percentile(p: str) -> float:
        value, unit = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return Sample(rps, percentile("50"), percentile("99"), int(non_2xx.group(1)) if non_2xx else 0)


def lua_post(path: str, body: bytes, target: Path) -> Path:
    target.write_text(
        f'wrk.method = "POST"\nwrk.path = "{path}"\nwrk.body = {json.dumps(body.decode())}\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return target


def lua_get(ids_file: Path, target: Path, sequential: bool) -> Path:
    """GET /decisions/{id}; random ids (warm cache) or each id once, in turn (cold cache)."""
    pick = (
        "local i = counter; counter = counter + step; return ids[(i % #ids) + 1]"
        if sequential
        else "return ids[math.random(#ids)]"
    )
    target.write_text(
        f"""
local threads = {{}}
local thread_count = 0
function setup(thread)
  thread:set("offset", thread_count)
  thread_count = thread_count + 1
  table.insert(threads, thread)
end
function init(args)
  ids = {{}}
  for line in io.lines("{ids_file}") do ids[#ids + 1] = line end
  -- args[1]: where this run starts in the id list, so that cold runs never repeat an id
  counter = tonumber(args[1] or "0") + offset
  step = 2
end
local function next_id() {pick} end
function request()
  return wrk.format("GET", "/decisions/" .. next_id())
end
"""
    )
    return target


def seed(url: str, applicants: list[dict[str, Any]], count: int) -> list[str]:
    """Commit `count` decisions through the batch endpoint; their ids."""
    ids: list[str] = []

    def body_for(start: int) -> bytes:
        return json.dumps({"applicants": [applicants[(start + k) % len(applicants)] for k in range(1000)]}).encode()

    while len(ids) < count:
        request = urllib.request.Request(
            url + "/decisions/batch", data=body_for(len(ids)), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            ids += [d["id"] for d in json.loads(response.read())["decisions"]]
    return ids


def warm(url: str, ids: list[str]) -> None:
    """GET each id once, so that every one of them is in the cache (batches are not cached on write)."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port)
    try:
        for decision_id in ids:
            connection.request("GET", f"/decisions/{decision_id}")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"warming the cache: GET {decision_id} answered {response.status}")
    finally:
        connection.close()


def median(samples: list[Sample]) -> Sample:
    return Sample(
        statistics.median(s.rps for s in samples),
        statistics.median(s.p50_ms for s in samples),
        statistics.median(s.p99_ms for s in samples),
        sum(s.non_2xx for s in samples),
    )


COLD_IDS_PER_RUN = 60_000


def measure(binary: str, targets: dict[str, tuple[str, Path]], seconds: float) -> dict[tuple[str, int], Sample]:
    samples: dict[tuple[str, int], list[Sample]] = {}
    run = 0
    for connections in CONNECTIONS:
        for _ in range(RUNS):
            for name, (url, script) in targets.items():  # alternate targets within each round
                offset = str(run * COLD_IDS_PER_RUN)
                samples.setdefault((name, connections), []).append(
                    wrk(binary, url, script, connections, seconds, offset)
                )
            run += 1
    return {key: median(values) for key, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    binary = ensure_wrk()
    work = work_directory("bench-")
    applicants = [msgspec.to_builtins(a) for a in dataset.load().applicants]
    single = json.dumps(applicants[1]).encode()
    batch = json.dumps({"applicants": applicants[:BATCH_SIZE]}).encode()
    post = lua_post("/decisions", single, work / "post.lua")
    post_batch = lua_post("/decisions/batch", batch, work / "batch.lua")

    dbname = f"credit_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(ADMIN_URL, autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    database_url = re.sub(r"/[^/]*$", f"/{dbname}", ADMIN_URL)
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "API_KEYS", "LOG_"))}
    base_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base_env['PATH']}"
    env = {
        **base_env,
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": prefix,
        # Default logging: one access line per request is part of the cost.
    }
    tables: list[str] = []
    servers: list[Server] = []
    try:
        for workers in args.workers:
            worker_env = {**env, "WEB_CONCURRENCY": str(workers)}
            ceiling = Server(worker_env, "bench.baseline:app", work / f"baseline-{workers}.log")
            service = Server(worker_env, None, work / f"service-{workers}.log")
            servers += [ceiling, service]
            ceiling.wait("/decisions")
            ready = service.wait("/health/ready")
            # On the service's table, which the service has just created.
            committing = Server(worker_env, "bench.baseline:committing_app", work / f"committing-{workers}.log")
            servers.append(committing)
            committing.wait("/decisions")
            ids = seed(service.url, applicants, 20_000)
            (work / "warm.txt").write_text("\n".join(ids[:5000]) + "\n")
            warm(service.url, ids[:5000])
            # Cold: ids committed but never read, each requested once, so every GET misses the cache.
            cold_ids = seed(service.url, applicants, COLD_IDS_PER_RUN * RUNS * len(CONNECTIONS))
            (work / "cold.txt").write_text("\n".join(cold_ids) + "\n")
            get_warm = lua_get(work / "warm.txt", work / "get_warm.lua", sequential=False)
            get_cold = lua_get(work / "cold.txt", work / "get_cold.lua", sequential=True)
            # Warm up every path once.
            for url, script in (
                (ceiling.url, post),
                (committing.url, post),
                (service.url, post),
                (service.url, get_warm),
                (service.url, post_batch),
            ):
                wrk(binary, url, script, 32, 2)
            results = measure(
                binary,
                {
                    "ceiling: decode-only POST": (ceiling.url, post),
                    COMMITTING: (committing.url, post),
                    "POST /decisions": (service.url, post),
                    "GET /decisions/{id}, cache warm": (service.url, get_warm),
                    "POST /decisions/batch (100)": (service.url, post_batch),
                },
                args.seconds,
            )
            flush_prefix(prefix)
            cold = measure(binary, {"GET /decisions/{id}, cache cold": (service.url, get_cold)}, args.seconds)
            results.update(cold)
            rss = service.rss_mib()
            ceiling.stop()
            committing.stop()
            service.stop()
            tables.append(render(results, workers, ready, rss))
            print(tables[-1], flush=True)
    finally:
        for server in servers:  # also when a run failed half-way: never leave a server behind
            if server.process.poll() is None:
                server.stop()
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
        admin.close()
        flush_prefix(prefix)
        shutil.rmtree(work, ignore_errors=True)
    write_results(tables, args)


def flush_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])
    finally:
        client.close()


def render(results: dict[tuple[str, int], Sample], workers: int, ready: float, rss: float) -> str:
    ceiling = {c: results[("ceiling: decode-only POST", c)].rps for c in CONNECTIONS}
    rows = [
        f"### {workers} worker{'s' if workers > 1 else ''}",
        "",
        "| endpoint | connections | req/s | decisions/s | p50 ms | p99 ms | non-2xx | ratio to ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (name, connections), sample in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        decisions = sample.rps * (BATCH_SIZE if "batch" in name else 1)
        ratio = sample.rps / ceiling[connections]
        rows.append(
            f"| {name} | {connections} | {sample.rps:,.0f} | {decisions:,.0f} | {sample.p50_ms:.2f} | "
            f"{sample.p99_ms:.2f} | {sample.non_2xx} | {ratio:.2f} |"
        )
    against = ", ".join(
        f"{results[('POST /decisions', c)].rps / results[(COMMITTING, c)].rps:.2f} times at {c} connections"
        for c in CONNECTIONS
    )
    rows += [
        "",
        f"Process start to ready: {ready:.2f} s. Worker RSS after load: {rss:.0f} MiB. POST /decisions against the"
        f" committing ceiling (one autocommitted INSERT per request, bench/baseline.py): {against}.",
    ]
    # wrk keeps every connection busy, so mean latency = connections / throughput (Little's law):
    # a p99 target at N connections is out of reach below N / target requests per second.
    top = max(CONNECTIONS)
    post = results[("POST /decisions", top)]
    ceiling_p99 = results[("ceiling: decode-only POST", top)].p99_ms
    rows.append(
        f"At {top} connections the mean latency is {top} / req/s (Little's law): POST /decisions at "
        f"{post.rps:,.0f} req/s cannot average under {1000 * top / post.rps:.1f} ms, and a p99 of "
        f"{P99_TARGET_MS:g} ms needs over {1000 * top / P99_TARGET_MS:,.0f} req/s. The decode-only "
        f"ceiling's own p99 here is {ceiling_p99:.1f} ms."
    )
    return "\n".join(rows)


def write_results(tables: list[str], args: argparse.Namespace) -> None:
    import httptools
    import psycopg_pool
    import sklearn
    import starlette
    import uvicorn
    import uvloop

    pg_version = psycopg.connect(ADMIN_URL).execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    redis_version = redis.Redis.from_url(REDIS_URL).info()["redis_version"]
    header = f"""# Benchmark results

Written by `make bench` (`bench/run.py`) on {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}.
wrk, 2 threads, {args.seconds:g} s per run; each figure is the median of {RUNS} runs, alternating
between targets. The load generator shares the machine's cores with the server.
"ratio to ceiling" compares req/s with the decode-only app measured in the same run and with the
same uvicorn flags. Every 201 is a committed row.

Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}.
Versions: starlette {starlette.__version__}, uvicorn {uvicorn.__version__}, uvloop {uvloop.__version__},
httptools {httptools.__version__}, msgspec {msgspec.__version__}, psycopg {psycopg.__version__},
psycopg_pool {psycopg_pool.__version__}, redis-py {redis.__version__}, scikit-learn {sklearn.__version__};
PostgreSQL {pg_version}, Redis {redis_version}.

"""
    # Sections the other bench scripts wrote (## ...) stay.
    replace_head(header + "\n\n".join(tables))


if __name__ == "__main__":
    main()
