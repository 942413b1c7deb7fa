"""`make report`: a self-contained HTML file whose figures are the API's, with its plots embedded as PNG."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from service import dataset, report, storage
from service.app import create_app
from service.settings import Settings
from tests.conftest import Versions

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def database(tmp_path: Path, versions: Versions, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "report.sqlite3"
    for name in ("DATABASE_URL", "REDIS_URL", "API_KEYS", "ADMIN_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SQLITE_PATH", str(path))
    monkeypatch.setenv("MODEL_DIR", str(versions.root))
    return path


def images(page: str) -> dict[str, bytes]:
    return {
        alt: base64.b64decode(data)
        for alt, data in re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    }


def test_report_draws_every_figure_from_the_database(
    database: Path, versions: Versions, applicants: list[dict[str, Any]], tmp_path: Path
) -> None:
    settings = Settings(
        sqlite_path=database, model_dir=versions.root, model_version=versions.shipped, admin_keys=(("ops", "k"),)
    )
    labels = dataset.load().labels
    with TestClient(create_app(settings)) as client:
        client.put("/admin/challenger", headers={"Authorization": "Bearer k"}, json={"version": versions.logistic})
        decisions = client.post("/decisions/batch", json={"applicants": applicants[:400]}).json()["decisions"]
        observed = dt.datetime.now(dt.UTC).isoformat()
        for decision, label in zip(decisions, labels[:400], strict=True):
            client.put(f"/decisions/{decision['id']}/outcome", json={"defaulted": bool(label), "observed_at": observed})
        deadline = dt.datetime.now() + dt.timedelta(seconds=10)
        while client.get("/admin/challenger/comparison", headers={"Authorization": "Bearer k"}).json()["count"] < 400:
            assert dt.datetime.now() < deadline
        monitored = client.get("/monitoring").json()
    output = tmp_path / "out" / "report.html"
    assert report.main(["--output", str(output), "--images", str(tmp_path / "images")]) == 0
    page = output.read_text()
    drawn = images(page)
    assert set(drawn) == {
        "probability by decile",
        "PSI per feature",
        "ROC curve",
        "calibration by band",
        "champion against challenger",
    }
    assert all(png.startswith(PNG) and len(png) > 10_000 for png in drawn.values())
    # The same pictures as files, for a wiki or a slide.
    assert {p.name: p.read_bytes() for p in (tmp_path / "images").iterdir()} == {
        alt.replace(" ", "-") + ".png": png for alt, png in drawn.items()
    }
    # Self-contained: nothing to fetch.
    assert "http://" not in page.replace("http://www.w3.org", "") and "<script" not in page
    assert f"Model report: {versions.shipped}" in page
    assert f"{monitored['outcomes']['roc_auc']:.4f}" in page
    assert f"{monitored['probability']['psi']:.4f}" in page


def test_report_without_outcomes_or_challenger_says_so(
    database: Path, versions: Versions, applicants: list[dict[str, Any]], tmp_path: Path
) -> None:
    settings = Settings(sqlite_path=database, model_dir=versions.root, model_version=versions.shipped)
    with TestClient(create_app(settings)) as client:
        client.post("/decisions/batch", json={"applicants": applicants[:50]})
    output = tmp_path / "report.html"
    assert report.main(["--output", str(output)]) == 0
    page = output.read_text()
    assert set(images(page)) == {"probability by decile", "PSI per feature"}
    assert "No outcome is recorded yet" in page and "No challenger scored" in page


def test_report_on_an_empty_database_fails_with_a_reason(
    database: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def migrate() -> None:
        store = await storage.open_store(Settings(sqlite_path=database), "test")
        await store.migrate()
        await store.close()

    asyncio.run(migrate())
    assert report.main(["--output", str(tmp_path / "r.html")]) == 1
    assert any("No model is assigned in this database yet" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "r.html").exists()
