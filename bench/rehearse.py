"""The scale-out rehearsal (`make rehearse`; tests/test_rehearsal.py runs a short one in CI).

Three replicas, each the Procfile's web: line on a port of its own, behind HAProxy
(deploy/haproxy/haproxy.cfg: checks /health/ready), all through PgBouncer in
transaction pooling mode (deploy/pgbouncer/pgbouncer.ini) to one PostgreSQL
database of the rehearsal's own, and one Redis (a key prefix of its own).

1. Throughput with wrk at 64 connections: one replica straight, then all three
   through HAProxy (median of 3 runs each).
2. The rolling restart: 64 clients post decisions through HAProxy without pause
   while each replica in turn gets SIGTERM, is waited for, started again and
   waited for until ready and back in HAProxy. Every answer is counted; after it,
   every decision answered 201 is looked up in PostgreSQL; PostgreSQL's
   connections to the database are sampled every 100 ms throughout.

With `--image` (`make rehearse IMAGE=localhost/credit-scoring:latest`, after
`make image`), each replica runs from the container image instead: the image's
command as its user, by `buildah run` with chroot isolation (the machine that
wrote this can build images but cannot run a container runtime).

Prints the table (and, from `make rehearse`, writes it into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import msgspec
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import replace_section  # noqa: E402
from bench.run import (  # noqa: E402
    ADMIN_URL,
    REDIS_URL,
    ensure_wrk,
    flush_prefix,
    free_port,
    lua_post,
    web_command,
    work_directory,
    wrk,
)
from service import dataset  # noqa: E402
from tests.pooler import HAProxy, PgBouncer  # noqa: E402

CLIENTS = 64
# Server connections PgBouncer may open to PostgreSQL for the service's database and user.
POOLER_SIZE = 10


# The settings a replica run from the image is given (the image has its own PATH and the rest).
_SETTINGS = (
    "DATABASE_URL",
    "DATABASE_DIRECT_URL",
    "REDIS_URL",
    "REDIS_KEY_PREFIX",
    "SHUTDOWN_TIMEOUT",
    "SHUTDOWN_DELAY",
)


class Replica:
    """One replica: the Procfile's web: line on its own port (or the image's command), restartable on that port."""

    def __init__(self, env: dict[str, str], port: int, log: Path, image: str | None = None) -> None:
        self.env, self.port, self.log, self.image = env, port, log, image
        self.process: subprocess.Popen[bytes] | None = None
        self.container = None
        if image is not None:
            made = subprocess.run(["buildah", "from", image], check=True, capture_output=True, text=True)
            self.container = made.stdout.strip()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = ["bash", "-c", "exec " + web_command()]
        if self.container is not None:
            # The image's CMD, as its user, on the host's network (so the ports are as above).
            settings = [f"--env={name}={self.env[name]}" for name in _SETTINGS if name in self.env]
            command = [
                "buildah", "run", "--isolation", "chroot", "--network", "host", "--user", "10001:10001",
                f"--env=PORT={self.port}", "--env=LOG_LEVEL=WARNING", *settings, self.container, "--",
                "bash", "-c", 'eval exec "$(sed -n "s/^web: //p" Procfile)"',
            ]  # fmt: skip
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**self.env, "PORT": str(self.port)},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(self.url + "/health/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"replica on {self.port} not ready after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        assert self.process is not None
        target = self.process.pid
        if self.container is not None:  # buildah run passes on no signal: the service itself gets it
            found = subprocess.run(
                ["pgrep", "-f", "-u", "10001", "--", f"--port {self.port}"], capture_output=True, text=True
            )
            target = int(found.stdout.split()[0])
        os.kill(target, signal.SIGTERM)
        return self.process.wait(60)

    def kill(self) -> None:
        """Stop it if it still runs: SIGTERM to the service, and SIGKILL if that does not end it."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.stop()
        except (IndexError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()

    def remove(self) -> None:
        if self.container is not None:
            subprocess.run(["buildah", "rm", self.container], check=False, capture_output=True)


@dataclass
class Report:
    direct_rps: float
    balanced_rps: float
    requests: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    failures: int = 0
    lost: int = 0
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    backends_max: int = 0
    pooler_size: int = POOLER_SIZE
    listening: int = 0

    def failure_kinds(self) -> str:
        kinds = {status: n for status, n in self.statuses.items() if status != "201"}
        return "(" + ", ".join(f"{n} {status}" for status, n in sorted(kinds.items())) + ")" if kinds else ""

    def table(self) -> str:
        return "\n".join(
            [
                "| replicas | clients | requests | 201 | failed | lost | restarts (exit codes) | "
                "PostgreSQL backends, most seen | req/s: one replica direct | req/s: three through HAProxy |",
                "|---|---|---|---|---|---|---|---|---|---|",
                f"| 3 | {CLIENTS} | {self.requests:,} | {self.statuses.get('201', 0):,} | {self.failures}"
                f" {self.failure_kinds()} | {self.lost} | {self.restarts} ({', '.join(map(str, self.exit_codes))})"
                f" | {self.backends_max} (PgBouncer pool {self.pooler_size} + {self.listening} listening)"
                f" | {self.direct_rps:,.0f} | {self.balanced_rps:,.0f} |",
            ]
        )


async def _post_until(url: str, body: bytes, stop: asyncio.Event, answered: list[tuple[str, str | None]]) -> None:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:

        async def client() -> None:
            while not stop.is_set():
                try:
                    response = await http.post("/decisions", content=body, headers={"Content-Type": "application/json"})
                except httpx.HTTPError as exc:
                    answered.append((type(exc).__name__, None))
                    continue
                decision_id = response.json()["id"] if response.status_code == 201 else None
                answered.append((str(response.status_code), decision_id))

        await asyncio.gather(*(client() for _ in range(CLIENTS)))


def _sample_backends(direct_url: str, dbname: str, stop: threading.Event, seen: list[int]) -> None:
    with psycopg.connect(direct_url, autocommit=True) as conn:
        while not stop.is_set():
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,)
            ).fetchone()
            seen.append(int(row[0]) if row else 0)
            time.sleep(0.1)


