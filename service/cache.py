"""The decision cache: Redis when REDIS_URL is set, else an in-process LRU with TTL.

The cache is best-effort. Its methods never raise: a failure is logged once per
outage, counted, and the caller goes on with the system of record. While Redis is
down we do not call it on every request: after a failure it is skipped for a
back-off period that doubles up to a ceiling, then one call probes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar, cast

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service import metrics
from service.coalesce import Coalescer
from service.settings import Settings, mask_url

logger = logging.getLogger(__name__)
T = TypeVar("T")

KEY_PREFIX = "decision:"
# An erased decision's marker: while it lives, no write puts the decision back in the cache. A write racing
# the erasure (a GET that read the row just before the erasure committed) comes within a request's bound
# of it; a minute is many times that.
ERASED_PREFIX = "erased:"
ERASED_TTL = 60
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
# SET each KEYS[i] to ARGV[i + 3] with a TTL of ARGV[1] seconds, unless the decision is marked erased (the
# marker's name is ARGV[2] followed by the key from position ARGV[3] on: the decision's id).
_SET_ALL = """
local skip = tonumber(ARGV[3])
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', ARGV[2] .. string.sub(key, skip)) == 0 then
    redis.call('SET', key, ARGV[i + 3], 'EX', ARGV[1])
  end
end
return #KEYS
"""
# Mark each decision erased (for ARGV[1] seconds) and delete its cached copy.
_ERASE_ALL = """
local skip = tonumber(ARGV[3])
for _, key in ipairs(KEYS) do
  redis.call('SET', ARGV[2] .. string.sub(key, skip), '1', 'EX', ARGV[1])
  redis.call('DEL', key)
