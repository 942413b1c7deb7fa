"""The system of record: one row per decision, in PostgreSQL or embedded SQLite.

Both stores speak the same small protocol, built from the same column list, so
routes and tests do not care which one runs. A call that cannot reach the
database raises StoreUnavailable (answered 503); nothing here retries a write,
because a retried INSERT whose first COMMIT did land would duplicate the record.
Clients retry with an Idempotency-Key instead.

One module per noun, dependencies pointing down: base.py (records, the Store
protocol, row helpers) and schema.py (columns, CREATE TABLE, migrations) import
no back end; postgres.py and sqlite.py build on both; this module picks one
(open_store) and re-exports what the rest of the service uses.
"""

from __future__ import annotations

from typing import Any

from service.storage.base import COMMIT_BOUND, Audited, Existing, ExistingBatch, Record, Search, Store
from service.storage.postgres import PostgresStore
from service.storage.schema import MIGRATION_LOCK_ID, MIGRATIONS, SchemaError
from service.storage.sqlite import SQLiteStore

__all__ = [
    "COMMIT_BOUND",
    "MIGRATIONS",
    "MIGRATION_LOCK_ID",
    "Audited",
    "Existing",
    "ExistingBatch",
    "PostgresStore",
    "Record",
    "SQLiteStore",
    "SchemaError",
    "Search",
    "Store",
    "open_store",
]


async def open_store(settings: Any, application_name: str) -> Store:
    """The store the settings ask for: PostgreSQL when DATABASE_URL is set, else SQLite."""
    if settings.database_url:
        return await PostgresStore.open(
            settings.database_url,
            direct_url=settings.database_direct_url,
            pool_size=settings.database_pool_size,
            connect_timeout=settings.database_connect_timeout,
            request_timeout=settings.database_request_timeout,
            application_name=application_name,
        )
    return await SQLiteStore.open(settings.sqlite_path, settings.database_request_timeout)
