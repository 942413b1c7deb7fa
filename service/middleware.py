"""The outermost layer of every request: its id, its access line, and the last-resort 500.

Pure ASGI rather than BaseHTTPMiddleware: it adds no task or stream copy per request.
"""

from __future__ import annotations

import logging
import os
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics
from service.errors import ClientGone, ServiceError, problem_response

access_logger = logging.getLogger("service.access")
error_logger = logging.getLogger("service.errors")

# nginx's code for "the client closed the connection before we answered".
CLIENT_CLOSED_REQUEST = 499
# A caller's id is echoed into logs and headers, so it must be short and plain.
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = (
            incoming.decode() if incoming is not None and _VALID_REQUEST_ID.match(incoming) else os.urandom(16).hex()
        )
        header = (b"x-request-id", request_id.encode())
        token = logs.request_id.set(request_id)
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
            access_logger.info(
                "%s %s %d %.1f ms",
                scope["method"],
                # The path as sent, still percent-encoded: a decoded %0a would forge a log line.
                scope.get("raw_path", b"").decode("ascii", "backslashreplace") or scope["path"],
                status or 500,
                elapsed * 1000,
            )
            logs.request_id.reset(token)
