"""Time the service's lifecycle as a platform sees it: process start to ready, SIGTERM to exit, and its memory.

Starts the Procfile's web: line N times (default 5) on the current environment
(DATABASE_URL / REDIS_URL if set, else the embedded defaults), and prints the
medians, with the resident memory of the serving process once ready.
Run: .venv/bin/python -m bench.lifecycle [--runs N]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def web_command() -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("web:"):
            return line.partition(":")[2].strip()
    raise SystemExit("Procfile has no web: line")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one_run() -> tuple[float, float, int, float]:
    port = free_port()
    env = {**os.environ, "PORT": str(port), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.monotonic()
    process = subprocess.Popen(
        ["bash", "-c", "exec " + web_command()],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not ready(f"http://127.0.0.1:{port}/health/ready"):
            if process.poll() is not None or time.monotonic() - started > 60:
                raise SystemExit("the service did not become ready")
            time.sleep(0.01)
        to_ready = time.monotonic() - started
        rss = rss_mib(process.pid)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        return to_ready, time.monotonic() - sent, code, rss
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.runs)]
    backend = "PostgreSQL" if os.environ.get("DATABASE_URL") else "SQLite"
    cache = "Redis" if os.environ.get("REDIS_URL") else "in-process cache"
    print(f"{args.runs} runs, {backend} + {cache}")
    for label, values in (("start to ready", [r[0] for r in runs]), ("SIGTERM to exit (idle)", [r[1] for r in runs])):
        print(f"{label}: median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})")
    print(f"exit codes: {sorted({r[2] for r in runs})}")
    print(f"RSS once ready (one worker): median {statistics.median(r[3] for r in runs):.1f} MiB")


if __name__ == "__main__":
    main()