def rehearse(seconds: float, work: Path, runs: int = 3, image: str | None = None) -> Report:
    """Run the rehearsal: `runs` throughput runs of `seconds` each way, then the restarts."""
    binary = ensure_wrk()
    # First, as it is the one that may be missing: nothing is made before it.
    bouncer = PgBouncer(pool_size=POOLER_SIZE)
    dbname = f"credit_rehearse_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    except BaseException:
        bouncer.close()
        raise
    direct_url = re.sub(r"/[^/]*$", f"/{dbname}", ADMIN_URL)
    prefix = f"rehearse-{uuid.uuid4().hex[:8]}:"
    replicas: list[Replica] = []
    balancer: HAProxy | None = None
    body = msgspec.json.encode(msgspec.to_builtins(dataset.load().applicants[1]))
    script = lua_post("/decisions", body, work / "post.lua")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "API_KEYS", "LOG_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        DATABASE_URL=bouncer.url(dbname),
        DATABASE_DIRECT_URL=direct_url,
        REDIS_URL=REDIS_URL,
        REDIS_KEY_PREFIX=prefix,
        SHUTDOWN_TIMEOUT="10",
        # HAProxy checks every 500 ms and takes a replica out after one failed check: a second is enough.
        SHUTDOWN_DELAY="1",
        LOG_LEVEL="WARNING",
    )
    try:
        replicas = [Replica(env, free_port(), work / f"replica-{n}.log", image) for n in range(1, 4)]
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        balancer = HAProxy([r.port for r in replicas])
        time.sleep(1.5)  # two good checks each
        wrk(binary, balancer.url, script, CLIENTS, 1)  # warm up
        direct, balanced = [], []
        for _ in range(runs):
            direct.append(wrk(binary, replicas[0].url, script, CLIENTS, seconds).rps)
            balanced.append(wrk(binary, balancer.url, script, CLIENTS, seconds).rps)
        report = Report(statistics.median(direct), statistics.median(balanced), listening=len(replicas))

        answered: list[tuple[str, str | None]] = []
        seen: list[int] = []
        sampling = threading.Event()
        sampler = threading.Thread(target=_sample_backends, args=(direct_url, dbname, sampling, seen))
        sampler.start()

        async def drive() -> None:
            stop = asyncio.Event()
            load = asyncio.create_task(_post_until(balancer.url, body, stop, answered))
            await asyncio.sleep(1.0)
            for replica in replicas:
                report.exit_codes.append(await asyncio.to_thread(replica.stop))
                replica.start()
                await asyncio.to_thread(replica.wait_ready)
                await asyncio.sleep(1.5)  # back in HAProxy: two good checks
                report.restarts += 1
            await asyncio.sleep(1.0)
            stop.set()
            await load

        try:
            asyncio.run(drive())
        finally:
            sampling.set()
            sampler.join()
        report.requests = len(answered)
        report.statuses = Counter(status for status, _ in answered)
        report.failures = sum(n for status, n in report.statuses.items() if status != "201")
        committed = [decision_id for _, decision_id in answered if decision_id is not None]
        with psycopg.connect(direct_url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM decisions WHERE id = ANY(%s::uuid[])", (committed,)).fetchone()
        report.lost = len(committed) - int(row[0] if row else 0)
        report.backends_max = max(seen, default=0)
        return report
    finally:
        # Each clean-up runs, whatever the one before it raised.
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(flush_prefix, prefix)
            cleanup.callback(admin.close)
            cleanup.callback(
                admin.execute, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
            cleanup.callback(bouncer.close)
            for replica in replicas:
                cleanup.callback(replica.remove)
                cleanup.callback(replica.kill)
            if balancer is not None:
                cleanup.callback(balancer.close)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="each wrk run (default 5)")
    parser.add_argument("--image", help="run the replicas from this container image (make image)")
    args = parser.parse_args()
    work = work_directory("bench-rehearse-")
    report = rehearse(args.seconds, work, image=args.image)
    table = "\n".join(
        [
            "## The scale-out rehearsal" + (f" from the image {args.image}" if args.image else ""),
            "",
            f"`bench/rehearse.py`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: three replicas (one worker"
            " each) behind HAProxy, through PgBouncer (transaction pooling) to one PostgreSQL, one Redis; all on"
            f" this machine's 2 cores with the load generators. Throughput: wrk, {CLIENTS} connections,"
            f" {args.seconds:g} s, medians of 3. The restart: {CLIENTS} clients posting through HAProxy while each"
            " replica in turn is stopped (SIGTERM), started again and back in HAProxy.",
            "",
            report.table(),
        ]
    )
    print(table)
    replace_section(table)


if __name__ == "__main__":
    main()
