"""Logs for operators: one access line per request with its id, JSON when asked, no secrets."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from starlette.testclient import TestClient

from service import logs
from service.app import create_app
from service.errors import StoreUnavailable
from service.settings import Settings


def test_access_line_per_request_carries_method_path_status_duration_and_id(
    settings: Settings, caplog: pytest.LogCaptureFixture, applicant: dict
) -> None:
    with TestClient(create_app(settings)) as client:
        caplog.clear()
        response = client.post("/decisions", json=applicant, headers={"X-Request-ID": "req-42"})
    access = [r for r in caplog.records if r.name == "service.access"]
    assert len(access) == 1
    assert access[0].getMessage().startswith("POST /decisions 201 ")
    assert access[0].getMessage().endswith(" ms")
    assert access[0].request_id == "req-42" == response.headers["x-request-id"]  # type: ignore[attr-defined]


def test_info_logs_hold_no_applicant_data_or_api_key(
    settings: Settings, caplog: pytest.LogCaptureFixture, applicant: dict
) -> None:
    caplog.set_level(logging.INFO)
    keyed = dataclasses.replace(settings, api_keys=(("app", "super-secret-key"),))
    applicant = {**applicant, "purpose": "retraining", "credit_amount": 98765.4}
    with TestClient(create_app(keyed)) as client:
        client.post("/decisions", json=applicant, headers={"Authorization": "Bearer super-secret-key"})
        client.post("/decisions", json=applicant, headers={"Authorization": "Bearer wrong-key"})
    assert "super-secret-key" not in caplog.text
    assert "wrong-key" not in caplog.text
    assert "98765" not in caplog.text
    assert "retraining" not in caplog.text


def test_debug_logs_hold_no_secrets_either(
    settings: Settings, caplog: pytest.LogCaptureFixture, applicant: dict
) -> None:
    """Every logger at DEBUG (ours, uvicorn's, psycopg's, the pool's): no API key and no database password."""
    caplog.set_level(logging.DEBUG)
    database_url, password = settings.database_url, "db-secret-3"
    if database_url:
        parts = urlsplit(database_url)
        if parts.password:  # a server that checks passwords: look for the real one
            password = parts.password
        else:  # trust authentication ignores it, and a driver that logged its URL would show it
            netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5432}"
            database_url = urlunsplit(parts._replace(netloc=netloc))
    keyed = dataclasses.replace(
        settings,
        log_level="DEBUG",  # start-up sets the root logger's level from it
        api_keys=(("app", "app-secret-1"),),
        admin_keys=(("ops", "admin-secret-2"),),
        database_url=database_url,
    )
    with TestClient(create_app(keyed)) as client:
        assert logging.getLogger().getEffectiveLevel() == logging.DEBUG
        assert (
            client.post("/decisions", json=applicant, headers={"Authorization": "Bearer app-secret-1"}).status_code
            == 201
        )
        assert (
            client.post("/decisions", json=applicant, headers={"Authorization": "Bearer wrong-secret-4"}).status_code
            == 401
        )
        assert client.get("/admin/models", headers={"Authorization": "Bearer admin-secret-2"}).status_code == 200
    for secret in ("app-secret-1", "admin-secret-2", password, "wrong-secret-4"):
        assert secret not in caplog.text, secret


def test_json_format_writes_one_object_per_line_with_request_id() -> None:
    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "GET %s %d", ("/x", 200), None)
    record.request_id = "abc"
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "GET /x 200"
    assert entry["request_id"] == "abc"
    assert entry["level"] == "INFO" and entry["logger"] == "service.access"
    assert entry["time"].endswith("Z")


def test_text_format_shows_request_id() -> None:
    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "hello", (), None)
    record.request_id = "abc"
    assert "[abc] hello" in logs.TextFormatter().format(record)


def test_lenient_config_falls_back_to_defaults_before_validation() -> None:
    assert logs.lenient_config({"LOG_LEVEL": "loud", "LOG_FORMAT": "xml"}) == ("INFO", "text")
    assert logs.lenient_config({"LOG_LEVEL": "debug", "LOG_FORMAT": "JSON"}) == ("DEBUG", "json")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_request_id_follows_the_request_through_its_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str], fmt: str
) -> None:
    settings = Settings(sqlite_path=tmp_path / "d.sqlite3", log_format=fmt)
    with TestClient(create_app(settings)) as client:
        store = client.app.state.store  # type: ignore[attr-defined]

        async def unavailable(decision_id: object) -> None:
            raise StoreUnavailable("the test took it away")

        store.get = unavailable
        capfd.readouterr()
        response = client.get("/decisions/00000000-0000-4000-8000-000000000002", headers={"X-Request-ID": "trace-42"})
        assert response.status_code == 503
        assert response.headers["x-request-id"] == "trace-42"
        written = capfd.readouterr().err.splitlines()
    mine = [line for line in written if "trace-42" in line]
    # The warning about the outage and the access line, each tagged with the id.
    assert len(mine) == 2
    if fmt == "json":
        entries = [json.loads(line) for line in mine]
        assert {e["logger"] for e in entries} == {"service.errors", "service.access"}
        assert all(e["request_id"] == "trace-42" for e in entries)
    else:
        assert all("[trace-42]" in line for line in mine)
        assert "answered 503" in mine[0] and "GET /decisions/" in mine[1]
