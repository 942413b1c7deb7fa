"""Real PgBouncer and HAProxy processes for tests and the rehearsal, configured from deploy/'s examples.

Each runs on free ports with its configuration written into a directory of its
own (the examples in deploy/ with this machine's ports and paths filled in), and
is stopped, and its directory removed, on close. PgBouncer will not run as root;
as root it is started with `-u postgres`, which must then read its files.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PGBOUNCER_EXAMPLE = ROOT / "deploy" / "pgbouncer" / "pgbouncer.ini"
HAPROXY_EXAMPLE = ROOT / "deploy" / "haproxy" / "haproxy.cfg"


class Missing(Exception):
    """The program is not installed (.ci/run installs it with apt-get)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout} s:\n{log.read_text(errors='replace')}")


def _program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise Missing(f"{name} is not installed (apt-get install {name}); .ci/run installs it")
    return found


class _Process:
    def __init__(self) -> None:
        # Readable by the postgres user PgBouncer drops to (pytest's own tmp directories are not).
        self.directory = Path(tempfile.mkdtemp(prefix="credit-scoring-pooler-"))
        self.directory.chmod(0o755)
        self.log = self.directory / "log.txt"
        self.process: subprocess.Popen[bytes] | None = None

    def _start(self, command: list[str], port: int) -> None:
        try:
            with self.log.open("wb") as output:
                self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=self.directory)
            _wait_for_port(port, self.process, self.log)
        except BaseException:
            self.close()  # the caller never gets the object to close
            raise

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


class PgBouncer(_Process):
    """PgBouncer in transaction pooling mode in front of the machine's PostgreSQL."""

    def __init__(self, pool_size: int = 10, target_port: int = 5432) -> None:
        program = _program("pgbouncer")  # before anything is made that would need removing
        super().__init__()
        self.port = _free_port()
        self.pool_size = pool_size
        (self.directory / "users.txt").write_text('"postgres" ""\n')
        config = PGBOUNCER_EXAMPLE.read_text()
        for name, value in {
            "listen_port": str(self.port),
            "default_pool_size": str(pool_size),
            "auth_file": str(self.directory / "users.txt"),
        }.items():
            config = _set(config, name, value)
        config = config.replace("host=127.0.0.1 port=5432", f"host=127.0.0.1 port={target_port}")
        (self.directory / "pgbouncer.ini").write_text(config)
        for path in self.directory.iterdir():
            path.chmod(0o644)
        as_root = ["-u", "postgres"] if os.geteuid() == 0 else []
        self._start([program, *as_root, str(self.directory / "pgbouncer.ini")], self.port)
        self.log.chmod(0o644)

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"


class HAProxy(_Process):
    """HAProxy in front of the given replicas, checking each on /health/ready."""

    def __init__(self, replica_ports: list[int]) -> None:
        program = _program("haproxy")
        super().__init__()
        self.port = _free_port()
        config = HAPROXY_EXAMPLE.read_text().replace("bind :8080", f"bind 127.0.0.1:{self.port}")
        servers = "\n".join(
            f"    server web{i} 127.0.0.1:{port} check" for i, port in enumerate(replica_ports, start=1)
        )
        # The example's servers are the last lines: replaced by ours.
        config = config[: config.index("    # servers")] + "    # servers\n" + servers + "\n"
        (self.directory / "haproxy.cfg").write_text(config)
        self._start([program, "-db", "-f", str(self.directory / "haproxy.cfg")], self.port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _set(config: str, name: str, value: str) -> str:
    """The config with the line `name = …` set to `value`."""
    lines = config.splitlines()
    for i, line in enumerate(lines):
        if line.split("=", 1)[0].strip() == name:
            lines[i] = f"{name} = {value}"
            return "\n".join(lines) + "\n"
    raise AssertionError(f"{name} is not in {PGBOUNCER_EXAMPLE}")
