"""The decision cache: Redis when REDIS_URL is set, else an in-process LRU with TTL.

The cache is best-effort. Its methods never raise: a failure is logged once per
outage, counted, and the caller goes on with the system of record. While Redis is
down we do not call it on every request: after a failure it is skipped for a
back-off period that doubles up to a ceiling, then one call probes it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service.settings import mask_url

logger = logging.getLogger(__name__)

KEY_PREFIX = "decision:"
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0


class Cache(Protocol):
    description: str
    errors: int
    hits: int
    misses: int

    async def get(self, decision_id: uuid.UUID) -> bytes | None: ...

    async def set_many(self, items: Sequence[tuple[uuid.UUID, bytes]]) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class RedisCache:
    def __init__(
        self, url: str, *, timeout: float, prefix: str, ttl: int, client_name: str, max_connections: int = 10
    ) -> None:
        self.description = f"Redis at {mask_url(url)}"
        self._prefix = prefix + KEY_PREFIX
        self._ttl = ttl
        # No retries and short timeouts: a slow cache must never slow a decision.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=client_name,
            # Bounded, so the connection budget (workers x this) is a real number.
            max_connections=max_connections,
        )
        self.max_connections = max_connections
        self.errors = self.hits = self.misses = 0
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_INITIAL

    def _available(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    def _failed(self, action: str, exc: Exception) -> None:
        self.errors += 1
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._backoff = BACKOFF_INITIAL
            logger.warning(
                "Redis cache unavailable (%s failed: %s); serving from the system of record, retrying in %.0f s",
                action,
                type(exc).__name__,
                self._backoff,
            )
        else:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._retry_at = now + self._backoff

    def _succeeded(self) -> None:
        if self._down_since is not None:
            logger.info("Redis cache is back after %.1f s", time.monotonic() - self._down_since)
            self._down_since = None

    async def get(self, decision_id: uuid.UUID) -> bytes | None:
        if not self._available():
            return None
        try:
            value = cast(bytes | None, await self.client.get(f"{self._prefix}{decision_id}"))
        except (redis.RedisError, OSError) as exc:
            self._failed("GET", exc)
            return None
        self._succeeded()
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    async def set_many(self, items: Sequence[tuple[uuid.UUID, bytes]]) -> None:
        if not items or not self._available():
            return
        try:
            if len(items) == 1:
                decision_id, payload = items[0]
                await self.client.set(f"{self._prefix}{decision_id}", payload, ex=self._ttl)
            else:
                # One round trip for the whole batch; no MULTI, the entries are independent.
                async with self.client.pipeline(transaction=False) as pipe:
                    for decision_id, payload in items:
                        pipe.set(f"{self._prefix}{decision_id}", payload, ex=self._ttl)
                    await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._failed("SET", exc)
            return
        self._succeeded()

    async def ping(self) -> bool:
        try:
            await self.client.ping()
        except (redis.RedisError, OSError) as exc:
            self._failed("PING", exc)
            return False
        self._succeeded()
        return True

    async def max_clients(self) -> int | None:
        """Redis's maxclients, or None when the server will not tell (CONFIG disabled, or down)."""
        try:
            reply = await self.client.config_get("maxclients")
        except (redis.RedisError, OSError):
            return None
        value = dict(reply).get("maxclients")
        return int(value) if value is not None else None

    async def close(self) -> None:
        await self.client.aclose()


class MemoryCache:
    """The default without Redis: per process, bounded, entries expire after the TTL."""

    def __init__(self, *, ttl: int, max_entries: int = 10_000) -> None:
        self.description = f"in-process cache (up to {max_entries} decisions, TTL {ttl} s)"
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[uuid.UUID, tuple[float, bytes]] = OrderedDict()
        self.errors = self.hits = self.misses = 0

    async def get(self, decision_id: uuid.UUID) -> bytes | None:
        entry = self._entries.get(decision_id)
        if entry is None or entry[0] <= time.monotonic():
            if entry is not None:
                del self._entries[decision_id]
            self.misses += 1
            return None
        self._entries.move_to_end(decision_id)
        self.hits += 1
        return entry[1]

    async def set_many(self, items: Sequence[tuple[uuid.UUID, bytes]]) -> None:
        expires = time.monotonic() + self._ttl
        for decision_id, payload in items:
            self._entries[decision_id] = (expires, payload)
            self._entries.move_to_end(decision_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._entries.clear()
