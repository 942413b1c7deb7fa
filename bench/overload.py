"""A load of many connections that each post as fast as they are answered, timing 2xx and 503 apart.

wrk reports one latency distribution for all answers; an overloaded service answers
most requests 503 at once and the rest slowly, and the two must be told apart. This
client is a plain asyncio protocol per connection (uvloop), closed loop: each
connection sends its next POST /decisions as soon as the previous one is answered.
Run: python -m bench.overload URL [--connections 1000] [--seconds 10]; prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service import dataset


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Poster(asyncio.Protocol):
    def __init__(self, load: Load) -> None:
        self.load = load
        self.buffer = b""
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.load.stopping or self.transport is None:
            return
        self.sent = time.perf_counter()
        self.transport.write(self.load.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            status = int(head[9:12])
            self.load.record(status, time.perf_counter() - self.sent, rest[:length])
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost += 0 if self.load.stopping else 1


class Load:
    def __init__(self, url: str, connections: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.connections = connections
        body = msgspec.json.encode(msgspec.to_builtins(dataset.load().applicants[1]))
        self.request = (
            f"POST /decisions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.latencies: dict[int, list[float]] = {}
        # The id of every decision answered 201, to check afterwards that each was committed.
        self.committed: list[str] = []
        self.stopping = False
        self.lost = 0
        self.refused = 0

    def record(self, status: int, seconds: float, body: bytes) -> None:
        self.latencies.setdefault(status, []).append(seconds)
        if status == 201:
            start = body.index(b'"id":"') + 6
            self.committed.append(body[start : start + 36].decode())

    async def run(self, seconds: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        transports = []
        for _ in range(self.connections):
            try:
                transport, _ = await loop.create_connection(lambda: Poster(self), self.host, self.port)
                transports.append(transport)
            except OSError:
                self.refused += 1
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - started
        self.stopping = True
        for transport in transports:
            transport.close()
        return self.summary(elapsed)

    def summary(self, elapsed: float) -> dict[str, Any]:
        found: dict[str, Any] = {"connections": self.connections, "seconds": round(elapsed, 2)}
        for status, values in sorted(self.latencies.items()):
            found[str(status)] = {
                "count": len(values),
                "per_second": round(len(values) / elapsed),
                "p50_ms": round(1000 * (percentile(values, 0.5) or 0), 2),
                "p99_ms": round(1000 * (percentile(values, 0.99) or 0), 2),
                "max_ms": round(1000 * max(values), 2),
                "mean_ms": round(1000 * statistics.fmean(values), 2),
            }
        found["connections_lost"] = self.lost
        found["connections_refused"] = self.refused
        return found


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(Load(args.url, args.connections).run(args.seconds))))


if __name__ == "__main__":
    main()
