"""Retention: erase the applicant's inputs and reference from decisions older than RETENTION_DAYS, then exit.

Run as a one-off command (`python -m service.retention`: the Procfile's
`retention:` process for Heroku Scheduler, a CronJob in deploy/kubernetes). The
decision, its probability, score, reasons, model version and time stay, as the
lender's records need them; what identifies the applicant goes.

Work goes in bounded batches, each its own short transaction, so a run never
holds many rows locked and can be stopped at any point (the next run goes on
where it stopped). PostgreSQL's `FOR UPDATE SKIP LOCKED` lets runs started side
by side take different rows; it is safe while the service serves. A Redis
cache loses its copies of the erased decisions as each batch commits.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import sys
import time
from dataclasses import dataclass

from service import logs, storage
from service.cache import Cache, open_cache
from service.errors import StoreUnavailable
from service.settings import ConfigError, Settings
from service.storage import SchemaError

logger = logging.getLogger("service.retention")

BATCH_SIZE = 1000


@dataclass(frozen=True)
class Run:
    erased: int
    batches: int
    seconds: float
    # Batches whose cached copies could not be dropped (Redis unreachable); they expire after CACHE_TTL.
    cache_misses: int


async def erase_old(settings: Settings, *, batch_size: int = BATCH_SIZE, now: dt.datetime | None = None) -> Run:
    """Erase every decision older than the retention period, batch by batch."""
    cutoff = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(days=settings.retention_days)
    store = await storage.open_store(settings, "credit-scoring-retention")
    try:
        # The columns this erases may be new: bring the schema up to date first, as start-up does.
        await store.migrate()
        cache = open_cache(settings, "credit-scoring-retention")
        try:
            return await _erase_in_batches(store, cache, cutoff, batch_size, settings.retention_days)
        finally:
            await cache.close()
    finally:
        await store.close()


async def _erase_in_batches(
    store: storage.Store, cache: Cache, cutoff: dt.datetime, batch_size: int, retention_days: int
) -> Run:
    logger.info("Erasing inputs of decisions made before %s (RETENTION_DAYS=%d)", cutoff.isoformat(), retention_days)
    started = time.monotonic()
    erased = batches = cache_misses = 0
    while ids := await store.erase_older_than(cutoff, batch_size):
        erased += len(ids)
        batches += 1
        # Dropped as each batch commits; if Redis cannot be told, the copies expire within CACHE_TTL.
        if not await cache.delete(ids):
            cache_misses += 1
        logger.debug("Batch %d: erased %d decisions", batches, len(ids))
    return Run(erased, batches, time.monotonic() - started, cache_misses)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.retention", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="decisions per transaction (default 1000)")
    args = parser.parse_args(argv)
    if not 1 <= args.batch_size <= 100_000:
        parser.error("--batch-size must be from 1 to 100000")
    logs.configure()
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_level, settings.log_format)
        run = asyncio.run(erase_old(settings, batch_size=args.batch_size))
    except (ConfigError, StoreUnavailable, SchemaError) as exc:
        logger.error("Retention failed: %s", exc)
        return 1
    rate = run.erased / run.seconds if run.seconds > 0 else 0.0
    logger.info(
        "Retention done: erased %d decisions in %d batches, %.1f s (%.0f decisions/s)",
        run.erased,
        run.batches,
        run.seconds,
        rate,
    )
    if run.cache_misses:
        logger.warning(
            "The cache was unreachable for %d batches: their cached copies expire within CACHE_TTL (%d s)",
            run.cache_misses,
            settings.cache_ttl,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
