"""The admin API on both back ends: keys, the registry, promotion and rollback, the challenger and its comparison.

Each test has a database of its own (the assignment is shared by every app on a
database) and the run's registry: the shipped version, a second logistic one and
a boosting one.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from service.app import create_app
from service.models.registry import Registry, load_scorecard
from service.schemas import Applicant
from service.settings import Settings
from service.storage.model_records import FLIPS
from tests.conftest import Versions, corrupt_copy

KEY = "ops-secret-123"
ADMIN = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(params=["postgres", "sqlite"])
def admin_settings(request: pytest.FixtureRequest, versions: Versions, tmp_path: Path) -> Settings:
    common: dict[str, Any] = {
        "model_dir": versions.root,
        "model_version": versions.shipped,
        "admin_keys": (("ops", KEY),),
    }
    if request.param == "postgres":
        return Settings(database_url=request.getfixturevalue("own_postgres_url"), **common)
    return Settings(sqlite_path=tmp_path / "admin.sqlite3", **common)


@pytest.fixture
def admin(admin_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(admin_settings)) as client:
        yield client


def rows(settings: Settings, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if settings.database_url:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            return [tuple(r) for r in conn.execute(query, params).fetchall()]  # type: ignore[arg-type]
    with sqlite3.connect(settings.sqlite_path) as conn:
        return conn.execute(query.replace("%s", "?"), params).fetchall()


def wait_for_rows(settings: Settings, query: str, count: int, timeout: float = 15.0) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        found = rows(settings, query)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def post_many(client: TestClient, applicants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answers = []
    for applicant in applicants:
        response = client.post("/decisions", json=applicant)
        assert response.status_code == 201, response.text
        answers.append(response.json())
    return answers


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}],
)
def test_admin_endpoints_answer_403_without_an_admin_key(admin: TestClient, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/admin/models"),
        ("POST", "/admin/models/whatever/promote"),
        ("PUT", "/admin/challenger"),
        ("GET", "/admin/challenger/comparison"),
        ("GET", "/admin/assignments"),
    ]:
        response = admin.request(method, path, headers=headers, json={"version": None})
        assert response.status_code == 403, (method, path, response.text)
        assert response.headers["content-type"] == "application/problem+json"


def test_admin_endpoints_are_off_without_admin_keys(tmp_path: Path, versions: Versions) -> None:
    settings = Settings(sqlite_path=tmp_path / "db.sqlite3", model_dir=versions.root, api_keys=(("app", KEY),))
    with TestClient(create_app(settings)) as client:
        # Not even a valid API key opens them.
        response = client.get("/admin/models", headers=ADMIN)
        assert response.status_code == 403
        assert "no ADMIN_API_KEYS" in response.json()["detail"]


# -- the registry and promotion ----------------------------------------------------------------------


def test_models_lists_the_registry_the_assignment_and_each_worker(admin: TestClient, versions: Versions) -> None:
    body = admin.get("/admin/models", headers=ADMIN).json()
    assert body["assignment"]["champion"] == versions.shipped
    assert body["assignment"]["revision"] == 1 and body["assignment"]["changed_by"] == "MODEL_VERSION"
    by_version = {v["version"]: v for v in body["versions"]}
    assert by_version[versions.shipped]["role"] == "champion"
    assert by_version[versions.boosting]["kind"] == "boosting" and by_version[versions.boosting]["role"] is None
    assert by_version[versions.logistic]["metrics"]["roc_auc"] > 0.7
    workers = body["workers"]
    assert len(workers) == 1 and workers[0]["champion"] == versions.shipped


def test_promotion_reaches_this_worker_at_once_and_rollback_restores(
    admin: TestClient, admin_settings: Settings, versions: Versions, applicant: dict, caplog: pytest.LogCaptureFixture
) -> None:
    before = admin.post("/decisions", json=applicant).json()
    assert before["model_version"] == versions.shipped

    promoted = admin.post(f"/admin/models/{versions.logistic}/promote", headers=ADMIN)
    assert promoted.status_code == 200, promoted.text
    assert promoted.json()["champion"] == versions.logistic and promoted.json()["changed_by"] == "ops"
    after = admin.post("/decisions", json=applicant).json()
    assert after["model_version"] == versions.logistic
    assert admin.get("/model").json()["version"] == versions.logistic

    rolled_back = admin.post(f"/admin/models/{versions.shipped}/promote", headers=ADMIN).json()
    assert rolled_back["champion"] == versions.shipped and rolled_back["revision"] == 3
    again = admin.post("/decisions", json=applicant).json()
    assert again["model_version"] == versions.shipped
    assert again["probability_of_default"] == before["probability_of_default"]

    history = admin.get("/admin/assignments", headers=ADMIN).json()["changes"]
    assert [(c["revision"], c["action"], c["champion"], c["previous_champion"], c["changed_by"]) for c in history] == [
        (3, "promote", versions.shipped, versions.logistic, "ops"),
        (2, "promote", versions.logistic, versions.shipped, "ops"),
        (1, "initial", versions.shipped, None, "MODEL_VERSION"),
    ]
    # Each committed row carries the version that answered it.
    stored = dict(rows(admin_settings, "SELECT CAST(id AS TEXT), model_version FROM decisions"))
    assert {d["id"]: stored[d["id"]] for d in (before, after, again)} == {
        d["id"]: d["model_version"] for d in (before, after, again)
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "service.admin"]
    assert any(line.startswith(f"Admin key ops promoted {versions.logistic}") for line in lines)
    assert all(KEY not in r.getMessage() for r in caplog.records)


def test_promoting_the_champion_again_changes_nothing(admin: TestClient, versions: Versions) -> None:
    response = admin.post(f"/admin/models/{versions.shipped}/promote", headers=ADMIN)
    assert response.status_code == 200
    assert response.json()["revision"] == 1


@pytest.mark.parametrize("damaged", ["scorecard.json", "model.joblib", "checks.json"])
def test_promoting_a_corrupt_version_is_422_and_changes_nothing(
    admin: TestClient, versions: Versions, applicant: dict, damaged: str
) -> None:
    corrupt = corrupt_copy(versions, versions.logistic, f"test-corrupt-{damaged.split('.')[0]}", damaged)
    response = admin.post(f"/admin/models/{corrupt}/promote", headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "Nothing changed" in response.json()["detail"] and "sha256" in response.json()["detail"]
    assert admin.get("/admin/assignments", headers=ADMIN).json()["changes"][0]["revision"] == 1
    assert admin.post("/decisions", json=applicant).json()["model_version"] == versions.shipped


def test_promoting_unknown_or_boosting_versions_is_refused(admin: TestClient, versions: Versions) -> None:
    assert admin.post("/admin/models/no-such-version/promote", headers=ADMIN).status_code == 404
    assert admin.post("/admin/models/..%2f..%2fetc/promote", headers=ADMIN).status_code == 404
    refused = admin.post(f"/admin/models/{versions.boosting}/promote", headers=ADMIN)
    assert refused.status_code == 422
    assert "only a logistic model can be champion" in refused.json()["detail"]


# -- the challenger ----------------------------------------------------------------------------------


def test_challenger_is_recorded_beside_each_decision_and_compared(
    admin: TestClient, admin_settings: Settings, versions: Versions, applicants: list[dict[str, Any]]
) -> None:
    response = admin.put("/admin/challenger", headers=ADMIN, json={"version": versions.logistic, "share": 1.0})
    assert response.status_code == 200, response.text
    assert response.json()["challenger"] == {"version": versions.logistic, "share": 1.0}
    answers = post_many(admin, applicants[:60])
    batch = admin.post("/decisions/batch", json={"applicants": applicants[60:100]})
    assert batch.status_code == 201
    answers += batch.json()["decisions"]

    recorded = wait_for_rows(
        admin_settings,
        "SELECT decision_id, model_version, probability_of_default, decision, score FROM challenger_decisions",
        100,
    )
    assert len(recorded) == 100
    challenger = load_scorecard(Registry(versions.root).get(versions.logistic), None)
    expected = {
        a["id"]: challenger.scorer.probability(msgspec.convert(body, Applicant))
        for a, body in zip(answers, applicants[:100], strict=True)
    }
    assert {str(r[0]): r[2] for r in recorded} == expected
    assert {r[1] for r in recorded} == {versions.logistic}

    comparison = admin.get("/admin/challenger/comparison", headers=ADMIN).json()
    assert comparison["champion"] == versions.shipped and comparison["challenger"] == versions.logistic
    assert comparison["count"] == 100
    pairs = rows(
        admin_settings,
        "SELECT d.decision, c.decision, d.probability_of_default, c.probability_of_default, d.score, c.score"
        " FROM decisions d JOIN challenger_decisions c ON c.decision_id = d.id",
    )
    assert comparison["flips"] == {f"{a}_to_{b}": sum(1 for p in pairs if p[:2] == (a, b)) for a, b in FLIPS}
    assert comparison["approval_rate"]["champion"] == pytest.approx(np.mean([p[0] == "approve" for p in pairs]))
    assert comparison["approval_rate"]["challenger"] == pytest.approx(np.mean([p[1] == "approve" for p in pairs]))
    delta = np.abs(np.array([p[2] - p[3] for p in pairs]))
    assert comparison["abs_delta_p"]["mean"] == pytest.approx(delta.mean(), rel=1e-9)
    assert comparison["abs_delta_p"]["p95"] == pytest.approx(np.percentile(delta, 95), rel=1e-9)
    r = np.corrcoef([p[4] for p in pairs], [p[5] for p in pairs])[0, 1]
    assert comparison["score_correlation"] == pytest.approx(r, rel=1e-9)
    assert comparison["outcomes"] is None

    # Outside the window: nothing.
    empty = admin.get("/admin/challenger/comparison?until=2020-01-01T00:00:00Z", headers=ADMIN).json()
    assert empty["count"] == 0 and empty["abs_delta_p"]["p95"] is None


def test_challenger_share_samples_by_decision_id(
    admin: TestClient, admin_settings: Settings, versions: Versions, applicants: list[dict[str, Any]]
) -> None:
    admin.put("/admin/challenger", headers=ADMIN, json={"version": versions.logistic, "share": 0.3})
    answers = post_many(admin, applicants[:200])
    sampled = {a["id"] for a in answers if (int(a["id"].replace("-", ""), 16) & 0xFFFFFFFF) < 0.3 * 2**32}
    assert 30 < len(sampled) < 90
    recorded = wait_for_rows(admin_settings, "SELECT decision_id FROM challenger_decisions", len(sampled))
    assert {str(r[0]) for r in recorded} == sampled


def test_boosting_challenger_runs_in_its_own_process(
    admin: TestClient, admin_settings: Settings, versions: Versions, applicants: list[dict[str, Any]]
) -> None:
    response = admin.put("/admin/challenger", headers=ADMIN, json={"version": versions.boosting})
    assert response.status_code == 200, response.text
    assert response.json()["challenger"]["share"] == 1.0  # the default
    process = admin.app.state.models.current.challenger  # type: ignore[attr-defined]
    assert process.pid is not None
    assert int(Path(f"/proc/{process.pid}/stat").read_text().split()[18]) == 19  # reniced: idle CPU only
    post_many(admin, applicants[:30])
    recorded = wait_for_rows(admin_settings, "SELECT decision, model_version FROM challenger_decisions", 30)
    assert len(recorded) == 30 and {r[1] for r in recorded} == {versions.boosting}
    stopped = admin.put("/admin/challenger", headers=ADMIN, json={"version": None})
    assert stopped.status_code == 200 and stopped.json()["challenger"] is None
    deadline = time.monotonic() + 5
    while Path(f"/proc/{process.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{process.pid}").exists(), "the challenger's process outlived its assignment"


def test_challenger_requests_that_cannot_be_served_are_refused(admin: TestClient, versions: Versions) -> None:
    def put(body: Any) -> Any:
        return admin.put("/admin/challenger", headers=ADMIN, json=body)

    assert put({"version": versions.shipped}).status_code == 422  # the champion
    assert put({"version": "no-such-version"}).status_code == 404
    assert put({"version": versions.logistic, "share": 1.5}).json()["errors"][0]["path"] == "$.share"
    assert put({"share": 0.5}).status_code == 422  # version is required (null to stop)
    corrupt = corrupt_copy(versions, versions.boosting, "test-corrupt-gb", "model.joblib")
    refused = put({"version": corrupt})
    assert refused.status_code == 422 and "sha256" in refused.json()["detail"]
    assert admin.get("/admin/assignments", headers=ADMIN).json()["changes"][0]["revision"] == 1
    assert admin.get("/admin/challenger/comparison", headers=ADMIN).status_code == 404  # none assigned
    assert admin.get("/admin/challenger/comparison?since=yesterday", headers=ADMIN).status_code == 400
    window = "since=2026-01-02T00:00:00Z&until=2026-01-01T00:00:00Z&challenger=x"
    assert admin.get(f"/admin/challenger/comparison?{window}", headers=ADMIN).status_code == 400
    assert admin.get("/admin/assignments?limit=0", headers=ADMIN).status_code == 400


def test_promoting_the_challenger_ends_its_challenge(admin: TestClient, versions: Versions) -> None:
    admin.put("/admin/challenger", headers=ADMIN, json={"version": versions.logistic, "share": 0.5})
    promoted = admin.post(f"/admin/models/{versions.logistic}/promote", headers=ADMIN).json()
    assert promoted["champion"] == versions.logistic and promoted["challenger"] is None


# -- referral band and metrics ---------------------------------------------------------------------


def test_referral_band_refers_and_is_counted(
    admin_settings: Settings, versions: Versions, applicants: list[dict[str, Any]]
) -> None:
    def referred_total(text: str) -> float:
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "decisions_total" and s.labels.get("decision") == "refer"
        )

    with TestClient(create_app(dataclasses.replace(admin_settings, refer_band=(0.1, 0.3)))) as client:
        before = referred_total(client.get("/metrics").text)
        answers = post_many(client, applicants[:80])
        counted = referred_total(client.get("/metrics").text) - before
    for a in answers:
        p = a["probability_of_default"]
        expected = "refer" if 0.1 <= p < 0.3 else ("decline" if p >= 1 / 6 else "approve")
        assert a["decision"] == expected
        assert a["reasons"] or a["decision"] == "approve"
    referred = sum(a["decision"] == "refer" for a in answers)
    assert referred > 5
    assert counted == referred


def test_metrics_show_the_loaded_versions_reloads_and_challenger_work(
    admin: TestClient, versions: Versions, applicants: list[dict[str, Any]]
) -> None:
    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        # Counters are per test process, not per app: the test reads how much they moved.
        return {
            (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))): s.value
            for family in text_string_to_metric_families(admin.get("/metrics").text)
            for s in family.samples
        }

    before = scrape()
    admin.put("/admin/challenger", headers=ADMIN, json={"version": versions.logistic})
    post_many(admin, applicants[:10])
    admin.post(f"/admin/models/{versions.logistic}/promote", headers=ADMIN)
    scored = ("challenger_scored_total", ())
    deadline = time.monotonic() + 10
    while (found := scrape()).get(scored, 0) - before.get(scored, 0) < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert found[("model_loaded", (("role", "champion"), ("version", versions.logistic)))] == 1
    assert found[("model_loaded", (("role", "champion"), ("version", versions.shipped)))] == 0
    assert found[("model_loaded", (("role", "challenger"), ("version", versions.logistic)))] == 0
    reloads = ("model_reloads_total", (("role", "champion"),))
    assert found[reloads] - before.get(reloads, 0) == 1
    challenger_reloads = ("model_reloads_total", (("role", "challenger"),))
    assert found[challenger_reloads] - before.get(challenger_reloads, 0) == 1
    assert found[scored] - before.get(scored, 0) == 10


def test_admin_logs_name_the_key_never_the_secret(
    admin: TestClient, versions: Versions, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin.put("/admin/challenger", headers=ADMIN, json={"version": versions.logistic, "share": 0.25})
    admin.put("/admin/challenger", headers=ADMIN, json={"version": None})
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"Admin key ops set challenger {versions.logistic} at share 0.25" in line for line in lines)
    assert any("Admin key ops stopped the challenger" in line for line in lines)
    assert not any(KEY in line for line in lines)
