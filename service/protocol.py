"""The HTTP connection layer: uvicorn's httptools protocol with deadlines, size caps, a connection cap, admission.

uvicorn closes a keep-alive connection left idle after a response (5 s), and
nothing else: a connection that never sends a byte, or sends its head or body
slowly, stays open for good, and httptools buffers a header however long it
grows. The Procfile runs uvicorn with `--http service.protocol:HardenedProtocol`,
this subclass, which adds, per worker:

- a deadline for the request head (request line and headers, HEAD_TIMEOUT from
  the connection's start, or on a kept-alive connection from the next request's
  first byte: until then uvicorn's keep-alive timeout governs) and one for the
  body (BODY_TIMEOUT from the end of the head, for the whole body: an 8 MiB
  batch needs ~280 KB/s; HTTP_HEAD_TIMEOUT and HTTP_BODY_TIMEOUT set them): past
  it, 408 and close;
- caps on the head: MAX_HEAD_BYTES in all and MAX_HEADERS fields: past either,
  431 and close (counted as bytes arrive, so a header streamed without end is cut
  at the cap, not buffered);
- a cap on open connections (HTTP_MAX_CONNECTIONS, by default under the
  file-descriptor limit less what the process needs itself): at the cap, a new
  connection closes the oldest one that has not sent a complete head (a silent or
  slowloris socket, or an idle keep-alive one), so probes and real clients still
  get in; only when every connection is busy with a request is the new one
  refused with 503 at once;
- malformed requests (CONNECT among them) answered 400 and closed; an Upgrade
  request answered as plain HTTP and the connection then closed (httptools stops
  parsing at an upgrade, so anything sent after it would otherwise be read as a
  request of its own);
- admission control (service/admission.py): at MAX_CONCURRENT_REQUESTS requests in
  progress, the next is answered 503 at once, written here straight to the
  connection, with no request cycle, task or middleware;
- one warning line, at most once a second per kind, with the client's address and
  how many times it happened, for all of the above (uvicorn logged upgrades twice,
  without an address, advising a WebSocket library). Each is counted in
  `http_connection_problems_total{reason}`.

A subclass rather than a proxy's settings alone: a platform may put none in front
(a Heroku dyno takes connections from its router, a Kubernetes pod from anywhere
in the cluster), and the limits belong with what they protect. HAProxy in deploy/
applies the same ones first.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections import OrderedDict
from typing import Any

import httptools
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service import metrics
from service.admission import MAX_CONCURRENT_REQUESTS, UNLIMITED_PATHS, Admission, Place
from service.logs import Throttled
from service.settings import ConfigError, http_limits

# Seconds for the request head, and for the body once the head is in: HTTP_HEAD_TIMEOUT, HTTP_BODY_TIMEOUT.
HEAD_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
# The head (request line and headers) in bytes, and its header fields; nginx and HAProxy allow ~8-16 KiB.
MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
# File descriptors kept for the process's own use (pools, logs, the model files) below the soft limit.
RESERVED_DESCRIPTORS = 256
# Each open connection costs a worker ~7 KB (its protocol, parser and buffers): 4,096 of them ~28 MB.
MAX_CONNECTIONS_CEILING = 4096
# A request refused at its head with a body up to this many bytes is read past, to keep its connection alive.
REFUSED_BODY_KEPT = 64 * 1024
# Seconds a connection closed with an answer still unwritten (its client does not read) keeps its socket.
CLOSE_GRACE_SECONDS = 1.0

logger = logging.getLogger("service.connections")
_warn = Throttled(logger)


def max_connections(configured: int = 0) -> int:
    """Open connections a worker keeps at most: HTTP_MAX_CONNECTIONS, or under its file-descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = max(64, min(MAX_CONNECTIONS_CEILING, soft - RESERVED_DESCRIPTORS))
    return min(configured, ceiling) if configured else ceiling


def _limits() -> tuple[float, float, int, int]:
    """The limits from the environment. uvicorn makes this class before start-up reads the settings, so a bad
    value falls back to the default here, and start-up's settings step refuses it with its clear message."""
    try:
        limits = http_limits(os.environ)
    except ConfigError:
        return HEAD_TIMEOUT, BODY_TIMEOUT, max_connections(), MAX_CONCURRENT_REQUESTS
    return (
        limits["http_head_timeout"],
        limits["http_body_timeout"],
        max_connections(limits["http_max_connections"]),
        limits["max_concurrent_requests"],
    )


