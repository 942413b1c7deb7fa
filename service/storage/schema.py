"""The decisions table as data: its columns, the CREATE TABLE built from them, and the migrations.

Both back ends build their schema, their INSERTs and (for PostgreSQL) their COPY
types from the one column list here, so the two cannot drift apart. The
migration history is append-only and checksummed: `_to_apply` tells a back end
which migrations it still has to run, and raises SchemaError if the database
applied one that has since been edited. Nothing here touches a connection.
"""

from __future__ import annotations

import hashlib
from typing import get_type_hints

from service.schemas import APPLICANT_FIELDS, Applicant

# Any number works as long as every worker and the release phase use the same one.
MIGRATION_LOCK_ID = 0x63726564  # "cred"

_PG_TYPES = {int: "integer", float: "double precision", str: "text", bool: "boolean"}
_SQLITE_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT", bool: "INTEGER"}


def _applicant_columns() -> list[tuple[str, type]]:
    hints = get_type_hints(Applicant)
    columns = []
    for name in APPLICANT_FIELDS:
        hint = hints[name]
        base = hint if hint in _PG_TYPES else str  # Literal[...] categories are text
        columns.append((name, base))
    return columns


# The columns as migration 1 created them. Frozen: migration 1's text (and checksum) is built from them.
_COLUMNS_V1: list[tuple[str, type | None]] = [
    ("id", None),
    ("created_at", None),
    ("model_version", str),
    *_applicant_columns(),
    ("probability_of_default", float),
    ("risk_category", str),
    ("score", int),
    ("decision", str),
    ("reasons", None),
    ("idempotency_key", None),
    ("request_hash", None),
    ("batch_id", None),
    ("batch_position", None),
]
# Migration 4: the lender's reference, the key that asked, and the erasure of the applicant's fields.
_COLUMNS_V4 = [*_COLUMNS_V1, ("reference", None), ("key_id", None), ("erased_at", None), ("erased_by", None)]
# The table as it is now, in the order inserts and COPY write it.
_COLUMNS = _COLUMNS_V4
_SPECIAL = {
    "postgres": {
        "id": "uuid PRIMARY KEY",
        "created_at": "timestamptz NOT NULL",
        "reasons": "jsonb NOT NULL",
        "idempotency_key": "text UNIQUE",
        "request_hash": "text",
        "batch_id": "uuid",
        "batch_position": "integer",
        "reference": "text",
        "key_id": "text",
        "erased_at": "timestamptz",
        "erased_by": "text",
    },
    "sqlite": {
        "id": "TEXT PRIMARY KEY",
        "created_at": "TEXT NOT NULL",
        "reasons": "TEXT NOT NULL",
        "idempotency_key": "TEXT UNIQUE",
        "request_hash": "TEXT",
        "batch_id": "TEXT",
        "batch_position": "INTEGER",
        "reference": "TEXT",
        "key_id": "TEXT",
        "erased_at": "TEXT",
        "erased_by": "TEXT",
    },
}

_NAMES = [name for name, _ in _COLUMNS]


_APPLICANT = set(APPLICANT_FIELDS)


def _create_table(
    dialect: str,
    columns: list[tuple[str, type | None]] = _COLUMNS_V1,
    table: str = "decisions",
    erasable: bool = False,
) -> str:
    """CREATE TABLE for a set of columns; `erasable` leaves the applicant's fields nullable (retention)."""
    types = _PG_TYPES if dialect == "postgres" else _SQLITE_TYPES

    def declared(name: str, kind: type | None) -> str:
        if kind is None:
            return _SPECIAL[dialect][name]
        return types[kind] + ("" if erasable and name in _APPLICANT else " NOT NULL")

    lines = [f"{name} {declared(name, kind)}" for name, kind in columns]
    return f"CREATE TABLE IF NOT EXISTS {table} (\n  " + ",\n  ".join(lines) + "\n)"


def _v4(dialect: str) -> list[str]:
    """References, key ids, erasable applicant fields, the search's indexes, and the cursor's signing key."""
    indexes = [
        # Newest first, page after page: the window search's keyset, and the monitoring window's range.
        "CREATE INDEX IF NOT EXISTS decisions_created_id ON decisions (created_at, id)",
        "DROP INDEX IF EXISTS decisions_created_at",
        "CREATE INDEX IF NOT EXISTS decisions_reference ON decisions (reference, created_at, id)"
        " WHERE reference IS NOT NULL",
        # What retention has still to do, and nothing it has done.
        "CREATE INDEX IF NOT EXISTS decisions_unerased ON decisions (created_at) WHERE erased_at IS NULL",
    ]
    if dialect == "postgres":
        added = ", ".join(f"ADD COLUMN IF NOT EXISTS {name} {_SPECIAL[dialect][name]}" for name, _ in _COLUMNS_V4[-4:])
        nullable = ", ".join(f"ALTER COLUMN {name} DROP NOT NULL" for name in APPLICANT_FIELDS)
        return [
            f"ALTER TABLE decisions {added}, {nullable}",
            *indexes,
            "CREATE TABLE IF NOT EXISTS service_secrets (name text PRIMARY KEY, value bytea NOT NULL)",
            # 244 random bits from two version 4 UUIDs (gen_random_uuid uses the server's strong random source).
            "INSERT INTO service_secrets VALUES ('cursor',"
            " decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'))"
            " ON CONFLICT (name) DO NOTHING",
        ]
    # SQLite cannot drop NOT NULL: the table is rebuilt (its data copied), as SQLite's documentation prescribes.
    old = ", ".join(name for name, _ in _COLUMNS_V1)
    return [
        _create_table(dialect, _COLUMNS_V4, "decisions_v4", erasable=True),
        f"INSERT INTO decisions_v4 ({old}) SELECT {old} FROM decisions",
        "DROP TABLE decisions",
        "ALTER TABLE decisions_v4 RENAME TO decisions",
        "CREATE INDEX IF NOT EXISTS decisions_batch ON decisions (batch_id, batch_position) WHERE batch_id IS NOT NULL",
        *indexes,
        "CREATE TABLE IF NOT EXISTS service_secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
        "INSERT INTO service_secrets VALUES ('cursor', randomblob(32)) ON CONFLICT (name) DO NOTHING",
    ]


