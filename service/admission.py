"""Admission control: how many requests a worker serves at once, and the answer to the ones it refuses.

A worker serves at most MAX_CONCURRENT_REQUESTS requests at once (64 by default)
and answers the rest 503 (`at-capacity`, Retry-After: 1) at once, whatever their
path, except the probes' and /metrics: an overloaded worker must still be seen as
it is. Far beyond capacity a fast 503 beats a slow answer for everyone: the work
in progress, and with it the memory and the latency of what is admitted, stays
bounded.

The connection layer (service/protocol.py) counts a request from its task's start
to its end and writes the refusal straight to the connection, with no request
cycle, task or middleware: under a storm of refusals each one competes for the
event loop with the admitted requests, and run as a request one cost ~80 µs of
CPU and stretched every loop pass. A refusal has no access line: it is counted in
`requests_shed_total`, and one line a second sums them up. Our own count rather
than uvicorn's `--limit-concurrency`, which counts open connections (with 1,000
kept-alive clients it refuses every request) and tasks (the refusals' own among
them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from service import metrics
from service.errors import AtCapacity, problem_response

# Requests a worker serves at once, unless MAX_CONCURRENT_REQUESTS says otherwise.
MAX_CONCURRENT_REQUESTS = 64
# Answered whatever the load: probes and scrapes must see an overloaded worker as it is.
UNLIMITED_PATHS = frozenset({"/health/live", "/health/ready", "/metrics"})
# An overloaded worker says how much it shed at most this often, instead of one line per refusal.
SHED_REPORT_SECONDS = 1.0

access_logger = logging.getLogger("service.access")


class Place:
    """An admitted request's place, freed once: when its answer is complete, or when its task ends without one.

    Not at the task's end alone: a kept-alive client sends its next request as soon as it has the answer,
    and the task's end (its access line, then a done callback one loop pass later) could come after that
    request arrived, which would then be refused with the client's one request in progress."""

    __slots__ = ("_admission",)

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def free(self, _: object = None) -> None:
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission = None


class Admission:
    """The requests a worker is serving against its limit, and the ones it refused: counted, and summed up in
    one line at most once a second."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.shed = 0
        self.reported_at = time.monotonic()
        body = bytes(problem_response(AtCapacity()).body)
        # The refusal's fields after the server's own (date, server) and before its request id, and its body.
        self._fields = b"content-type: application/problem+json\r\ncontent-length: %d\r\nretry-after: 1\r\n" % len(body)
        self._body = body

    def full(self) -> bool:
        return self.in_flight >= self.limit

    def admit(self, task: asyncio.Task[None]) -> Place:
        """Count a request served by this task until its answer is complete (Place.free) or the task ends."""
        self.in_flight += 1
        place = Place(self)
        task.add_done_callback(place.free)
        return place

    def refusal(self, server_headers: list[tuple[bytes, bytes]], keep_alive: bool, head: bool = False) -> bytes:
        """A refused request's whole answer (without its body for HEAD), counted (and summed up in the log at most
        once a second)."""
        self.shed += 1
        metrics.count(metrics.requests_shed)
        now = time.monotonic()
        if now - self.reported_at >= SHED_REPORT_SECONDS:
            access_logger.warning(
                "At capacity (%d requests in progress): answered %d requests 503 in the last %.1f s",
                self.limit,
                self.shed,
                now - self.reported_at,
            )
            self.shed, self.reported_at = 0, now
        answer = [b"HTTP/1.1 503 Service Unavailable\r\n"]
        for name, value in server_headers:
            answer += [name, b": ", value, b"\r\n"]
        answer += [self._fields, b"" if keep_alive else b"connection: close\r\n"]
        answer += [b"x-request-id: ", os.urandom(16).hex().encode(), b"\r\n\r\n", b"" if head else self._body]
        return b"".join(answer)
