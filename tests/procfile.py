"""The service as a platform runs it: the Procfile's web: line in a process of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent


def procfile_command(process_type: str) -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        kind, _, command = line.partition(":")
        if kind.strip() == process_type:
            return command.strip()
    raise AssertionError(f"Procfile has no {process_type}: line")


def service_environment(database_url: str, redis_url: str, **settings: str) -> dict[str, str]:
    """This process's environment less any service settings, plus the given ones, for a Procfile process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "API_KEYS", "LOG_"))}
    return {
        **env,
        # The venv's uvicorn, as `make run` puts it on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        # Short-lived entries: a run that dies before its clean-up leaves nothing for long.
        "CACHE_TTL": "600",
        **settings,
    }


# How a service stopped by SIGTERM exits after its clean shutdown: 143 (128 + SIGTERM) through Python, so
# its metrics directory is removed first; 0 where uvicorn's supervisor returns on its own. Never killed by
# the signal's default action (-15), which would skip that.
STOPPED = (0, 128 + signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Service:
    """One uvicorn process from the Procfile, its log in a file, its port free for it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log_path = log
        self.started = time.monotonic()
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                # exec: the signal must reach uvicorn itself, as on Heroku and Kubernetes.
                ["bash", "-c", "exec " + procfile_command("web")],
                cwd=ROOT,
                env={**env, "PORT": str(self.port)},
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.url = f"http://127.0.0.1:{self.port}"
        self.app_name = f"credit-scoring-{self.process.pid}"

    def wait_ready(self, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"service exited early:\n{self.log()}"
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"service not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: signal.Signals, timeout: float = 30) -> tuple[int, float]:
        sent = time.monotonic()
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        return code, time.monotonic() - sent

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def serving(database_url: str, redis_url: str, log: Path, **settings: str) -> Iterator[Service]:
    """A service from the Procfile with these settings, ready; stopped with SIGTERM on leaving."""
    service = Service(service_environment(database_url, redis_url, **settings), log)
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop(signal.SIGTERM)
