"""Outcomes and monitoring on both back ends: PSI that moves when the population does, and back-testing that
equals scikit-learn's, all computed in the database.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve
from starlette.testclient import TestClient

from service import dataset, monitoring
from service.app import create_app
from service.settings import Settings
from tests.conftest import SHIPPED_VERSION, Versions

PROBLEM = "application/problem+json"


@pytest.fixture(params=["postgres", "sqlite"])
def monitored_settings(request: pytest.FixtureRequest, versions: Versions, tmp_path: Path) -> Settings:
    common: dict[str, Any] = {"model_dir": versions.root, "model_version": versions.shipped}
    if request.param == "postgres":
        return Settings(database_url=request.getfixturevalue("own_postgres_url"), **common)
    return Settings(sqlite_path=tmp_path / "monitoring.sqlite3", **common)


@pytest.fixture
def client(monitored_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(monitored_settings)) as client:
        yield client


def post_batch(client: TestClient, applicants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    decisions = []
    for start in range(0, len(applicants), 500):
        response = client.post("/decisions/batch", json={"applicants": applicants[start : start + 500]})
        assert response.status_code == 201, response.text
        decisions += response.json()["decisions"]
    return decisions


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


# -- definitions -------------------------------------------------------------------------------


def test_psi_follows_its_definition_and_floors_empty_bins() -> None:
    expected = [0.5, 0.3, 0.2]
    assert monitoring.psi(expected, [50, 30, 20]) == pytest.approx(0.0)
    counts = [20, 30, 0]
    a = [0.4, 0.6, 0.0001]
    by_hand = sum((x - e) * np.log(x / e) for x, e in zip(a, expected, strict=True))
    assert monitoring.psi(expected, counts) == pytest.approx(by_hand)
    assert monitoring.psi(expected, [0, 0, 0]) is None
    assert [monitoring.status(v) for v in (0.0999, 0.10, 0.2499, 0.25, None)] == [
        "stable",
        "watch",
        "watch",
        "act",
        None,
    ]


def test_numeric_bins_are_deciles_closed_on_the_right() -> None:
    values = list(range(1, 101))
    bins = monitoring.numeric_bins(values)
    assert bins.edges == pytest.approx(list(np.quantile(values, [i / 10 for i in range(1, 10)])))
    assert bins.frequencies == pytest.approx([0.1] * 10)
    assert monitoring.bin_index(bins, bins.edges[0]) == 0  # x <= edge: the lower bin
    discrete = monitoring.numeric_bins([1, 1, 1, 2, 2, 3, 4, 4, 4, 4])
    assert discrete.edges == sorted(set(discrete.edges))  # ties collapse


def test_the_shipped_model_records_its_training_distribution() -> None:
    meta = json.loads((Path("artifacts/models") / SHIPPED_VERSION / "metadata.json").read_text())
    distribution = meta["training_distribution"]
    assert len(distribution["probability"]["edges"]) == 9
    assert sum(distribution["probability"]["frequencies"]) == pytest.approx(1.0)
    assert set(distribution["features"]) == {f["name"] for f in meta["features"]}
    assert distribution["features"]["purpose"]["values"][0] == "car_new"


# -- outcomes ---------------------------------------------------------------------------------------


def test_outcome_is_recorded_once_and_conflicts_are_refused(client: TestClient, applicant: dict) -> None:
    decision = client.post("/decisions", json=applicant).json()
    url = f"/decisions/{decision['id']}/outcome"
    body = {"defaulted": True, "observed_at": now()}
    first = client.put(url, json=body)
    assert first.status_code == 201, first.text
    assert first.json()["decision_id"] == decision["id"] and first.json()["defaulted"] is True
    again = client.put(url, json=body)
    assert again.status_code == 200 and again.json() == first.json()
    other = client.put(url, json={**body, "defaulted": False})
    assert other.status_code == 409 and other.headers["content-type"] == PROBLEM
    assert "already has another outcome" in other.json()["detail"]
    assert client.put(url, json={**body, "observed_at": now()}).status_code == 409  # another observation time


@pytest.mark.parametrize(
    ("body", "status", "path"),
    [
        ({"defaulted": True}, 422, "$.observed_at"),
        ({"defaulted": "yes", "observed_at": "2026-11-29T10:00:00Z"}, 422, "$.defaulted"),
        ({"defaulted": True, "observed_at": "2026-11-29T10:00:00"}, 422, "$.observed_at"),  # no offset
        ({"defaulted": True, "observed_at": "2999-01-01T00:00:00Z"}, 422, "$.observed_at"),  # the future
        ({"defaulted": True, "observed_at": "2020-01-01T00:00:00Z"}, 422, "$.observed_at"),  # before the decision
        ({"defaulted": True, "observed_at": "2026-11-29T10:00:00Z", "note": "x"}, 422, "$.note"),
    ],
)
def test_outcome_with_a_bad_body_is_a_problem(
    client: TestClient, applicant: dict, body: dict[str, Any], status: int, path: str
) -> None:
    decision = client.post("/decisions", json=applicant).json()
    response = client.put(f"/decisions/{decision['id']}/outcome", json=body)
    assert response.status_code == status, response.text
    assert response.json()["errors"][0]["path"] == path


def test_outcome_for_an_unknown_decision_is_404(client: TestClient) -> None:
    response = client.put(
        "/decisions/00000000-0000-4000-8000-000000000000/outcome", json={"defaulted": False, "observed_at": now()}
    )
    assert response.status_code == 404 and response.headers["content-type"] == PROBLEM
    assert client.put("/decisions/not-a-uuid/outcome", json={}).status_code == 404
    bad = client.put(
        "/decisions/00000000-0000-4000-8000-000000000000/outcome",
        content=b"{",
        headers={"Content-Type": "application/json"},
    )
    assert bad.status_code == 400


def test_outcomes_and_monitoring_need_the_api_key(monitored_settings: Settings, applicant: dict) -> None:
    with TestClient(create_app(dataclasses.replace(monitored_settings, api_keys=(("app", "k1"),)))) as client:
        assert client.get("/monitoring").status_code == 401
        assert client.put(f"/decisions/{'0' * 8}-0000-4000-8000-{'0' * 12}/outcome", json={}).status_code == 401
        assert client.get("/monitoring", headers={"Authorization": "Bearer k1"}).status_code == 200


# -- monitoring -----------------------------------------------------------------------------------


def test_population_stability_is_stable_for_the_data_set_and_acts_on_a_shift(
    client: TestClient, applicants: list[dict[str, Any]]
) -> None:
    rng = random.Random(7)
    started = now()
    post_batch(client, [rng.choice(applicants) for _ in range(600)])
    time.sleep(0.01)
    between = now()
    time.sleep(0.01)
    shifted = []
    for base in (rng.choice(applicants) for _ in range(600)):
        # Younger, longer loans, overdrawn accounts: the population moves, and so does the risk.
        shifted.append(
            {**base, "age": rng.randint(19, 25), "duration_months": rng.randint(36, 72), "checking_account": "below_0"}
        )
    post_batch(client, shifted)

    first = client.get("/monitoring", params={"since": started, "until": between}).json()
    assert first["model_version"] == SHIPPED_VERSION
    assert first["decisions"]["count"] == 600
    assert first["probability"]["psi"] < 0.10 and first["probability"]["status"] == "stable"
    assert {f["status"] for f in first["features"]} <= {"stable", "watch"}, first["features"]
    assert first["outcomes"] is None
    assert first["thresholds"] == {"watch": 0.10, "act": 0.25}

    later = client.get("/monitoring", params={"since": between}).json()
    assert later["decisions"]["count"] == 600
    assert later["probability"]["status"] == "act", later["probability"]
    by_name = {f["name"]: f for f in later["features"]}
    assert by_name["age"]["status"] == "act" and by_name["duration_months"]["status"] == "act"
    assert by_name["checking_account"]["status"] == "act"
    assert later["decisions"]["decline"] > first["decisions"]["decline"]


def test_back_testing_equals_scikit_learn_on_the_data_sets_outcomes(client: TestClient) -> None:
    data = dataset.load()
    decisions = post_batch(client, [msgspec.to_builtins(a) for a in data.applicants])
    observed = now()
    for decision, label in zip(decisions, data.labels, strict=True):
        response = client.put(
            f"/decisions/{decision['id']}/outcome", json={"defaulted": bool(label), "observed_at": observed}
        )
        assert response.status_code == 201
    body = client.get("/monitoring").json()
    outcomes = body["outcomes"]
    probabilities = np.array([d["probability_of_default"] for d in decisions])
    labels = np.array(data.labels)
    assert outcomes["count"] == 1000
    assert outcomes["default_rate"] == pytest.approx(labels.mean())
    assert abs(outcomes["roc_auc"] - roc_auc_score(labels, probabilities)) < 1e-9
    assert outcomes["gini"] == pytest.approx(2 * outcomes["roc_auc"] - 1, abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, probabilities)
    assert abs(outcomes["ks"] - float(np.max(tpr - fpr))) < 1e-9
    bands = {b["risk_category"]: b for b in outcomes["by_band"]}
    for category in {d["risk_category"] for d in decisions}:
        chosen = [i for i, d in enumerate(decisions) if d["risk_category"] == category]
        assert bands[category]["count"] == len(chosen)
        assert bands[category]["predicted"] == pytest.approx(probabilities[chosen].mean())
        assert bands[category]["observed"] == pytest.approx(labels[chosen].mean())
    assert [b["risk_category"] for b in outcomes["by_band"]] == [
        c for c in ("very_low", "low", "medium", "high", "very_high") if c in bands
    ]
    # Quantiles as numpy's default (linear) computes them.
    assert body["probability"]["p50"] == pytest.approx(np.percentile(probabilities, 50))
    assert body["probability"]["p90"] == pytest.approx(np.percentile(probabilities, 90))
    scores = [d["score"] for d in decisions]
    assert body["score"]["p10"] == pytest.approx(np.percentile(scores, 10))


def test_a_version_without_a_training_distribution_reports_no_psi(
    monitored_settings: Settings, versions: Versions, tmp_path: Path, applicants: list[dict[str, Any]]
) -> None:
    registry = tmp_path / "old-registry"
    shutil.copytree(versions.root / versions.shipped, registry / versions.shipped)
    meta_path = registry / versions.shipped / "metadata.json"
    meta = json.loads(meta_path.read_text())
    del meta["training_distribution"]
    meta_path.write_text(json.dumps(meta))
    with TestClient(create_app(dataclasses.replace(monitored_settings, model_dir=registry))) as client:
        post_batch(client, applicants[:20])
        body = client.get("/monitoring").json()
    assert body["decisions"]["count"] == 20
    assert body["probability"]["psi"] is None and body["probability"]["status"] is None
    assert all(f["psi"] is None and f["status"] is None for f in body["features"])
    assert body["probability"]["mean"] is not None


def test_monitoring_names_its_version_and_window(client: TestClient, versions: Versions) -> None:
    empty = client.get("/monitoring").json()
    assert empty["decisions"] == {"count": 0, "approve": None, "decline": None, "refer": None}
    assert empty["probability"]["psi"] is None
    other = client.get("/monitoring", params={"model_version": versions.logistic}).json()
    assert other["model_version"] == versions.logistic
    assert client.get("/monitoring", params={"model_version": "nope"}).status_code == 404
    assert client.get("/monitoring", params={"since": "soon"}).status_code == 400


def test_challenger_comparison_back_tests_both_models(
    monitored_settings: Settings, versions: Versions, applicants: list[dict[str, Any]]
) -> None:
    settings = dataclasses.replace(monitored_settings, admin_keys=(("ops", "k"),))
    admin = {"Authorization": "Bearer k"}
    labels = dataset.load().labels
    with TestClient(create_app(settings)) as client:
        client.put("/admin/challenger", headers=admin, json={"version": versions.logistic})
        decisions = post_batch(client, applicants[:300])
        deadline = time.monotonic() + 15
        while client.get("/admin/challenger/comparison", headers=admin).json()["count"] < 300:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for decision, label in zip(decisions, labels[:300], strict=True):
            client.put(f"/decisions/{decision['id']}/outcome", json={"defaulted": bool(label), "observed_at": now()})
        outcomes = client.get("/admin/challenger/comparison", headers=admin).json()["outcomes"]
    champion = np.array([d["probability_of_default"] for d in decisions])
    assert outcomes["count"] == 300
    assert abs(outcomes["champion"]["roc_auc"] - roc_auc_score(labels[:300], champion)) < 1e-9
    assert 0.5 < outcomes["challenger"]["roc_auc"] < 1.0
    assert outcomes["challenger"]["gini"] == pytest.approx(2 * outcomes["challenger"]["roc_auc"] - 1)


def test_metrics_gauges_follow_the_database_off_the_request_path(
    monitored_settings: Settings, applicants: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from service.lifecycle import model_steps

    monkeypatch.setattr(model_steps, "GAUGE_FIRST_SECONDS", 1.05)
    monkeypatch.setattr(model_steps, "GAUGE_REFRESH_SECONDS", 0.2)
    with TestClient(create_app(monitored_settings)) as client:
        post_batch(client, applicants[:200])
        expected = client.get("/monitoring").json()
        deadline = time.monotonic() + 10
        while True:
            found = {
                (s.name, s.labels.get("feature")): s.value
                for family in text_string_to_metric_families(client.get("/metrics").text)
                for s in family.samples
                if s.name.startswith(("model_score_psi", "model_feature_psi", "model_approval_rate"))
            }
            if found.get(("model_approval_rate", None)) == pytest.approx(expected["decisions"]["approve"]):
                break
            assert time.monotonic() < deadline, found
            time.sleep(0.1)
    assert found[("model_score_psi", None)] == pytest.approx(expected["probability"]["psi"])
    ages = next(f for f in expected["features"] if f["name"] == "age")
    assert found[("model_feature_psi", "age")] == pytest.approx(ages["psi"])
