"""Rows for the benches that need millions of decisions: made with SQL, from rows the API itself wrote.

The service records the data set's 1,000 applicants once, as one batch, so that every
column holds what the service writes; they are copied into a table `seed`, numbered
0 to 999, with their keys cleared. A bench then grows `decisions` with
`INSERT INTO decisions ({columns}) SELECT gen_random_uuid(), <a time>, {copied}
FROM generate_series(1, n) AS g JOIN seed ON seed.n = g % 1000`, as often as it needs.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from typing import Any

import msgspec
import psycopg

from service import dataset


@dataclass(frozen=True)
class Seed:
    # The INSERT's columns, id and created_at first, then those copied from `seed`, as `seed.<column>`.
    columns: str
    copied: str


def seed(service_url: str, conn: psycopg.Connection[Any], *, references: bool = False) -> Seed:
    """Post the data set's applicants (with references SEED-0 … SEED-999 if asked) and make the table `seed`.

    With `references`, the reference is left out of the copied columns: the bench gives each copy its own.
    """
    applicants = [msgspec.to_builtins(a) for a in dataset.load().applicants]
    if references:
        applicants = [{**a, "reference": f"SEED-{i}"} for i, a in enumerate(applicants)]
    body = json.dumps({"applicants": applicants}).encode()
    request = urllib.request.Request(service_url + "/decisions/batch", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=60).read()
    names = [
        r[0]
        for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'decisions'"
            " ORDER BY ordinal_position"
        ).fetchall()
    ]
    own = ("id", "created_at", "reference") if references else ("id", "created_at")
    kept = [n for n in names if n not in own]
    conn.execute("CREATE TABLE seed AS SELECT row_number() OVER (ORDER BY id) - 1 AS n, * FROM decisions")
    conn.execute("UPDATE seed SET idempotency_key = NULL, request_hash = NULL, batch_id = NULL")
    return Seed(columns=", ".join(["id", "created_at", *kept]), copied=", ".join(f"seed.{n}" for n in kept))
