"""The connection layer (service/protocol.py) against raw sockets: deadlines, caps, and what it logs.

One service from the Procfile, with short deadlines (1 s) and a small connection
cap (40), so that each limit is reached in a test's time.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tests import rawhttp
from tests.conftest import redis_prefix, wait_until
from tests.procfile import Service, serving

pytestmark = pytest.mark.process

CAP = 40


@pytest.fixture(scope="module")
def limited(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with serving(
        postgres_url,
        redis_url,
        tmp_path_factory.mktemp("connections") / "service.log",
        REDIS_KEY_PREFIX=redis_prefix(),
        HTTP_HEAD_TIMEOUT="1",
        HTTP_BODY_TIMEOUT="2",  # not the head's: a body must be cut by its own deadline
        HTTP_MAX_CONNECTIONS=str(CAP),
        # uvicorn's idle timeout for kept-alive connections (5 s by default), short so that a test can outlast it.
        UVICORN_TIMEOUT_KEEP_ALIVE="1",
    ) as service:
        yield service


def test_a_silent_connection_is_answered_408_and_closed_at_its_deadline(limited: Service) -> None:
    with rawhttp.connect(limited) as sock:
        answer, waited = rawhttp.until_closed(sock)
    assert rawhttp.status(answer) == 408 and 0.8 < waited < 3.0, (answer, waited)
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == 408


def test_a_head_sent_slowly_is_cut_at_its_deadline(limited: Service) -> None:
    with rawhttp.connect(limited) as sock:
        sock.sendall(b"POST /decisions HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a header a while, never the end of the head
            time.sleep(0.4)
            sock.sendall(b"X-Slow: 1\r\n")
        answer, _ = rawhttp.until_closed(sock)
    assert rawhttp.status(answer) == 408


def test_a_body_that_stops_coming_is_answered_408(limited: Service) -> None:
    with rawhttp.connect(limited) as sock:
        sock.sendall(
            b"POST /decisions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        answer, waited = rawhttp.until_closed(sock)
    assert rawhttp.status(answer) == 408 and 1.7 < waited < 4.0, (answer, waited)
    assert wait_until(lambda: "sent no complete request body in 2 s: 408" in limited.log(), timeout=2)


def _rss_mib(service: Service) -> float:
    status = Path(f"/proc/{service.process.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.parametrize("head", ["one huge header", "streamed without end", "too many fields"])
def test_a_head_over_its_caps_is_answered_431_and_never_buffered_whole(limited: Service, head: str) -> None:
    before = _rss_mib(limited)
    sent = 0
    with rawhttp.connect(limited) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        try:
            if head == "one huge header":
                sock.sendall(b"X-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n")
            elif head == "streamed without end":
                sock.sendall(b"X-Endless: ")
                for _ in range(64 * 1024):  # up to 64 MiB, a KiB at a time: the server cuts it after 16 KiB
                    sock.sendall(b"a" * 1024)
                    sent += 1024
            else:
                sock.sendall(b"".join(b"X-Field-%d: 1\r\n" % i for i in range(150)) + b"\r\n")
            answer, _ = rawhttp.until_closed(sock)
        except (BrokenPipeError, ConnectionResetError):
            # Closed while we were still sending (the unread rest makes it a reset, which may discard the 431
            # before we read it): what the cap is for.
            answer = b""
    if head == "streamed without end":
        assert sent < 4 * 1024 * 1024, "cut within a few MiB of socket buffers, not streamed on"
    else:
        assert rawhttp.status(answer) == 431, answer[:200]
    assert _rss_mib(limited) - before < 20


def test_at_its_connection_cap_a_worker_closes_the_oldest_silent_connection_to_let_a_new_one_in(
    limited: Service,
) -> None:
    silent = [rawhttp.connect(limited) for _ in range(CAP + 10)]
    try:
        time.sleep(0.2)
        # Probes still get in: each new connection closes the oldest one that has sent nothing.
        for _ in range(5):
            started = time.monotonic()
            assert httpx.get(f"{limited.url}/health/live", timeout=2).status_code == 200
            assert time.monotonic() - started < 0.5
    finally:
        for sock in silent:
            sock.close()
    log = limited.log()
    assert "was waiting for a request head at the limit of 40 connections" in log
    metrics = httpx.get(f"{limited.url}/metrics", timeout=2).text
    assert 'http_connection_problems_total{reason="evicted"}' in metrics


def test_malformed_requests_and_upgrades_are_logged_once_a_second_with_the_client_and_no_advice(
    limited: Service,
) -> None:
    before = len(limited.log().splitlines())
    for _ in range(20):
        with rawhttp.connect(limited) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            answer, _ = rawhttp.until_closed(sock)
        assert rawhttp.status(answer) == 400
    for request in (
        b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    ):
        with rawhttp.connect(limited) as sock:
            sock.sendall(request)
            sock.settimeout(2)
            assert sock.recv(65536).startswith(b"HTTP/1.1 ")  # answered as plain HTTP
    time.sleep(0.1)
    new = limited.log().splitlines()[before:]
    malformed = [line for line in new if "sent a malformed request" in line]
    assert 1 <= len(malformed) <= 3 and "127.0.0.1:" in malformed[0], new
    upgrades = [line for line in new if "asked to upgrade" in line]
    assert upgrades and all("127.0.0.1:" in line for line in upgrades), new
    assert not any("pip install" in line or "WebSocket library" in line for line in new), new


def test_a_kept_alive_connection_is_not_cut_while_its_next_request_is_under_way(
    limited: Service, applicant: dict
) -> None:
    """The idle timer armed after an answer stops when the next request arrives, however long that one takes."""
    body = json.dumps(applicant).encode()
    with rawhttp.connect(limited) as sock:
        sock.sendall(rawhttp.request("GET", "/health/live"))
        assert [rawhttp.status(r) for r in rawhttp.responses(sock, 1)] == [200]
        time.sleep(0.5)
        request = rawhttp.request("POST", "/decisions", body)
        sock.sendall(request[:-10])  # the body's last bytes come after the 1 s idle timeout has passed
        time.sleep(1.2)
        sock.sendall(request[-10:])
        assert [rawhttp.status(r) for r in rawhttp.responses(sock, 1)] == [201]


def test_a_request_after_an_upgrade_on_the_same_connection_is_never_run(limited: Service) -> None:
    """httptools stops parsing at an Upgrade: the request is answered as plain HTTP and its connection closed
    at once, so what follows it is never read as a request of its own."""
    before = len(limited.log().splitlines())
    smuggled = rawhttp.request("DELETE", "/decisions/smuggled")
    with rawhttp.connect(limited) as sock:
        sock.sendall(
            b"POST /decisions HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
        )
        answers = rawhttp.responses(sock, 1, timeout=3)
        answered = time.monotonic()
        with contextlib.suppress(OSError):
            sock.sendall(smuggled)
        try:
            rest, _ = rawhttp.until_closed(sock, timeout=3)
        except ConnectionResetError:  # closed with the smuggled bytes unread: the kernel resets instead
            rest = b""
        closed_after = time.monotonic() - answered
    assert len(answers) == 1 and rawhttp.status(answers[0]) != 200 and rest == b"", (answers, rest)
    assert closed_after < 0.5, closed_after  # not at the 1 s keep-alive timeout
    time.sleep(0.2)
    assert not [line for line in limited.log().splitlines()[before:] if "smuggled" in line]


def test_an_answer_before_the_body_is_read_is_the_onlyuntil_closed(limited: Service) -> None:
    """A 415 sent before its 20 KB body arrived: the body is not taken for a head (no 431), the connection lives."""
    body = b"x" * 20_000
    with rawhttp.connect(limited) as sock:
        sock.sendall(
            b"POST /decisions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body[:1000]
        )
        time.sleep(0.3)
        sock.sendall(body[1000:])
        time.sleep(0.3)
        sock.sendall(rawhttp.request("GET", "/health/live"))
        assert [rawhttp.status(r) for r in rawhttp.responses(sock, 2)] == [415, 200]


def test_pipelined_requests_are_each_answered_and_none_runs_behind_a_refused_head(
    limited: Service, applicant: dict
) -> None:
    body = json.dumps({"applicants": [applicant] * 30}).encode()  # ~13 KB: with the next head, one read over 16 KiB
    assert len(body) > 10_000
    with rawhttp.connect(limited) as sock:
        nxt = rawhttp.request("GET", "/health/live", b"", b"X-Pad: " + b"p" * 5_000)
        sock.sendall(rawhttp.request("POST", "/decisions/batch", body) + nxt[:-20])
        time.sleep(0.2)
        sock.sendall(nxt[-20:])
        assert [rawhttp.status(r) for r in rawhttp.responses(sock, 2)] == [201, 200]
    before = len(limited.log().splitlines())
    too_many = rawhttp.request("GET", "/health/live", b"", *(b"X-%d: 1" % i for i in range(101)))
    with rawhttp.connect(limited) as sock:
        sock.sendall(too_many + rawhttp.request("DELETE", "/decisions/behind-a-431"))
        answers = rawhttp.responses(sock, 2, timeout=3)
    assert [rawhttp.status(r) for r in answers] == [431]
    time.sleep(0.2)
    assert not [line for line in limited.log().splitlines()[before:] if "behind-a-431" in line]


def test_the_service_answered_no_5xx_and_logged_no_traceback(limited: Service, tmp_path: Path) -> None:
    log = limited.log()
    assert "Traceback" not in log
    assert not [line for line in log.splitlines() if " 500 " in line or " 502 " in line]