def _response(status: int, reason: bytes, title: str, extra: bytes = b"") -> bytes:
    body = b'{"type":"https://credit-scoring.example/problems/%s","title":"%s","status":%d}' % (
        title.lower().replace(" ", "-").encode(),
        title.encode(),
        status,
    )
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n%s\r\n%s" % (status, reason, len(body), extra, body)
    )


TIMEOUT = _response(408, b"Request Timeout", "Request timeout")
TOO_LARGE = _response(431, b"Request Header Fields Too Large", "Request header fields too large")
AT_CAPACITY = _response(503, b"Service Unavailable", "Too many connections", b"retry-after: 1\r\n")
MALFORMED = _response(400, b"Bad Request", "Malformed request")


# Connections of this worker that are waiting for a request head, oldest first: the ones a new connection may
# close when the worker is at its cap.
_waiting: OrderedDict[HardenedProtocol, None] = OrderedDict()


class HardenedProtocol(HttpToolsProtocol):
    head_timeout, body_timeout, max_connections, max_in_flight = _limits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The current phase's deadline (loop time), if one runs, and the one timer that checks it: armed at or
        # before the deadline and moved only when it fires, so a request's phases cost no timer each.
        self._deadline: float | None = None
        self._phase = "head"
        self._timer: asyncio.TimerHandle | None = None
        # Bytes received for the current head (a memory bound while it streams), and its fields' exact size.
        self._head_bytes = 0
        self._field_bytes = 0
        self._header_count = 0
        # Whether the parser is inside a request head (or waiting for one), how many messages it has begun,
        # and whether the last one begun has been received whole.
        self._in_head = True
        self._begun = 0
        self._message_done = False
        self._refused = False
        # An upgrade request was answered as plain HTTP: what follows it on the connection is not read.
        self._upgraded = False
        # The current request was refused at its head (admission): its body, if any, is read and dropped.
        self._refusing = False
        # The place of the request this connection is serving, if admitted, until its answer is complete.
        self._place: Place | None = None

    # -- the connection cap -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections and not _evict_oldest_waiting(self.max_connections):
            self._refused = True
            self.transport = transport
            self.client = transport.get_extra_info("peername")
            self._problem("connection_limit", "at the limit of %d open connections: refused", self.max_connections)
            transport.write(AT_CAPACITY)
            transport.close()
            return
        super().connection_made(transport)
        _waiting[self] = None
        self._set_deadline(self.head_timeout, "head")

    def connection_lost(self, exc: Exception | None) -> None:
        _waiting.pop(self, None)
        self._stop_timer()
        if self._refused:
            return
        super().connection_lost(exc)

    # -- deadlines ---------------------------------------------------------------------------

    def _set_deadline(self, seconds: float, phase: str) -> None:
        at = self.loop.time() + seconds
        self._deadline, self._phase = at, phase
        timer = self._timer
        if timer is None or timer.when() > at:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(at, self._deadline_due)

    def _cancel_deadline(self) -> None:
        self._deadline = None  # the timer, when it fires, finds none

    def _stop_timer(self) -> None:
        self._deadline = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline_due(self) -> None:
        self._timer = None
        at = self._deadline
        if at is None:
            return
        if self.loop.time() < at:  # set again, later, since the timer was armed
            self._timer = self.loop.call_at(at, self._deadline_due)
            return
        self._deadline = None
        self._expired(self._phase)

    def _expired(self, phase: str) -> None:
        if self.transport.is_closing():
            return
        answer = TIMEOUT
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # answering already: the answer finishes, then the connection closes
                cycle.keep_alive = False
                return
            # The body stopped coming: the request is abandoned, and its handler sees the client gone.
            cycle.disconnected = True
            cycle.message_event.set()
        elif phase == "body":
            # Answered before its body was read (a 401, a 413): a 408 now would be taken for the next answer.
            answer = b""
        limit = self.head_timeout if phase == "head" else self.body_timeout
        self._close_with(answer, f"{phase}_timeout", "sent no complete request %s in %g s: 408", phase, limit)

    # -- the head: its size, its fields ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused or self._upgraded or self.transport.is_closing():
            return
        # As uvicorn's own: a request arriving on a kept-alive connection stops its idle timer.
        self._unset_keepalive_if_required()
        in_head, begun = self._in_head, self._begun
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._close_with(MALFORMED, "malformed", "sent a malformed request (%s): 400", exc)
            return
        except httptools.HttpParserUpgrade:
            # An Upgrade header: answered as a plain request (there are no WebSockets here), then closed,
            # since httptools stops at the upgrade: a body or a request after it would be read as the next one.
            self._upgraded = True
            if self.cycle is not None:
                self.cycle.keep_alive = False
                if self.cycle.response_complete:  # refused at capacity already: nothing more will be read
                    self.transport.close()
            self._problem("upgrade", "asked to upgrade the connection (%s): answered as plain HTTP", self._upgrade())
            return
        if in_head and self._in_head and self._begun == begun and not self.transport.is_closing():
            # Still inside the same head: counted as it streams, so that an endless header is cut, not buffered.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._close_with(TOO_LARGE, "head_too_large", "sent a request head over %d bytes: 431", MAX_HEAD_BYTES)

    # -- admission ---------------------------------------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        """uvicorn calls this once a request's head is in and no earlier answer on the connection is pending (for
        a pipelined request, once the one before it is answered), so a refusal written here is in order."""
        while _admission.full() and cycle.scope["path"][len(self.root_path) :] not in UNLIMITED_PATHS:
            self._refuse(cycle.keep_alive and not cycle.waiting_for_100_continue, cycle.scope["method"] == "HEAD")
            cycle.response_started = cycle.response_complete = True
            if not self.pipeline or self.transport.is_closing():
                self.on_response_complete()
                return
            # The next request queued behind it, as on_response_complete would start it, but in this loop: through
            # on_response_complete each refusal would call this again, a level deeper (hundreds of small pipelined
            # requests would reach the recursion limit).
            self.server_state.total_requests += 1
            self.flow.resume_reading()
            cycle, app = self.pipeline.pop()
        # As uvicorn's own (without its opt-in reset_contextvars), keeping the task to count it until its end.
        task = self.loop.create_task(cycle.run_asgi(app))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)
        self._place = _admission.admit(task)

    def _refuse(self, keep_alive: bool, head: bool) -> None:
        # A client that sends request after request and reads none of the answers would grow the write buffer
        # without end (a refusal is written at once, without waiting for the client to read): past uvicorn's
        # high-water mark the refusal closes the connection.
        keep_alive = keep_alive and not self.flow.write_paused
        self.transport.write(_admission.refusal(self.server_state.default_headers, keep_alive, head))
        if not keep_alive:
            self._close_after_answer()

    def _upgrade(self) -> str:
        upgrade = self._get_upgrade() if self.headers else None
        return upgrade.decode(errors="replace")[:32] if upgrade else "unknown"

    def _unsupported_upgrade_warning(self) -> None:
        """uvicorn's two lines (one advising a WebSocket library) give way to data_received's one."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun += 1
        self._message_done = False
        self._in_head = True
        self._head_bytes = self._field_bytes = self._header_count = 0
        _waiting[self] = None
        # A request answered before its body was in re-arms the idle timer when its body ends (_idle_if_done),
        # possibly in the same read as this request's head, after data_received stopped the timer.
        self._unset_keepalive_if_required()
        if self._deadline is None:  # a request on a kept-alive connection: its head's deadline runs from here
            self._set_deadline(self.head_timeout, "head")

    def on_url(self, url: bytes) -> None:
        self._field_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._field_bytes += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.transport.is_closing():  # refused already: a request pipelined behind it never reaches the app
            return
        _waiting.pop(self, None)
        self._in_head = False
        if self._header_count > MAX_HEADERS:
            self._close_with(TOO_LARGE, "head_too_large", "sent more than %d header fields: 431", MAX_HEADERS)
            return
        if self._field_bytes > MAX_HEAD_BYTES:  # a head that arrived whole in one read
            self._close_with(TOO_LARGE, "head_too_large", "sent a request head over %d bytes: 431", MAX_HEAD_BYTES)
            return
        self._set_deadline(self.body_timeout, "body")
        if _admission.full() and self._may_refuse_at_head():
            # Refused before uvicorn builds the request (its scope, cycle and event): under a storm of refusals
            # that is most of what each one would cost.
            self._refusing = True
            self._refuse(
                self.parser.get_http_version() != "1.0"
                and self.parser.should_keep_alive()
                and not self.expect_100_continue
                and self._body_is_small(),
                self.parser.get_method() == b"HEAD",
            )
            self.on_response_complete()
            return
        super().on_headers_complete()

    def _body_is_small(self) -> bool:
        """Whether a refused request's body is worth reading past to keep its connection: none, or a declared
        length up to REFUSED_BODY_KEPT. A larger or chunked one closes the connection after the 503 instead."""
        return not any(
            name == b"transfer-encoding"
            or (name == b"content-length" and not (value.isdigit() and int(value) <= REFUSED_BODY_KEPT))
            for name, value in self.headers
        )

    def _may_refuse_at_head(self) -> bool:
        """Whether the request whose head just ended may be refused now: not a probe's or a scrape, not an upgrade
        (answered, then closed, by the usual path), and with no earlier answer still due on the connection (a
        pipelined request is checked again when its turn comes, in _start_asgi_task)."""
        cycle = self.cycle
        if (cycle is not None and not cycle.response_complete) or self.parser.should_upgrade():
            return False
        return httptools.parse_url(self.url).path.decode("ascii", "replace") not in UNLIMITED_PATHS

    def on_body(self, body: bytes) -> None:
        if not self._refusing and not self.transport.is_closing():
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.transport.is_closing():
            return
        self._cancel_deadline()
        self._message_done = True
        if self._refusing:
            self._refusing = False
        else:
            super().on_message_complete()
        self._idle_if_done()

    def on_response_complete(self) -> None:
        if self._place is not None:  # the admitted request answered: its place is free (before the next starts)
            self._place.free()
            self._place = None
        super().on_response_complete()
        self._idle_if_done()

    def _idle_if_done(self) -> None:
        """Once the request is read whole and answered, with nothing pipelined behind it, the connection waits
        for its next head (the keep-alive timeout closes it if none comes): the first a new connection may close
        when the worker is at its cap."""
        cycle = self.cycle
        answered = cycle is None or cycle.response_complete  # None: its one request so far was refused at its head
        if self._message_done and answered and not self.transport.is_closing():
            self._in_head = True
            self._head_bytes = 0
            _waiting[self] = None
            if self.timeout_keep_alive_task is None:
                # Answered before its body was read (a refusal, a 415): the body's arrival stopped the idle timer
                # the answer armed, and nothing else would close the connection if no request follows.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )

    def _close_with(self, response: bytes, reason: str, message: str, *args: Any) -> None:
        self._problem(reason, message, *args)
        self._stop_timer()
        _waiting.pop(self, None)
        if response:
            self.transport.write(response)
        self._close_after_answer()

    def _close_after_answer(self) -> None:
        self.transport.close()
        if self.transport.get_write_buffer_size():
            # A client that does not read what it is sent would hold the socket open while the answer waits to
            # be written: after a grace it is dropped.
            self.loop.call_later(CLOSE_GRACE_SECONDS, self.transport.abort)

    def _problem(self, reason: str, message: str, *args: Any) -> None:
        metrics.count(metrics.connection_problems, reason)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        _warn.warning(reason, "%s " + message, client, *args)


_admission = Admission(HardenedProtocol.max_in_flight)


def _evict_oldest_waiting(limit: int) -> bool:
    """Close the oldest connection that has not sent a complete request head; False if there is none."""
    while _waiting:
        oldest, _ = _waiting.popitem(last=False)
        if not oldest.transport.is_closing():
            oldest._close_with(b"", "evicted", "was waiting for a request head at the limit of %d connections", limit)
            oldest.connections.discard(oldest)
            return True
    return False
