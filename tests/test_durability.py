"""201 means committed: while the system of record holds a decision's commit, no answer may leave.

Unlike the outage tests, nothing fails here: the commit is only slow. PostgreSQL's is
held by a deferred constraint trigger (it runs at COMMIT) that waits for an advisory
lock the test holds; SQLite's by a write lock another connection holds, which the
service's write waits for (within its busy timeout). Answering before the write is
awaited, or before its transaction commits, lets a response through while the lock
is held.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx2 as httpx
import psycopg
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.conftest import count_rows

HOLD_SECONDS = 1.0
LOCK_ID = 741_852


@contextmanager
def commits_held(settings: Settings) -> Iterator[Callable[[], None]]:
    """Hold every commit to the decisions table until the function it yields is called."""
    if settings.database_url:
        with psycopg.connect(settings.database_url, autocommit=True) as pg:
            pg.execute(
                "CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS"
                f" $$ BEGIN PERFORM pg_advisory_xact_lock_shared({LOCK_ID}); RETURN NULL; END $$"
            )
            pg.execute(
                "CREATE CONSTRAINT TRIGGER hold_commit AFTER INSERT ON decisions"
                " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hold_commit()"
            )
            pg.execute("SELECT pg_advisory_lock(%s)", (LOCK_ID,))
            try:
                yield lambda: pg.execute("SELECT pg_advisory_unlock(%s)", (LOCK_ID,))
            finally:
                pg.execute("SELECT pg_advisory_unlock_all()")
                pg.execute("DROP TRIGGER hold_commit ON decisions")
                pg.execute("DROP FUNCTION hold_commit()")
    else:
        lite = sqlite3.connect(settings.sqlite_path, isolation_level=None)
        lite.execute("BEGIN EXCLUSIVE")
        try:
            yield lambda: lite.execute("ROLLBACK")
        finally:
            lite.close()


def test_no_answer_leaves_before_its_commit_completes(settings: Settings, applicant: dict) -> None:
    answers: dict[str, httpx.Response] = {}
    requests: dict[str, tuple[str, Any]] = {
        "single": ("/decisions", applicant),
        "keyed": ("/decisions", applicant),
        "batch": ("/decisions/batch", {"applicants": [applicant] * 3}),
    }
    with TestClient(create_app(settings)) as client:
        before = count_rows(settings)

        def post(name: str) -> None:
            path, body = requests[name]
            headers = {"Idempotency-Key": f"held-{time.time_ns()}"} if name == "keyed" else {}
            answers[name] = client.post(path, json=body, headers=headers)

        with commits_held(settings) as release:
            threads = [threading.Thread(target=post, args=(name,)) for name in requests]
            for thread in threads:
                thread.start()
            time.sleep(HOLD_SECONDS)
            early = dict(answers)
            committed_while_held = count_rows(settings) - before
            release()
            for thread in threads:
                thread.join(timeout=10)
    assert early == {}, {name: r.status_code for name, r in early.items()}
    assert committed_while_held == 0
    assert {name: r.status_code for name, r in answers.items()} == dict.fromkeys(requests, 201)
    assert count_rows(settings) - before == 5
