"""Admission control in the connection layer (service/protocol.py) against raw sockets.

One service from the Procfile admitting 2 requests at once, with a 1 s keep-alive
timeout. Two requests are held in flight by sending all of their body but its
last bytes; what arrives meanwhile is refused at once, written straight to the
connection, and the connection lives on.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import rawhttp
from tests.conftest import redis_prefix, wait_until
from tests.procfile import Service, service_environment

pytestmark = pytest.mark.process

LIMIT = 2


@pytest.fixture(scope="module")
def service(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = service_environment(
        postgres_url,
        redis_url,
        REDIS_KEY_PREFIX=redis_prefix(),
        MAX_CONCURRENT_REQUESTS=str(LIMIT),
        UVICORN_TIMEOUT_KEEP_ALIVE="1",
    )
    started = Service(env, tmp_path_factory.mktemp("admission") / "service.log")
    started.wait_ready()
    yield started
    started.stop(signal.SIGTERM)


def _post(body: bytes, *extra: bytes, version: bytes = b"1.1") -> bytes:
    return rawhttp.request("POST", "/decisions", body, *extra, version=version)


def _get(path: str) -> bytes:
    return rawhttp.request("GET", path)


def _statuses(sock: socket.socket, count: int) -> list[int]:
    return [rawhttp.status(answer) for answer in rawhttp.responses(sock, count)]


@contextlib.contextmanager
def _held(service: Service, body: bytes) -> Iterator[list[socket.socket]]:
    """LIMIT requests in flight, each waiting for the last bytes of its body; on leaving, each is finished and
    must answer 201."""
    held = []
    try:
        for _ in range(LIMIT):
            sock = rawhttp.connect(service)
            held.append(sock)
            sock.sendall(_post(body)[:-10])

        def full() -> bool:  # a request sent now is refused: both held ones are in flight
            with rawhttp.connect(service) as probe:
                probe.sendall(_post(body))
                return _statuses(probe, 1) == [503]

        assert wait_until(full, timeout=5)
        yield held
        for sock in held:
            sock.sendall(body[-10:])
        assert [_statuses(sock, 1) for sock in held] == [[201]] * LIMIT
    finally:
        for sock in held:
            sock.close()


@pytest.fixture
def body(applicant: dict[str, Any]) -> bytes:
    return json.dumps(applicant).encode()


def test_at_capacity_a_request_is_refused_at_once_and_its_connection_lives_on(service: Service, body: bytes) -> None:
    with rawhttp.connect(service) as sock, _held(service, body):
        started = time.monotonic()
        sock.sendall(_post(body))
        [answer] = rawhttp.responses(sock, 1)
        assert rawhttp.status(answer) == 503 and time.monotonic() - started < 1.0
        headers, problem = rawhttp.headers(answer), json.loads(rawhttp.body(answer))
        assert headers["content-type"] == "application/problem+json"
        assert headers["retry-after"] == "1" and "connection" not in headers and "date" in headers
        assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
        assert problem["type"].endswith("/at-capacity") and problem["status"] == 503
        # Probes and scrapes are answered over the limit; a refused request's body, sent after its answer, is
        # read and dropped, never taken for the next request's head.
        sock.sendall(_get("/health/live") + _get("/health/ready") + _get("/metrics"))
        assert _statuses(sock, 3) == [200, 200, 200]
        request = _post(body)
        sock.sendall(request[: -len(body)])
        assert _statuses(sock, 1) == [503]
        sock.sendall(request[-len(body) :] + _get("/health/live"))
        assert _statuses(sock, 1) == [200]
    with rawhttp.connect(service) as sock:  # the held ones answered: their places are free again
        sock.sendall(_post(body))
        assert _statuses(sock, 1) == [201]


def test_pipelined_requests_are_answered_in_order_and_each_checked_when_its_turn_comes(
    service: Service, body: bytes
) -> None:
    with rawhttp.connect(service) as sock, _held(service, body):
        sock.sendall(_post(body) + _post(body) + _get("/health/live"))
        assert _statuses(sock, 3) == [503, 503, 200]
    with rawhttp.connect(service) as held, rawhttp.connect(service) as sock:
        held.sendall(_post(body)[:-10])  # one place taken, one left
        time.sleep(0.3)
        # The first is admitted; the second's turn comes as the first is answered, its task not yet ended.
        sock.sendall(_post(body) + _post(body))
        assert _statuses(sock, 2) == [201, 503]
        held.sendall(body[-10:])
        assert _statuses(held, 1) == [201]


@pytest.mark.parametrize("how", ["HTTP/1.0", "Expect: 100-continue", "Connection: close"])
def test_a_refusal_closes_the_connection_where_it_cannot_be_kept(service: Service, body: bytes, how: str) -> None:
    with rawhttp.connect(service) as sock, _held(service, body):
        if how == "HTTP/1.0":
            sock.sendall(_post(body, version=b"1.0"))
        elif how == "Connection: close":
            sock.sendall(_post(body, b"Connection: close"))
        else:  # the body is not sent: the client waits for "100 Continue", or for a final answer
            sock.sendall(_post(body, b"Expect: 100-continue")[: -len(body)])
        [answer] = rawhttp.responses(sock, 1)
        assert rawhttp.status(answer) == 503 and rawhttp.headers(answer)["connection"] == "close"
        assert rawhttp.until_closed(sock, timeout=2)[1] < 0.5


def test_a_connection_left_idle_after_a_refused_body_is_closed_at_the_keep_alive_timeout(
    service: Service, body: bytes
) -> None:
    """The refusal arms the idle timer; the body's arrival stops it; the request's end must arm it again."""
    with rawhttp.connect(service) as sock, _held(service, body):
        request = _post(body)
        sock.sendall(request[: -len(body)])
        assert _statuses(sock, 1) == [503]
        time.sleep(0.2)
        sock.sendall(request[-len(body) :])
        assert 0.5 < rawhttp.until_closed(sock, timeout=4)[1] < 2.5


def test_refusals_are_counted_and_summed_up_in_one_line_without_access_lines(service: Service, body: bytes) -> None:
    before = len(service.log().splitlines())
    with _held(service, body):
        for _ in range(20):
            with rawhttp.connect(service) as sock:
                sock.sendall(_post(body))
                assert _statuses(sock, 1) == [503]
        time.sleep(1.1)  # the summary is written at most once a second, by the next refusal
        with rawhttp.connect(service) as sock:
            sock.sendall(_post(body) + _get("/metrics"))
            refused, scraped = rawhttp.responses(sock, 2)
    assert (rawhttp.status(refused), rawhttp.status(scraped)) == (503, 200)
    shed = re.search(rb"^requests_shed_total (\S+)$", rawhttp.body(scraped), re.MULTILINE)
    assert shed is not None and float(shed.group(1)) >= 21
    assert wait_until(lambda: f"At capacity ({LIMIT} requests in progress)" in service.log(), timeout=2)
    lines = service.log().splitlines()[before:]
    assert not [line for line in lines if "POST /decisions 503" in line], lines
    assert "Traceback" not in service.log()