# Append-only: a deployed migration is never edited, only followed by a new one.
MIGRATIONS: list[tuple[int, str, dict[str, list[str]]]] = [
    (
        1,
        "create decisions",
        {
            dialect: [
                _create_table(dialect),
                "CREATE INDEX IF NOT EXISTS decisions_created_at ON decisions (created_at)",
                "CREATE INDEX IF NOT EXISTS decisions_batch ON decisions (batch_id, batch_position)"
                " WHERE batch_id IS NOT NULL",
            ]
            for dialect in ("postgres", "sqlite")
        },
    ),
    (
        2,
        "model assignments, challenger decisions, worker reports",
        {
            dialect: [
                # Append-only: the newest revision is the assignment, the rest its history.
                "CREATE TABLE IF NOT EXISTS model_assignments ("
                f"revision {t['int8']} PRIMARY KEY, action {t['text']} NOT NULL, champion {t['text']} NOT NULL,"
                f" challenger {t['text']}, challenger_share {t['float']},"
                f" previous_champion {t['text']}, previous_challenger {t['text']}, previous_share {t['float']},"
                f" changed_at {t['time']} NOT NULL, changed_by {t['text']} NOT NULL)",
                # A challenger's verdict beside the champion's decision it second-guesses.
                "CREATE TABLE IF NOT EXISTS challenger_decisions ("
                f"decision_id {t['uuid']} NOT NULL REFERENCES decisions (id) ON DELETE CASCADE,"
                f" model_version {t['text']} NOT NULL, probability_of_default {t['float']} NOT NULL,"
                f" risk_category {t['text']} NOT NULL, score {t['int']} NOT NULL, decision {t['text']} NOT NULL,"
                f" scored_at {t['time']} NOT NULL, PRIMARY KEY (decision_id, model_version))",
                # What each worker process serves, as it last reported it (for GET /admin/models).
                "CREATE TABLE IF NOT EXISTS model_workers ("
                f"worker {t['text']} PRIMARY KEY, revision {t['int8']} NOT NULL, champion {t['text']} NOT NULL,"
                f" challenger {t['text']}, loaded_at {t['time']} NOT NULL, seen_at {t['time']} NOT NULL,"
                f" error {t['text']})",
            ]
            for dialect, t in (
                (
                    "postgres",
                    {
                        "int8": "bigint",
                        "int": "integer",
                        "text": "text",
                        "float": "double precision",
                        "time": "timestamptz",
                        "uuid": "uuid",
                    },
                ),
                (
                    "sqlite",
                    {
                        "int8": "INTEGER",
                        "int": "INTEGER",
                        "text": "TEXT",
                        "float": "REAL",
                        "time": "TEXT",
                        "uuid": "TEXT",
                    },
                ),
            )
        },
    ),
    (
        3,
        "outcomes",
        {
            dialect: [
                # What the lender reports back about a decision: did the borrower default, and when was it known.
                "CREATE TABLE IF NOT EXISTS outcomes ("
                f"decision_id {t['uuid']} PRIMARY KEY REFERENCES decisions (id) ON DELETE CASCADE,"
                f" defaulted {t['bool']} NOT NULL, observed_at {t['time']} NOT NULL,"
                f" recorded_at {t['time']} NOT NULL, recorded_by {t['text']})",
            ]
            for dialect, t in (
                ("postgres", {"uuid": "uuid", "bool": "boolean", "time": "timestamptz", "text": "text"}),
                ("sqlite", {"uuid": "TEXT", "bool": "INTEGER", "time": "TEXT", "text": "TEXT"}),
            )
        },
    ),
    (
        4,
        "references, key ids, erasable applicant fields, search indexes",
        {dialect: _v4(dialect) for dialect in ("postgres", "sqlite")},
    ),
]


class SchemaError(Exception):
    """The database's schema history does not match the migrations in this code."""


def _checksum(statements: list[str]) -> str:
    return hashlib.sha256("\n".join(statements).encode()).hexdigest()


def _to_apply(done: dict[int, str], dialect: str) -> list[tuple[int, str, list[str]]]:
    """The migrations not applied yet; refuses if an applied one was edited since."""
    pending = []
    for version, description, statements in MIGRATIONS:
        checksum = _checksum(statements[dialect])
        if version not in done:
            pending.append((version, description, statements[dialect]))
        elif done[version] != checksum:
            raise SchemaError(
                f"Migration {version} ({description!r}) was changed after this database applied it "
                f"(checksum {done[version][:12]}, now {checksum[:12]}): add a new migration instead of editing one."
            )
    return pending
