"""The system of record going away and coming back, through a proxy the test cuts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest
from starlette.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.tcpproxy import TcpProxy


@pytest.fixture
def proxied(postgres_url: str) -> Iterator[tuple[TcpProxy, str]]:
    parts = urlsplit(postgres_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        netloc = f"{parts.username}@127.0.0.1:{proxy.port}"
        yield proxy, urlunsplit(parts._replace(netloc=netloc))


def test_postgres_outage_answers_503_then_recovers(proxied: tuple[TcpProxy, str], applicant: dict) -> None:
    proxy, url = proxied
    settings = Settings(database_url=url, database_request_timeout=1.0, database_connect_timeout=2.0)
    with TestClient(create_app(settings)) as client:
        created = client.post("/decisions", json=applicant)
        assert created.status_code == 201
        proxy.cut()
        for _ in range(3):
            started = time.monotonic()
            response = client.post("/decisions", json=applicant)
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"]
            assert time.monotonic() - started < 3
        # Lookups that miss the cache need the store too.
        assert client.get("/decisions/00000000-0000-4000-8000-000000000000").status_code == 503
        # The cached decision is still served.
        assert client.get(created.headers["location"]).status_code == 200
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200
        proxy.restore()
        deadline = time.monotonic() + 10
        while (status := client.post("/decisions", json=applicant).status_code) != 201 and time.monotonic() < deadline:
            assert status == 503
            time.sleep(0.2)
        assert status == 201
        assert client.get("/health/ready").status_code == 200
