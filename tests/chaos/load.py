"""Clients that keep posting decisions while a scenario breaks things around them.

Each client behaves as a careful lender would: every decision carries an
Idempotency-Key, and a request that fails in transport (connection refused or
reset) is retried with the same key, so a decision committed just before a
crash is answered, not duplicated. Decision ids from every 201 (and from every
200 replay) are kept, to check afterwards that none was lost.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Self

import httpx2 as httpx


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    # connection refused: the service is not listening (stopping, stopped, restarting)
    refused: int = 0
    # any other transport failure: a connection closed under a request
    dropped: int = 0
    # keys whose request never got an answer before the load stopped
    unanswered: list[str] = field(default_factory=list)
    # id of every decision the service said it committed (201, or 200 for a replay)
    committed: list[str] = field(default_factory=list)

    @property
    def unexpected_5xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500 and status != 503)

    def merge(self, other: LoadResult) -> None:
        self.statuses.update(other.statuses)
        self.refused += other.refused
        self.dropped += other.dropped
        self.committed.extend(other.committed)
        self.unanswered.extend(other.unanswered)


class Background:
    """Work beside a scenario, on a thread of its own, from entering the `with` block until it ends (or stop()):
    a subclass's `_loop` runs until `_stop` is set."""

    join_seconds = 30.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.join_seconds)

    def _loop(self) -> None:
        raise NotImplementedError


class Load(Background):
    """`clients` concurrent posters against `url`, on a thread of their own, until stop()."""

    join_seconds = 60.0

    def __init__(self, url: str, applicants: list[dict[str, Any]], clients: int = 32) -> None:
        super().__init__()
        self.url = url
        self.applicants = applicants
        self.clients = clients
        self.result = LoadResult()

    def stop(self) -> LoadResult:  # type: ignore[override]
        super().stop()
        return self.result

    def _loop(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, timeout=15, limits=limits) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        n = index
        while not self._stop.is_set():
            n += self.clients
            applicant = self.applicants[n % len(self.applicants)]
            key = uuid.uuid4().hex
            # Retry transport failures with the same key until answered (or told to stop).
            while True:
                try:
                    response = await client.post("/decisions", json=applicant, headers={"Idempotency-Key": key})
                except httpx.TransportError as exc:
                    # Refused: never reached the service. Dropped: sent, then the connection broke.
                    if isinstance(exc, httpx.ConnectError):
                        self.result.refused += 1
                    else:
                        self.result.dropped += 1
                    if self._stop.is_set():
                        self.result.unanswered.append(key)
                        return
                    await asyncio.sleep(0.05)
                    continue
                if response.status_code == 409:  # our earlier attempt is still being processed
                    self.result.statuses[409] += 1
                    await asyncio.sleep(0.05)
                    continue
                break
            self.result.statuses[response.status_code] += 1
            if response.status_code in (200, 201):
                self.result.committed.append(response.json()["id"])
            elif response.status_code == 503:
                await asyncio.sleep(0.05)


async def _read_all(url: str, ids: list[str], clients: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    queue = list(ids)
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:

        async def reader() -> None:
            while queue:
                decision_id = queue.pop()
                statuses[(await client.get(f"/decisions/{decision_id}")).status_code] += 1

        await asyncio.gather(*(reader() for _ in range(clients)))
    return statuses


def read_all(url: str, ids: list[str], clients: int = 32) -> Counter[int]:
    """GET every id; the statuses seen."""
    return asyncio.run(_read_all(url, ids, clients))
