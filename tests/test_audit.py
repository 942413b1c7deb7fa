"""What integrators and auditors need: references, search, inputs for audit, erasure, key ids, tracing.

Every test runs on both back ends (PostgreSQL + Redis, SQLite + the in-process
cache) through the `settings` fixture, unless it names one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from service import logs
from service.app import create_app
from service.middleware import trace_id_of
from service.settings import Settings
from service.storage import COMMIT_BOUND
from tests.conftest import count_rows, redis_prefix
from tests.test_decisions import assert_problem

LENDER = {"Authorization": "Bearer l3nder-tok"}
AUDITOR = {"Authorization": "Bearer aud1tor-tok"}
OPS = {"Authorization": "Bearer 0ps-tok"}
# A short request timeout: the window search stops three of them (COMMIT_BOUND) before now, 0.9 s here.
REQUEST_TIMEOUT = 0.3
HORIZON = COMMIT_BOUND * REQUEST_TIMEOUT


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        api_keys=(("lender", "l3nder-tok"),),
        audit_keys=(("auditor", "aud1tor-tok"),),
        admin_keys=(("ops", "0ps-tok"),),
        database_request_timeout=REQUEST_TIMEOUT,
    )


@pytest.fixture
def api(keyed: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(keyed)) as client:
        yield client


def _since() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _page(client: TestClient, **params: Any) -> dict[str, Any]:
    response = client.get("/decisions", params=params, headers=LENDER)
    assert response.status_code == 200, response.text
    return dict(response.json())


# -- references -------------------------------------------------------------------------------


def test_a_reference_is_stored_returned_and_found(
    api: TestClient, applicants: list[dict], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reference = f"APP-{uuid.uuid4().hex[:8]} / 2026"
    made = []
    for applicant in applicants[:20]:  # approvals and declines
        answer = api.post("/decisions", json={**applicant, "reference": reference}, headers=LENDER)
        assert answer.status_code == 201, answer.text
        assert answer.json()["reference"] == reference
        made.append(answer.json())
    assert api.get(f"/decisions/{made[0]['id']}", headers=LENDER).json()["reference"] == reference
    batch = api.post(
        "/decisions/batch",
        json={"applicants": [{**applicants[0], "reference": reference}, applicants[1]]},
        headers=LENDER,
    ).json()["decisions"]
    assert [d["reference"] for d in batch] == [reference, None]
    made.append(batch[0])
    # Found the moment it is made (a reference search has no horizon), newest first.
    found = _page(api, reference=reference)
    assert found["decisions"] == sorted(made, key=lambda d: (d["created_at"], d["id"]), reverse=True)
    assert found["next"] is None
    for decision in ("approve", "decline"):
        chosen = [d for d in found["decisions"] if d["decision"] == decision]
        assert chosen, f"the data set's first 20 applicants hold a {decision}"
        assert _page(api, reference=reference, decision=decision)["decisions"] == chosen
    # Without a reference, none is stored.
    plain = api.post("/decisions", json=applicants[1], headers=LENDER).json()
    assert plain["reference"] is None
    # The reference names an application: the service does not log it (the access line has the path, not the query).
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("service", "uvicorn")))
    assert "GET /decisions 200" in ours and "APP-" not in ours


@pytest.mark.parametrize("reference", ["", "x" * 65, "café", "line\nbreak", "tab\there", 42])
def test_a_bad_reference_is_a_422_and_nothing_is_written(
    api: TestClient, keyed: Settings, applicant: dict, reference: Any
) -> None:
    before = count_rows(keyed)
    body = assert_problem(api.post("/decisions", json={**applicant, "reference": reference}, headers=LENDER), 422)
    assert "reference" in body["detail"]
    assert count_rows(keyed) == before


# -- the search -------------------------------------------------------------------------------


def test_the_window_search_pages_newest_first_without_repeats(api: TestClient, applicant: dict) -> None:
    since = _since()
    made = [api.post("/decisions", json=applicant, headers=LENDER).json()["id"] for _ in range(12)]
    made += [
        d["id"]
        for d in api.post("/decisions/batch", json={"applicants": [applicant] * 13}, headers=LENDER).json()["decisions"]
    ]
    time.sleep(HORIZON + 0.1)  # behind the horizon now
    seen: list[dict[str, Any]] = []
    page = _page(api, since=since, limit=10)
    pages = 1
    while True:
        seen += page["decisions"]
        if page["next"] is None:
            break
        assert len(page["decisions"]) == 10
        page = _page(api, cursor=page["next"], limit=10)
        pages += 1
    assert pages == 3
    assert sorted(d["id"] for d in seen) == sorted(made)
    keys = [(d["created_at"], d["id"]) for d in seen]
    assert keys == sorted(keys, reverse=True)
    # The batch's decisions share one time; the id breaks the tie, so none repeats or goes missing.
    assert len({d["created_at"] for d in seen}) < len(seen)


def test_the_window_search_filters_and_stops_short_of_now(api: TestClient, applicants: list[dict]) -> None:
    since = _since()
    answers = [api.post("/decisions", json=a, headers=LENDER).json() for a in applicants[:40]]
    page = _page(api, since=since)
    # Made a moment ago: still ahead of the horizon, so not listed yet, and the page says where it stopped.
    assert page["decisions"] == []
    until = dt.datetime.fromisoformat(page["until"])
    assert until == dt.datetime.fromisoformat(since) or until <= dt.datetime.now(dt.UTC) - dt.timedelta(seconds=HORIZON)
    time.sleep(HORIZON + 0.1)
    for decision in ("approve", "decline"):
        listed = _page(api, since=since, decision=decision)["decisions"]
        assert {d["id"] for d in listed} == {a["id"] for a in answers if a["decision"] == decision}
        assert listed, f"the data set's first 40 applicants hold a {decision}"
    until = answers[20]["created_at"]
    assert {d["id"] for d in _page(api, since=since, until=until)["decisions"]} == {a["id"] for a in answers[:20]}


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"decision": "maybe"},
        {"since": "yesterday"},
        {"since": "2026-11-29T10:00:00Z", "until": "2026-11-29T09:00:00Z"},
        {"reference": "x" * 65},
        {"cursor": "not-a-cursor"},
        {"cursor": ""},
        # Once 500s: times whose arithmetic overflows, and a digit that is not ASCII.
        {"since": "0001-01-01T00:00:00+01:00"},
        {"until": "9999-12-31T23:59:59-01:00"},
        {"until": "0001-01-01T00:00:00Z"},
        {"reference": "x", "until": "0005-01-01T00:00:00Z"},
        {"limit": "\u00b2"},
        {"limit": "\u0661\u0660"},
    ],
)
def test_a_bad_search_parameter_is_a_400(api: TestClient, params: dict[str, str]) -> None:
    body = assert_problem(api.get("/decisions", params=params, headers=LENDER), 400)
    assert body["type"].endswith("invalid-parameter")


def test_a_cursor_cannot_be_forged_edited_or_mixed_with_a_new_search(
    api: TestClient, keyed: Settings, applicant: dict, tmp_path: Path
) -> None:
    since = _since()
    for _ in range(3):
        api.post("/decisions", json=applicant, headers=LENDER)
    time.sleep(HORIZON + 0.1)
    cursor = _page(api, since=since, limit=1)["next"]
    assert cursor is not None
    payload, _, tag = cursor.partition(".")
    flipped = payload[:-1] + ("A" if payload[-1] != "A" else "B")
    for bad in (f"{flipped}.{tag}", f"{payload}.{tag[:-1]}", payload, f"{payload}.", f".{tag}", cursor + "x"):
        assert_problem(api.get("/decisions", params={"cursor": bad}, headers=LENDER), 400)
    # A cursor carries its search: sent with filters it is refused, not silently reinterpreted.
    assert_problem(api.get("/decisions", params={"cursor": cursor, "decision": "approve"}, headers=LENDER), 400)
    assert len(_page(api, cursor=cursor, limit=5)["decisions"]) == 2
    # Another database signs with another key: its cursors are not ours.
    other = dataclasses.replace(keyed, database_url=None, redis_url=None, sqlite_path=tmp_path / "other.sqlite3")
    with TestClient(create_app(other)) as elsewhere:
        assert_problem(elsewhere.get("/decisions", params={"cursor": cursor}, headers=LENDER), 400)


def test_a_cursor_from_one_replica_works_on_another(postgres_url: str, redis_url: str, applicant: dict) -> None:
    # Replicas share PostgreSQL (embedded SQLite is one machine's).
    keyed = Settings(database_url=postgres_url, redis_url=redis_url, redis_key_prefix=redis_prefix(), cache_ttl=600)
    keyed = dataclasses.replace(keyed, api_keys=(("lender", "l3nder-tok"),), database_request_timeout=REQUEST_TIMEOUT)
    since = _since()
    with TestClient(create_app(keyed)) as first, TestClient(create_app(keyed)) as second:
        for _ in range(3):
            first.post("/decisions", json=applicant, headers=LENDER)
        time.sleep(HORIZON + 0.1)
        page = _page(first, since=since, limit=2)
        rest = _page(second, cursor=page["next"], limit=2)
        assert len(page["decisions"]) + len(rest["decisions"]) == 3 and rest["next"] is None


# -- roles: API, audit, admin ------------------------------------------------------------------


def test_the_applicants_inputs_are_for_audit_keys_only(api: TestClient, applicant: dict) -> None:
    made = api.post("/decisions", json={**applicant, "reference": "R-1"}, headers=LENDER).json()
    path = f"/decisions/{made['id']}"
    for headers in (LENDER, OPS):
        assert_problem(api.get(path, params={"include": "applicant"}, headers=headers), 403)
    for headers in ({}, {"Authorization": "Bearer wrong"}):  # no key we know: 401, before anything else
        assert_problem(api.get(path, params={"include": "applicant"}, headers=headers), 401)
    audited = api.get(path, params={"include": "applicant"}, headers=AUDITOR)
    assert audited.status_code == 200, audited.text
    body = audited.json()
    assert body["applicant"] == applicant  # the fields as scored; the reference stays in the decision
    assert body["reference"] == "R-1" and body["key_id"] == "lender" and body["erasure"] is None
    assert {k: v for k, v in body.items() if k not in ("applicant", "erasure", "key_id")} == made
    assert_problem(api.get(path, params={"include": "everything"}, headers=AUDITOR), 400)
    # Who asks comes first: without an audit key even a bad `include` is a 403, never a 400.
    assert_problem(api.get(path, params={"include": "everything"}, headers=LENDER), 403)
    assert_problem(api.get(f"/decisions/{uuid.uuid4()}", params={"include": "applicant"}, headers=AUDITOR), 404)


@pytest.mark.parametrize("api_open", [False, True])
def test_an_audit_key_reads_and_an_admin_key_administers_never_more(
    keyed: Settings, applicant: dict, api_open: bool
) -> None:
    # Whether or not API_KEYS is set: a key we know, used outside its role, is refused.
    settings = dataclasses.replace(keyed, api_keys=()) if api_open else keyed
    with TestClient(create_app(settings)) as api:
        made = api.post("/decisions", json=applicant, headers=LENDER if not api_open else {}).json()
        assert api.get(f"/decisions/{made['id']}", headers=AUDITOR).status_code == 200
        assert api.get("/decisions", params={"reference": "none-such"}, headers=AUDITOR).status_code == 200
        assert api.get("/monitoring", headers=AUDITOR).status_code == 200
        outcome = {"defaulted": False, "observed_at": dt.datetime.now(dt.UTC).isoformat()}
        for key in (AUDITOR, OPS):
            assert_problem(api.post("/decisions", json=applicant, headers=key), 403)
            assert_problem(api.post("/decisions/batch", json={"applicants": [applicant]}, headers=key), 403)
            assert_problem(api.put(f"/decisions/{made['id']}/outcome", json=outcome, headers=key), 403)
        assert_problem(api.get(f"/decisions/{made['id']}", headers=OPS), 403)
        if not api_open:
            assert_problem(api.get("/decisions", params={"reference": "x"}), 401)


def test_erasure_removes_the_inputs_and_reference_everywhere_and_is_recorded(
    api: TestClient, keyed: Settings, applicant: dict
) -> None:
    key = {"Idempotency-Key": f"erase-{uuid.uuid4()}"}
    made = api.post("/decisions", json={**applicant, "reference": "ERASE-ME"}, headers={**LENDER, **key}).json()
    path = f"/decisions/{made['id']}"
    assert api.get(path, headers=LENDER).json()["reference"] == "ERASE-ME"  # now in the cache too
    for headers in (LENDER, AUDITOR):
        assert_problem(api.delete(f"{path}/applicant", headers=headers), 403)
    assert_problem(api.delete(f"{path}/applicant"), 401)
    erased = api.delete(f"{path}/applicant", headers=OPS)
    assert erased.status_code == 200, erased.text
    body = erased.json()
    assert body["id"] == made["id"] and body["erased_by"] == "ops"
    # Again: the same erasure, not a new one.
    assert api.delete(f"{path}/applicant", headers=OPS).json() == body
    after = api.get(path, headers=LENDER).json()
    assert after == {**made, "reference": None}, "the cached copy went with the erasure"
    audited = api.get(path, params={"include": "applicant"}, headers=AUDITOR).json()
    assert audited["applicant"] is None and audited["erasure"] == {k: body[k] for k in ("erased_at", "erased_by")}
    # The inputs, the reference, and what could lead back to them (the idempotency key, the hash of the body).
    erased_columns = "reference IS NULL AND age IS NULL AND purpose IS NULL AND idempotency_key IS NULL"
    assert count_rows(keyed, f"id = %s AND {erased_columns} AND request_hash IS NULL", (made["id"],)) == 1
    assert api.get("/decisions", params={"reference": "ERASE-ME"}, headers=LENDER).json()["decisions"] == []
    assert_problem(api.delete(f"/decisions/{uuid.uuid4()}/applicant", headers=OPS), 404)


# -- key ids, reasons, tracing -----------------------------------------------------------------


def test_the_key_id_is_logged_counted_and_stored_never_the_secret(
    api: TestClient, keyed: Settings, applicant: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    made = api.post("/decisions", json=applicant, headers=LENDER).json()
    api.get(f"/decisions/{made['id']}", headers=AUDITOR)
    access = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert any(line.startswith("POST /decisions 201") and line.endswith(" key=lender") for line in access), access
    assert any(line.endswith(" key=auditor") for line in access), access
    assert "-tok" not in caplog.text
    metrics = api.get("/metrics").text
    assert 'http_requests_by_key_total{key="lender",route="/decisions",status="201"}' in metrics
    assert "-tok" not in metrics
    assert count_rows(keyed, "id = %s AND key_id = 'lender'", (made["id"],)) == 1


def test_reasons_carry_a_code_and_statement_and_never_age(client: TestClient, applicants: list[dict]) -> None:
    decisions = client.post("/decisions/batch", json={"applicants": applicants[:300]}).json()["decisions"]
    given = [r for d in decisions for r in d["reasons"]]
    assert given
    assert all(r["code"].startswith("R") and r["statement"] for r in given)
    assert "age" not in {r["feature"] for r in given}
    codes = {r["feature"]: r["code"] for r in given}
    assert len(set(codes.values())) == len(codes), "one code per feature"


@pytest.mark.parametrize(
    ("traceparent", "expected"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),
        ("garbage", None),
    ],
)
def test_traceparent_gives_its_trace_id_or_nothing(traceparent: str, expected: str | None) -> None:
    assert trace_id_of(traceparent.encode()) == expected


def test_the_trace_id_is_logged_beside_the_request_id_and_a_bad_one_is_ignored(
    client: TestClient, applicant: dict, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    ok = client.post("/decisions", json=applicant, headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert ok.status_code == 201
    line = next(r for r in caplog.records if r.name == "service.access" and r.request_id == ok.headers["x-request-id"])
    assert line.trace_id == trace  # type: ignore[attr-defined]
    assert f"[{ok.headers['x-request-id']} trace={trace}]" in logs.TextFormatter().format(line)
    assert json.loads(logs.JsonFormatter().format(line))["trace_id"] == trace
    bad = client.post("/decisions", json=applicant, headers={"traceparent": "00-nonsense"})
    assert bad.status_code == 201
    line = next(r for r in caplog.records if r.name == "service.access" and r.request_id == bad.headers["x-request-id"])
    assert line.trace_id is None  # type: ignore[attr-defined]
