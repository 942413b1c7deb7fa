"""The HTTP contract of SPEC.md, run once on PostgreSQL + Redis and once on SQLite + the in-process cache."""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

import msgspec
import pytest
from starlette.testclient import TestClient

from service.errors import DuplicateKey
from service.models.policy import scorecard_points
from service.routes.bodies import decode
from service.schemas import Applicant
from service.settings import Settings
from tests.conftest import count_rows, wait_until

PROBLEM = "application/problem+json"


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"] and body["type"]
    return dict(body)


# -- POST /decisions ----------------------------------------------------------------


def test_create_decision_commits_and_returns_201(client: TestClient, settings: Settings, applicant: dict) -> None:
    response = client.post("/decisions", json=applicant)
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/decisions/{body['id']}"
    assert uuid.UUID(body["id"]).version == 4
    assert body["created_at"].endswith("Z")
    assert count_rows(settings, "id = %s", (body["id"],)) == 1


def test_a_failure_after_the_answer_is_logged_and_the_decision_stands(
    client: TestClient,
    settings: Settings,
    applicant: dict,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counting, the challenger's sample and the cache run after the answer: a bug there cannot change it."""
    from service.routes import decisions

    def broken(decision: Any) -> None:
        raise RuntimeError("a bug in the counting")

    monkeypatch.setattr(decisions, "_count", broken)
    caplog.set_level(logging.ERROR, logger="service.errors")
    response = client.post("/decisions", json=applicant)
    assert response.status_code == 201, response.text
    decision_id = response.json()["id"]
    assert count_rows(settings, "id = %s", (decision_id,)) == 1
    assert wait_until(lambda: any("after answering POST /decisions" in r.getMessage() for r in caplog.records))
    [logged] = [r for r in caplog.records if "after answering POST /decisions" in r.getMessage()]
    assert decision_id in logged.getMessage() and logged.exc_info is not None


def test_create_decision_follows_the_model_and_the_scorecard(client: TestClient, applicant: dict) -> None:
    body = client.post("/decisions", json=applicant).json()
    model = client.app.state.models.current.champion  # type: ignore[attr-defined]
    p = body["probability_of_default"]
    assert 0 < p < 1
    assert body["decision"] == ("decline" if p >= model.metadata.cutoff else "approve")
    assert body["score"] == round(487.123 + 28.8539 * math.log((1 - p) / p)) == scorecard_points(p)
    bands = model.metadata.risk_bands
    expected = next(b.category for b in bands if p < b.upper_bound)
    assert body["risk_category"] == expected
    assert body["model_version"] == model.metadata.version
    contributions = [r["contribution"] for r in body["reasons"]]
    assert 0 < len(contributions) <= 4
    assert contributions == sorted(contributions, reverse=True)
    assert all(c > 0 for c in contributions)


def test_create_decision_stores_the_applicant_fields(client: TestClient, settings: Settings, applicant: dict) -> None:
    body = client.post("/decisions", json=applicant).json()
    assert (
        count_rows(
            settings, "id = %s AND age = %s AND purpose = %s", (body["id"], applicant["age"], applicant["purpose"])
        )
        == 1
    )


def test_create_decision_with_same_idempotency_key_returns_original(
    client: TestClient, settings: Settings, applicant: dict
) -> None:
    key = f"key-{uuid.uuid4()}"
    first = client.post("/decisions", json=applicant, headers={"Idempotency-Key": key})
    second = client.post("/decisions", json=applicant, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["location"] == first.headers["location"]
    assert count_rows(settings, "idempotency_key = %s", (key,)) == 1


def test_create_decision_rejects_idempotency_key_reused_with_other_body(
    client: TestClient, settings: Settings, applicant: dict
) -> None:
    key = f"key-{uuid.uuid4()}"
    assert client.post("/decisions", json=applicant, headers={"Idempotency-Key": key}).status_code == 201
    other = {**applicant, "age": applicant["age"] + 1}
    body = assert_problem(client.post("/decisions", json=other, headers={"Idempotency-Key": key}), 422)
    assert "Idempotency-Key" in body["detail"]
    assert count_rows(settings, "idempotency_key = %s", (key,)) == 1


def test_create_decision_answers_409_while_same_key_in_flight(
    client: TestClient, settings: Settings, applicant: dict
) -> None:
    key = f"key-{uuid.uuid4()}"
    client.app.state.idempotency_in_flight.add(key)  # type: ignore[attr-defined]
    assert_problem(client.post("/decisions", json=applicant, headers={"Idempotency-Key": key}), 409)
    assert count_rows(settings, "idempotency_key = %s", (key,)) == 0


@pytest.mark.parametrize("key", ["x" * 256, "", "caf\u00e9"])
def test_create_decision_rejects_malformed_idempotency_key(client: TestClient, applicant: dict, key: str) -> None:
    headers = [(b"idempotency-key", key.encode())]
    body = assert_problem(client.post("/decisions", json=applicant, headers=headers), 400)
    assert body["title"] == "Invalid header" and "Idempotency-Key" in body["detail"]


# -- validation and body errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "path"),
    [
        ({"age": 17}, "$.age"),
        ({"age": 121}, "$.age"),
        ({"age": "30"}, "$.age"),
        ({"age": 30.5}, "$.age"),
        ({"duration_months": 0}, "$.duration_months"),
        ({"credit_amount": 0}, "$.credit_amount"),
        ({"credit_amount": 1_000_001}, "$.credit_amount"),
        ({"purpose": "yacht"}, "$.purpose"),
        ({"telephone": 1}, "$.telephone"),
        ({"foreign_worker": "yes"}, "$.foreign_worker"),
        ({"personal_status_and_sex": "x"}, "$.personal_status_and_sex"),
    ],
)
def test_create_decision_rejects_invalid_field(
    client: TestClient, settings: Settings, applicant: dict, change: dict, path: str
) -> None:
    before = count_rows(settings)
    body = assert_problem(client.post("/decisions", json={**applicant, **change}), 422)
    assert [e["path"] for e in body["errors"]] == [path]
    assert body["errors"][0]["message"]
    assert count_rows(settings) == before


def test_create_decision_names_missing_field(client: TestClient, applicant: dict) -> None:
    del applicant["savings"]
    body = assert_problem(client.post("/decisions", json=applicant), 422)
    assert body["errors"][0]["path"] == "$.savings"


def test_create_decision_rejects_wrong_shape(client: TestClient) -> None:
    body = assert_problem(client.post("/decisions", json=[1, 2]), 422)
    assert body["errors"][0]["path"] == "$"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty"),
        (b"   ", "blank"),
        (b"{not json", "malformed"),
        (b'{"purpose": "\xff"}', "not UTF-8"),
        (b"\xff\xfe{}", "binary"),
    ],
)
def test_create_decision_rejects_body_that_is_not_json(client: TestClient, content: bytes, why: str) -> None:
    assert_problem(client.post("/decisions", content=content, headers={"Content-Type": "application/json"}), 400)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_create_decision_rejects_non_json_media_type(
    client: TestClient, applicant: dict, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/decisions", content=json.dumps(applicant).encode(), headers=headers)
    assert_problem(response, 415)


def test_create_decision_accepts_json_with_charset(client: TestClient, applicant: dict) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert client.post("/decisions", content=json.dumps(applicant).encode(), headers=headers).status_code == 201


def test_create_decision_rejects_body_over_one_mebibyte(client: TestClient, applicant: dict) -> None:
    padded = json.dumps(applicant)[:-1] + ', "pad": "' + "x" * (1024 * 1024) + '"}'
    assert_problem(
        client.post("/decisions", content=padded.encode(), headers={"Content-Type": "application/json"}), 413
    )


def test_create_decision_rejects_chunked_body_over_limit(client: TestClient) -> None:
    def chunks() -> Any:
        for _ in range(17):
            yield b" " * (64 * 1024)

    response = client.post("/decisions", content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(response, 413)


def _with_duplicate(applicant: dict, key: str, value: Any, spelled: str | None = None) -> str:
    """The applicant as JSON text with `key` given a second time, last, as `spelled` (an escaped form, say)."""
    return json.dumps(applicant)[:-1] + f', "{spelled or key}": {json.dumps(value)}}}'


@pytest.mark.parametrize("spelled", ["age", "\\u0061ge"], ids=["plain", "escaped"])
def test_a_key_given_twice_is_refused_naming_it(
    client: TestClient, settings: Settings, applicant: dict, spelled: str
) -> None:
    before = count_rows(settings)
    body = _with_duplicate(applicant, "age", 99, spelled)
    response = client.post("/decisions", content=body, headers={"Content-Type": "application/json"})
    problem = assert_problem(response, 422)
    assert problem["type"].endswith("/duplicate-key") and "'age'" in problem["detail"], problem
    batch = '{"applicants": [' + json.dumps(applicant) + ", " + _with_duplicate(applicant, "job", "skilled") + "]}"
    response = client.post("/decisions/batch", content=batch, headers={"Content-Type": "application/json"})
    assert "'job'" in assert_problem(response, 422)["detail"]
    assert count_rows(settings) == before


def test_the_duplicate_check_counts_a_defaulted_field_only_when_it_is_sent() -> None:
    """A field whose default comes from a factory is absent unless sent: it must not hide a duplicate."""

    class Tagged(msgspec.Struct, forbid_unknown_fields=True):
        a: int = 0
        tags: list[str] = msgspec.field(default_factory=list)

    decoder = msgspec.json.Decoder(Tagged)
    assert decode(decoder, b'{"a": 1, "tags": []}') == Tagged(1, [])
    with pytest.raises(DuplicateKey, match="'a'"):
        decode(decoder, b'{"a": 1, "a": 2}')


@pytest.mark.parametrize(
    "body",
    [
        lambda a: {**a, "reference": "APP:2026:1"},  # a ':' inside a string
        lambda a: {**a, "reference": None},  # a member whose value is the default
        lambda a: {**a, "reference": 'the key "age": 99'},  # a key's spelling inside a string
    ],
    ids=["colons", "explicit-null", "quoted-key"],
)
def test_bodies_that_only_look_like_duplicates_are_accepted(client: TestClient, applicant: dict, body: Any) -> None:
    response = client.post("/decisions", json=body(applicant))
    assert response.status_code == 201, response.text


LONG = "x" * 900_000


@pytest.mark.parametrize(
    ("path", "change"),
    [
        ("/decisions", lambda a: {**a, "purpose": LONG}),  # a bad enum value
        ("/decisions", lambda a: {**a, LONG: 1}),  # an unknown key
        ("/decisions", lambda a: {**a, "housing": "own " * 200_000}),  # a value with spaces
        ("/decisions/batch", lambda a: {"applicants": [{**a, "k" * 7_000: 1}] * 1000}),  # a 7 MB batch
    ],
    ids=["enum", "key", "spaced", "batch"],
)
def test_problems_quote_only_a_short_prefix_of_bad_input(
    client: TestClient, applicant: dict, path: str, change: Any
) -> None:
    response = client.post(path, content=json.dumps(change(applicant)), headers={"Content-Type": "application/json"})
    body = assert_problem(response, 422)
    assert len(response.content) < 2048, len(response.content)
    assert "…" in body["detail"]
    assert "x" * 65 not in response.text and "k" * 65 not in response.text


# -- batch ------------------------------------------------------------------------------------


def test_batch_scores_in_order_and_commits_all(client: TestClient, settings: Settings, applicants: list[dict]) -> None:
    chosen = applicants[:25]
    response = client.post("/decisions/batch", json={"applicants": chosen})
    assert response.status_code == 201, response.text
    decisions = response.json()["decisions"]
    assert len(decisions) == 25
    scorer = client.app.state.models.current.champion.scorer  # type: ignore[attr-defined]
    for body, decision in zip(chosen, decisions, strict=True):
        assert decision["probability_of_default"] == scorer.probability(msgspec.convert(body, Applicant))
    ids = tuple(d["id"] for d in decisions)
    assert count_rows(settings, "id IN (" + ", ".join(["%s"] * len(ids)) + ")", ids) == 25
    # Each is readable by id.
    assert client.get(f"/decisions/{ids[7]}").json() == decisions[7]


def test_batch_with_one_invalid_applicant_stores_nothing(
    client: TestClient, settings: Settings, applicants: list[dict]
) -> None:
    chosen = [dict(a) for a in applicants[:10]]
    chosen[3]["age"] = 7
    before = count_rows(settings)
    body = assert_problem(client.post("/decisions/batch", json={"applicants": chosen}), 422)
    assert body["errors"][0]["path"] == "$.applicants[3].age"
    assert count_rows(settings) == before


def test_batch_with_same_idempotency_key_returns_original_batch(
    client: TestClient, settings: Settings, applicants: list[dict]
) -> None:
    key = f"batch-{uuid.uuid4()}"
    body = {"applicants": applicants[:4]}
    first = client.post("/decisions/batch", json=body, headers={"Idempotency-Key": key})
    before = count_rows(settings)
    again = client.post("/decisions/batch", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == first.json()
    assert count_rows(settings) == before
    other = client.post("/decisions/batch", json={"applicants": applicants[:3]}, headers={"Idempotency-Key": key})
    assert_problem(other, 422)
    # A key first used by a batch cannot be replayed as a single decision, nor the reverse.
    assert_problem(client.post("/decisions", json=applicants[0], headers={"Idempotency-Key": key}), 422)
    single = f"single-{uuid.uuid4()}"
    assert client.post("/decisions", json=applicants[0], headers={"Idempotency-Key": single}).status_code == 201
    assert_problem(client.post("/decisions/batch", json=body, headers={"Idempotency-Key": single}), 422)
    assert count_rows(settings) == before + 1


@pytest.mark.parametrize("size", [0, 1001])
def test_batch_rejects_size_outside_1_to_1000(client: TestClient, applicant: dict, size: int) -> None:
    body = assert_problem(client.post("/decisions/batch", json={"applicants": [applicant] * size}), 422)
    assert body["errors"][0]["path"] == "$.applicants"


def test_batch_accepts_1000_applicants(client: TestClient, settings: Settings, applicants: list[dict]) -> None:
    response = client.post("/decisions/batch", json={"applicants": applicants[:1000]})
    assert response.status_code == 201
    assert len(response.json()["decisions"]) == 1000


def test_batch_rejects_body_over_eight_mebibytes(client: TestClient) -> None:
    content = b'{"applicants": [' + b" " * (8 * 1024 * 1024) + b"]}"
    assert_problem(client.post("/decisions/batch", content=content, headers={"Content-Type": "application/json"}), 413)


# -- GET /decisions/{id} -------------------------------------------------------------------------


def test_get_decision_reads_cache_then_store(client: TestClient, settings: Settings, applicant: dict) -> None:
    created = client.post("/decisions", json=applicant).json()
    cache = client.app.state.cache  # type: ignore[attr-defined]
    hits = cache.hits
    assert client.get(f"/decisions/{created['id']}").json() == created
    assert cache.hits == hits + 1
    _evict(client, settings, created["id"])
    misses = cache.misses
    from_store = client.get(f"/decisions/{created['id']}")
    assert from_store.status_code == 200
    assert from_store.json() == created
    assert cache.misses == misses + 1


def _evict(client: TestClient, settings: Settings, decision_id: str) -> None:
    cache = client.app.state.cache  # type: ignore[attr-defined]
    if settings.redis_url:
        import redis

        r = redis.Redis.from_url(settings.redis_url)
        # Cache writes are flushed off the response path, a few milliseconds later.
        key = f"{settings.redis_key_prefix}decision:{decision_id}"
        assert wait_until(lambda: r.delete(key) == 1, timeout=2)
        r.close()
    else:
        del cache._entries[uuid.UUID(decision_id)]


@pytest.mark.parametrize("decision_id", [str(uuid.UUID(int=0)), "not-a-uuid", "0" * 40])
def test_get_unknown_decision_is_404(client: TestClient, decision_id: str) -> None:
    assert_problem(client.get(f"/decisions/{decision_id}"), 404)


# -- routing errors, auth ------------------------------------------------------------------


def test_unknown_path_is_problem_404(client: TestClient) -> None:
    assert_problem(client.get("/nope"), 404)


@pytest.mark.parametrize(
    ("method", "path"), [("DELETE", "/decisions"), ("PUT", "/decisions"), ("GET", "/decisions/batch")]
)
def test_wrong_method_is_problem_405(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path)
    assert_problem(response, 405)
    assert "POST" in response.headers["allow"]


@pytest.mark.parametrize("path", ["/decisions/", "/model/"])
def test_trailing_slash_is_404_not_redirect(client: TestClient, path: str) -> None:
    assert_problem(client.get(path, follow_redirects=False), 404)


def test_api_keys_guard_decisions(settings: Settings, applicant: dict) -> None:
    import dataclasses

    from service.app import create_app

    keyed = dataclasses.replace(settings, api_keys=(("one", "k-one"), ("two", "k-two")))
    with TestClient(create_app(keyed)) as client:
        missing = client.post("/decisions", json=applicant)
        assert_problem(missing, 401)
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert_problem(client.post("/decisions", json=applicant, headers={"Authorization": "Bearer nope"}), 401)
        assert_problem(client.get(f"/decisions/{uuid.uuid4()}", headers={"Authorization": "Basic k-one"}), 401)
        ok = client.post("/decisions", json=applicant, headers={"Authorization": "Bearer k-two"})
        assert ok.status_code == 201
        assert client.get(ok.headers["location"], headers={"Authorization": "Bearer k-one"}).status_code == 200
        for open_path in ("/health/live", "/health/ready", "/model"):
            assert client.get(open_path).status_code == 200
        # Who asks comes before what is asked: without a key, no 404 for a path, no 405 for a method.
        for method, path in [
            ("GET", "/decisions/not-a-uuid"),
            ("DELETE", f"/decisions/{uuid.uuid4()}"),
            ("PATCH", "/decisions"),
            ("GET", "/decisions/batch/x"),
            ("GET", "/monitoring"),
        ]:
            assert_problem(client.request(method, path), 401)
            assert_problem(client.request(method, path, headers={"Authorization": "Bearer nope"}), 401)
        # With no ADMIN_API_KEYS the admin endpoints are off, whatever the path.
        assert "ADMIN_API_KEYS" in assert_problem(client.put("/admin/nothing-here"), 403)["detail"]
        assert_problem(client.get("/decisions/not-a-uuid", headers={"Authorization": "Bearer k-one"}), 404)
    # Behind a path prefix (uvicorn's --root-path) too.
    with TestClient(create_app(keyed), root_path="/api") as prefixed:
        assert_problem(prefixed.get("/api/decisions/not-a-uuid"), 401)
        assert_problem(prefixed.post("/api/monitoring"), 401)


# -- model, health, request ids ---------------------------------------------------------------


def test_model_describes_itself(client: TestClient) -> None:
    body = client.get("/model").json()
    for key in ("name", "version", "trained_at", "libraries", "sha256", "features", "cutoff", "risk_bands", "metrics"):
        assert key in body
    assert body["cutoff"] == pytest.approx(1 / 6)
    assert [b["category"] for b in body["risk_bands"]] == ["very_low", "low", "medium", "high", "very_high"]
    assert set(body["metrics"]) == {"roc_auc", "gini", "ks", "brier"}
    names = [f["name"] for f in body["features"]]
    assert "foreign_worker" not in names and "personal_status_and_sex" not in names
    assert len(names) == 18


def test_health_live_and_ready(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"model": "ok", "database": "ok", "cache": "ok"}


def test_ready_is_503_once_shutdown_began(client: TestClient) -> None:
    client.app.state.shutting_down = True  # type: ignore[attr-defined]
    response = client.get("/health/ready")
    body = assert_problem(response, 503)
    assert response.headers["retry-after"]
    assert body["checks"]["shutdown"] == "in progress"
    client.app.state.shutting_down = False  # type: ignore[attr-defined]


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    assert client.get("/health/live", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/health/live").headers["x-request-id"]
    assert len(made) == 32
    # An id that could forge log lines is replaced, not echoed.
    assert client.get("/health/live", headers={"X-Request-ID": "a b\tc"}).headers["x-request-id"] != "a b\tc"
    assert client.get("/nope").headers["x-request-id"]


def test_client_that_hangs_up_mid_body_is_logged_not_an_error(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    incoming = [{"type": "http.request", "body": b'{"age": 3', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/decisions",
        "raw_path": b"/decisions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"gone-1")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    caplog.clear()
    client.portal.call(client.app, scope, receive, send)  # type: ignore[union-attr]
    assert sent == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    access = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert access and access[0].startswith("POST /decisions 499 ")


def test_access_log_keeps_path_encoded(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.clear()
    client.get("/decisions/x%0aFAKE%20LINE")
    access = [r.getMessage() for r in caplog.records if r.name == "service.access"]
    assert access == [access[0]] and "\n" not in access[0] and "%0a" in access[0]
