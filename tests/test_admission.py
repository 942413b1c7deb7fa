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
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests import rawhttp
from tests.conftest import redis_prefix, wait_until
from tests.procfile import Service, serving

pytestmark = pytest.mark.process

LIMIT = 2


@pytest.fixture(scope="module")
def service(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serving(
        postgres_url,
        redis_url,
        tmp_path_factory.mktemp("admission") / "service.log",
        REDIS_KEY_PREFIX=redis_prefix(),
        MAX_CONCURRENT_REQUESTS=str(LIMIT),
        UVICORN_TIMEOUT_KEEP_ALIVE="1",
    ) as started:
        yield started


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
        _release(held, body)
    finally:
        for sock in held:
            sock.close()


def _release(held: list[socket.socket], body: bytes) -> None:
    """Finish the held requests (once): each must answer 201."""
    if held and held[0].fileno() != -1:
        for sock in held:
            sock.sendall(body[-10:])
        assert [_statuses(sock, 1) for sock in held] == [[201]] * LIMIT
        for sock in held:
            sock.close()


def _head_only(sock: socket.socket) -> bytes:
    """An answer's head, read byte by byte (an answer to HEAD has a Content-Length but no body)."""
    received = b""
    while not received.endswith(b"\r\n\r\n"):
        chunk = sock.recv(1)
        assert chunk, received
        received += chunk
    return received


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
        # The first is admitted; the second's turn comes as the first is answered, which frees its place though
        # its task has not ended yet (its access line is still to be written).
        sock.sendall(_post(body) + _post(body))
        assert _statuses(sock, 2) == [201, 201]
        held.sendall(body[-10:])
        assert _statuses(held, 1) == [201]


@pytest.mark.parametrize(
    "how", ["HTTP/1.0", "Expect: 100-continue", "Connection: close", "a large body", "a chunked body"]
)
def test_a_refusal_closes_the_connection_where_it_cannot_be_kept(service: Service, body: bytes, how: str) -> None:
    with rawhttp.connect(service) as sock, _held(service, body):
        if how == "HTTP/1.0":
            sock.sendall(_post(body, version=b"1.0"))
        elif how == "Connection: close":
            sock.sendall(_post(body, b"Connection: close"))
        elif how == "a large body":  # not read past: 1 MB that would be read only to be dropped
            sock.sendall(b"POST /decisions/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n{")
        elif how == "a chunked body":
            sock.sendall(b'POST /decisions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"a":')
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


def test_a_refused_head_request_gets_no_body(service: Service, body: bytes) -> None:
    with rawhttp.connect(service) as sock, _held(service, body):
        sock.sendall(rawhttp.request("HEAD", "/decisions/00000000-0000-4000-8000-000000000000"))
        head = _head_only(sock)
        assert rawhttp.status(head) == 503 and int(rawhttp.headers(head)["content-length"]) > 0
        sock.sendall(_get("/health/live"))
        [answer] = rawhttp.responses(sock, 1)
        assert rawhttp.status(answer) == 200, answer  # the next answer is read where it starts


def test_an_upgrade_refused_at_capacity_closes_its_connection(service: Service, body: bytes) -> None:
    with rawhttp.connect(service) as sock, _held(service, body):
        sock.sendall(_post(body, b"Connection: Upgrade", b"Upgrade: h2c"))
        assert _statuses(sock, 1) == [503]
        assert rawhttp.until_closed(sock, timeout=2)[1] < 0.5  # at once, not at the 1 s keep-alive timeout


def test_a_queued_request_refused_with_connection_close_closes_it(service: Service, body: bytes) -> None:
    with rawhttp.connect(service) as sock, _held(service, body):
        # Queued behind a probe (answered over the limit), so refused when its turn comes, not at its head.
        sock.sendall(_get("/health/live") + _post(body, b"Connection: close"))
        answers = rawhttp.responses(sock, 2)
        assert [rawhttp.status(a) for a in answers] == [200, 503]
        assert rawhttp.headers(answers[1])["connection"] == "close"
        assert rawhttp.until_closed(sock, timeout=2)[1] < 0.5


def test_hundreds_of_requests_queued_behind_a_probe_are_each_refused(service: Service, body: bytes) -> None:
    """Refused one after another as their turns come, in a loop: not one call deeper per refusal."""
    before = len(service.log().splitlines())
    queued = 400
    with rawhttp.connect(service) as sock, _held(service, body):
        sock.sendall(_get("/health/live") + _get("/decisions/00000000-0000-4000-8000-000000000000") * queued)
        assert _statuses(sock, 1 + queued) == [200] + [503] * queued
        sock.sendall(_get("/health/live"))
        assert _statuses(sock, 1) == [200]
    assert "Traceback" not in "\n".join(service.log().splitlines()[before:])


def test_a_client_that_never_reads_its_refusals_is_cut_off(service: Service, body: bytes) -> None:
    """Refusals are written at once; one that finds the client's unread answers past the high-water mark closes."""
    with socket.socket() as sock, _held(service, body):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", service.port))
        request = _get("/decisions/00000000-0000-4000-8000-000000000000")
        sent = 0
        with contextlib.suppress(OSError):  # closed while still sending: what is wanted
            for _ in range(50):
                sock.sendall(request * 500)
                sent += 500
        time.sleep(0.5)
        received = b""
        with contextlib.suppress(ConnectionResetError):  # closed with the answers unread: the kernel resets
            while chunk := sock.recv(65536):  # socket.timeout (a failure) if it is left open
                received += chunk
    # Kept whole, the answers to all 25,000 requests (~10 MB) would wait in the worker until read.
    assert received.count(b"HTTP/1.1 503 ") < sent / 4, (len(received), sent)


def test_a_request_after_a_refused_body_in_the_same_read_is_not_cut_by_the_idle_timer(
    service: Service, body: bytes
) -> None:
    """The refused request's end re-arms the idle timer (1 s here); the next request, begun in the same read and
    admitted, must stop it again, or its connection is closed under it."""
    held = [rawhttp.connect(service) for _ in range(LIMIT)]
    try:
        for other in held:
            other.sendall(_post(body)[:-10])
        time.sleep(0.3)
        with rawhttp.connect(service) as sock:
            refused = _post(body)
            sock.sendall(refused[: -len(body)])
            assert _statuses(sock, 1) == [503]
            _release(held, body)  # the places are free again
            admitted = _post(body)
            sock.sendall(refused[-len(body) :] + admitted[:-10])
            time.sleep(1.5)  # past the idle timeout, while the admitted request waits for its last bytes
            sock.sendall(admitted[-10:])
            assert _statuses(sock, 1) == [201]
    finally:
        for other in held:
            other.close()
