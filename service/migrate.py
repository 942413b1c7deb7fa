"""Bring the schema up to date and exit: the Procfile's `release:` phase.

Start-up runs the same migrations under the same lock, so running this first is
an optimisation for many workers, not a requirement.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from service import logs, storage
from service.errors import StoreUnavailable
from service.settings import ConfigError, Settings

logger = logging.getLogger("service.migrate")


async def migrate(settings: Settings) -> list[int]:
    store = await storage.open_store(settings, "credit-scoring-release")
    try:
        return await store.migrate()
    finally:
        await store.close()


def main() -> int:
    logs.configure()
    try:
        settings = Settings.from_env()
        logs.configure(settings.log_level, settings.log_format)
        store_applied = asyncio.run(migrate(settings))
    except (ConfigError, StoreUnavailable) as exc:
        logger.error("Migration failed: %s", exc)
        return 1
    logger.info("Schema up to date (applied migrations %s)", store_applied or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
