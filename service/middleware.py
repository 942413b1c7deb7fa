"""The outer layers of every request: its id, its access line, authentication before routing.

Pure ASGI rather than BaseHTTPMiddleware: it adds no task or stream copy per request. Admission control
is a layer further out, in the connection layer (service/protocol.py), so that a refusal costs no request.
"""

from __future__ import annotations

import logging
import os
import re
import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import keys, logs, metrics
from service.errors import ClientGone, ServiceError, problem_response

access_logger = logging.getLogger("service.access")
error_logger = logging.getLogger("service.errors")

# nginx's code for "the client closed the connection before we answered".
CLIENT_CLOSED_REQUEST = 499
# A caller's id is echoed into logs and headers, so it must be short and plain.
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# W3C Trace Context: version-traceid-parentid-flags, lowercase hex; an all-zero id is invalid. Version ff is
# invalid; a future version may add fields after the flags.
_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def trace_id_of(traceparent: bytes | None) -> str | None:
    """The trace id of a valid `traceparent` header, else None (a malformed one is ignored, never an error)."""
    if traceparent is None:
        return None
    found = _TRACEPARENT.match(traceparent.strip())
    if found is None:
        return None
    version, trace, parent, _, rest = found.groups()
    if version == b"ff" or (version == b"00" and rest) or trace == b"0" * 32 or parent == b"0" * 16:
        return None
    return trace.decode()


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = traceparent = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value
            elif name == b"traceparent":
                traceparent = value
        request_id = (
            incoming.decode() if incoming is not None and _VALID_REQUEST_ID.match(incoming) else os.urandom(16).hex()
        )
        header = (b"x-request-id", request_id.encode())
        token = logs.request_id.set(request_id)
        trace_token = logs.trace_id.set(trace_id_of(traceparent))
        key_token = logs.key_id.set(None)
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientGone:
            status = CLIENT_CLOSED_REQUEST
        except Exception:
            # A bug, not a client error: log it whole, but still answer with a
            # problem document (and the request id) if nothing was sent yet.
            error_logger.exception("Unhandled error while serving %s %s", scope["method"], scope["path"])
            if status == 0:
                response = problem_response(ServiceError("An unexpected error occurred; it has been logged."))
                await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            # The route template, not the path: one series per endpoint, not per id.
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            metrics.count(metrics.requests, scope["method"], template, str(status or 500))
            metrics.observe(metrics.latency, elapsed, scope["method"], template)
            key = logs.key_id.get()
            if key is not None:
                metrics.count(metrics.requests_by_key, key, template, str(status or 500))
            access_logger.info(
                "%s %s %d %.2f ms%s",
                scope["method"],
                # The path as sent, still percent-encoded: a decoded %0a would forge a log line.
                scope.get("raw_path", b"").decode("ascii", "backslashreplace") or scope["path"],
                status or 500,
                elapsed * 1000,
                "" if key is None else f" key={key}",
            )
            logs.key_id.reset(key_token)
            logs.trace_id.reset(trace_token)
            logs.request_id.reset(token)


class Gate:
    """Authentication before routing: `/decisions*` and `/monitoring` need a known key (with API_KEYS set),
    `/admin*` an admin key, whatever the method or the rest of the path; each route still checks the role."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):  # behind a prefix (--root-path): routing matches what follows it
                path = path[len(root) :]
            try:
                if path.startswith("/admin"):
                    keys.authorize_admin(Request(scope))
                elif path.startswith("/decisions") or path == "/monitoring":
                    keys.authenticate(Request(scope))
            except ServiceError as exc:
                await problem_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
