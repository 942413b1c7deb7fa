"""Private PostgreSQL and Redis servers that a chaos scenario may stop, restart and kill.

The machine's own servers are shared with other test runs, so outages are staged
on instances of our own: a fresh PostgreSQL cluster (initdb) and a redis-server,
each on a free port, removed at the end.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import redis

from tests.procfile import free_port


def _pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql.")


class PrivatePostgres:
    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="chaos-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        # PostgreSQL refuses to run as root: as root, run it as the postgres user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE credit")

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as, str(self.bindir / tool), *args], check=True, capture_output=True, timeout=120)

    def url(self, dbname: str = "credit") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _options(self) -> str:
        return f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=100"

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(), "-w", "-t", "60", "start")

    def stop(self) -> None:
        # fast: disconnect clients at once, as a failover or a restart does.
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def connections(self, application_prefix: str = "credit-scoring-") -> int:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'credit' AND application_name LIKE %s",
                (application_prefix + "%",),
            ).fetchone()
            assert row is not None
            return int(row[0])

    def stored(self, ids: list[str]) -> int:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM decisions WHERE id = ANY(%s::uuid[])", (ids,)).fetchone()
            assert row is not None
            return int(row[0])

    def stored_keys(self, keys: list[str]) -> int:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM decisions WHERE idempotency_key = ANY(%s)", (keys,)).fetchone()
            assert row is not None
            return int(row[0])

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(port=self.port, socket_timeout=1)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def clients(self, name_prefix: str = "credit-scoring-") -> int:
        client = redis.Redis(port=self.port, socket_timeout=2)
        try:
            return sum(1 for c in client.client_list() if str(c.get("name", "")).startswith(name_prefix))
        finally:
            client.close()

    def close(self) -> None:
        self.stop()