end
return #KEYS
"""
# How long the flusher waits for more writes before its call to Redis.
FLUSH_LINGER = 0.005
# Cache writes waiting for the flusher; beyond this they are dropped.
MAX_PENDING = 50_000
# Most keys one MGET asks for; the rest wait for the next round.
MAX_READ = 1_000


class Cache(Protocol):
    description: str
    errors: int
    hits: int
    misses: int

    async def get(self, decision_id: uuid.UUID) -> bytes | None: ...

    def set_many(self, items: Sequence[tuple[uuid.UUID, bytes]]) -> None:
        """Store the entries, or queue them for a writer: returns at once, never waits."""

    async def delete(self, ids: Sequence[uuid.UUID]) -> bool: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class _Breaker:
    """Keeps calls off a dead Redis: after it fails, nothing calls it until the back-off
    ends; then a single probe does, and its answer decides. Logs once per transition."""

    def __init__(self) -> None:
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_INITIAL
        self._probe_in_flight = False

    def admit(self, force: bool = False) -> bool | None:
        """None: skip Redis. False: an ordinary call. True: this call is the probe."""
        if self.down_since is None:
            return False
        if not force and (self._probe_in_flight or time.monotonic() < self._retry_at):
            return None
        self._probe_in_flight = True
        return True

    def would_admit(self) -> bool:
        """Whether a call now would reach Redis (it is up, or a probe is due)."""
        return self.down_since is None or (not self._probe_in_flight and time.monotonic() >= self._retry_at)

    def failed(self, probe: bool, action: str, exc: Exception) -> bool:
        """Record a failure; True when the pool should be dropped (we just went down, or a probe failed)."""
        now = time.monotonic()
        if probe:
            self._probe_in_flight = False
        if self.down_since is None:
            self.down_since = now
            self._backoff = BACKOFF_INITIAL
            self._retry_at = now + self._backoff
            logger.warning(
                "Redis cache unavailable (%s failed: %s); serving from the system of record, probing again in %.0f s",
                action,
                type(exc).__name__,
                self._backoff,
            )
            return True
        if probe:
            # Only a failed probe lengthens the back-off: the many calls that were
            # already in flight when Redis died say nothing new.
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
            self._retry_at = now + self._backoff
        return probe

    def succeeded(self, probe: bool) -> None:
        if probe:
            self._probe_in_flight = False
            if self.down_since is not None:
                logger.info("Redis cache is back after %.1f s", time.monotonic() - self.down_since)
                self.down_since = None


class RedisCache:
    def __init__(
        self, url: str, *, timeout: float, prefix: str, ttl: int, client_name: str, max_connections: int = 10
    ) -> None:
        self.description = f"Redis at {mask_url(url)}"
        self._prefix = prefix + KEY_PREFIX
        # What _SET_ALL and _ERASE_ALL need to name a decision's erased marker.
        self._marker_args: list[str | int] = [prefix + ERASED_PREFIX, len(self._prefix) + 1]
        self._ttl = ttl
        # No retries and short timeouts: a slow cache must never slow a decision.
        # A blocking pool: when all connections are busy a call waits (briefly)
        # for one, where the default pool would fail at once.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name=client_name,
        )
        # from_pool: the client owns the pool, so aclose() closes its connections too.
        self.client = redis.Redis.from_pool(pool)
        # EVALSHA, falling back to EVAL when the server does not know the script yet.
        self._set_all = self.client.register_script(_SET_ALL)
        self._erase_all = self.client.register_script(_ERASE_ALL)
        self.max_connections = max_connections
        self.errors = self.hits = self.misses = 0
        self._breaker = _Breaker()
        # Writes wait here for the flusher: off the response path, one pipeline per round.
        self._pending: dict[uuid.UUID, bytes] = {}
        self._flusher: asyncio.Future[None] | None = None
        # One MGET in flight at a time; reads that arrive meanwhile go in the next.
        self._reads = Coalescer(self._get_many, max_items=MAX_READ, max_in_flight=1)

    async def _call(self, action: str, call: Callable[[], Awaitable[T]], force: bool = False) -> tuple[bool, T | None]:
        """(answered, result) of one Redis call, through the breaker; never raises."""
        probe = self._breaker.admit(force)
        if probe is None:
            return False, None
        try:
            result = await call()
        except (redis.RedisError, OSError) as exc:
            self.errors += 1
            metrics.count(metrics.cache_errors)
            if self._breaker.failed(probe, action, exc):
                # Every pooled connection may be dead (a restarted server): drop them
                # all, so the next probe dials afresh instead of the next stale socket.
                with contextlib.suppress(redis.RedisError, OSError):
                    await self.client.connection_pool.disconnect()
            return False, None
        self._breaker.succeeded(probe)
        return True, result

    async def get(self, decision_id: uuid.UUID) -> bytes | None:
        pending = self._pending.get(decision_id)
        if pending is not None:  # written a moment ago, not yet flushed
            value: bytes | None = pending
        elif not self._breaker.would_admit():  # Redis is down and no probe is due
            value = None
        else:
            # Reads that arrive together share one MGET: one round trip, one pooled
            # connection and one reply to parse for all of them, where a GET each
            # cost more CPU than answering the request itself.
            value = await self._reads.submit(decision_id)
        if value is None:
            self.misses += 1
            metrics.count(metrics.cache_misses)
        else:
            self.hits += 1
            metrics.count(metrics.cache_hits)
        return value

    async def _get_many(self, ids: list[uuid.UUID]) -> list[bytes | None]:
        keys = [f"{self._prefix}{decision_id}" for decision_id in ids]
        # On any failure every reader gets a miss and goes on to the system of record.
        _, values = await self._call("GET", functools.partial(self.client.mget, keys))
        # No decode_responses: the values are bytes.
        return cast(list[bytes | None], values) if values is not None else [None] * len(ids)

    def set_many(self, items: Sequence[tuple[uuid.UUID, bytes]]) -> None:
        """Queue the entries and return at once; the flusher writes them in one pipeline."""
        if not self._breaker.would_admit():  # Redis is down and no probe is due: drop
            return
        if len(self._pending) >= MAX_PENDING:  # Redis cannot keep up: drop, it is only a cache
            self.errors += len(items)
            return
        self._pending.update(items)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        # Linger a moment: writes of requests answered together go in one call, and below saturation the
        # call to Redis does not land in the middle of the next request.
        await asyncio.sleep(FLUSH_LINGER)
        while self._pending:
            items, self._pending = self._pending, {}

            keys = [f"{self._prefix}{decision_id}" for decision_id in items]
            # One command (and one reply to parse) for everything queued, where a
            # pipeline of SETs costs a reply, and a timeout, per key.
            args: list[str | int | bytes] = [self._ttl, *self._marker_args, *items.values()]
            await self._call("SET", functools.partial(self._set_all, keys=keys, args=args))

    async def delete(self, ids: Sequence[uuid.UUID]) -> bool:
        """Remove the entries now (erasure, retention); False when Redis could not be told: the caller must retry."""
        for decision_id in ids:
            self._pending.pop(decision_id, None)
        if not ids:
            return True
        # A write already on its way must land before the DEL, not after it.
        if self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        keys = [f"{self._prefix}{decision_id}" for decision_id in ids]
        # Forced past the breaker: an erasure must reach Redis or fail, never be skipped. The marker keeps a
        # write that raced the erasure (a read of the row from just before it) from bringing the copy back.
        args: list[str | int] = [ERASED_TTL, *self._marker_args]
        answered, _ = await self._call("DEL", functools.partial(self._erase_all, keys=keys, args=args), force=True)
        return answered

    async def ping(self) -> bool:
        # Readiness probes always ask Redis, even while backing off: a cheap, steady probe.
        answered, _ = await self._call("PING", self.client.ping, force=True)
        return answered

    async def max_clients(self) -> int | None:
        """Redis's maxclients, or None when the server will not tell (CONFIG disabled, or down)."""
        try:
            reply = await self.client.config_get("maxclients")
        except (redis.RedisError, OSError):
            return None
        value = dict(reply).get("maxclients")
        return int(value) if value is not None else None

    async def close(self) -> None:
        # Whatever is still queued is written first (the lifecycle bounds how long this may take).
        if self._flusher is not None and not self._flusher.done():
            await self._flusher
        await self.client.aclose()


class MemoryCache:
    """The default without Redis: per process, bounded, entries expire after the TTL."""

    def __init__(self, *, ttl: int, max_entries: int = 10_000) -> None:
        self.description = f"in-process cache (up to {max_entries} decisions, TTL {ttl} s)"
        self._ttl = ttl
        self._max_entries = max_entries
        self._entries: OrderedDict[uuid.UUID, tuple[float, bytes]] = OrderedDict()
        # Erased decisions, and until when no write may cache them again (see ERASED_TTL).
        self._erased: dict[uuid.UUID, float] = {}
        self.errors = self.hits = self.misses = 0

    async def get(self, decision_id: uuid.UUID) -> bytes | None:
        entry = self._entries.get(decision_id)
        if entry is None or entry[0] <= time.monotonic():
            if entry is not None:
                del self._entries[decision_id]
            self.misses += 1
            metrics.count(metrics.cache_misses)
            return None
        self._entries.move_to_end(decision_id)
        self.hits += 1
        metrics.count(metrics.cache_hits)
        return entry[1]

    def set_many(self, items: Sequence[tuple[uuid.UUID, bytes]]) -> None:
        now = time.monotonic()
        expires = now + self._ttl
        for decision_id, payload in items:
            if self._erased and self._erased.get(decision_id, 0.0) > now:
                continue
            self._entries[decision_id] = (expires, payload)
            self._entries.move_to_end(decision_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def delete(self, ids: Sequence[uuid.UUID]) -> bool:
        # This process's copy only: another worker's in-process cache keeps its copy until CACHE_TTL.
        now = time.monotonic()
        self._erased = {i: until for i, until in self._erased.items() if until > now}
        for decision_id in ids:
            self._entries.pop(decision_id, None)
            self._erased[decision_id] = now + ERASED_TTL
        return True

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._entries.clear()


def open_cache(settings: Settings, client_name: str) -> RedisCache | MemoryCache:
    """The cache the settings ask for: Redis when REDIS_URL is set, else the in-process one."""
    if not settings.redis_url:
        return MemoryCache(ttl=settings.cache_ttl)
    return RedisCache(
        settings.redis_url,
        timeout=settings.redis_timeout,
        prefix=settings.redis_key_prefix,
        ttl=settings.cache_ttl,
        client_name=client_name,
        max_connections=settings.redis_pool_size,
    )
