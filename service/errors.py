"""Every error the API can answer with, and its RFC 9457 problem response.

    ServiceError                    any error with an HTTP answer
    ├── BadRequest                  400  body is not JSON, not UTF-8, or empty
    │   ├── InvalidHeader           400  a malformed Idempotency-Key
    │   └── InvalidParameter        400  a query parameter out of range, or a tampered search cursor
    ├── Unauthorized                401  missing or wrong API key
    ├── Forbidden                   403  an admin endpoint without an admin key, inputs without an audit key
    ├── NotFound                    404  unknown decision id, model version or path
    ├── MethodNotAllowed            405
    ├── Conflict                    409  same Idempotency-Key still in flight
    │   └── OutcomeConflict         409  another outcome is already recorded for the decision
    ├── PayloadTooLarge             413  body over the route's limit
    ├── UnsupportedMediaType        415  Content-Type is not JSON
    ├── ValidationFailed            422  JSON of the wrong shape, type, range or enum
    │   ├── DuplicateKey            422  a key twice in one JSON object
    │   ├── IdempotencyKeyReused    422  same Idempotency-Key, other body
    │   └── ModelRefused            422  a model version that cannot be loaded or cannot take that role
    └── ServiceUnavailable          503  system of record unreachable, or shutting down
        └── AtCapacity              503  too many requests in progress in this worker

Storage failures are StoreUnavailable (a ServiceUnavailable). ClientGone is a
client that hung up mid-request: there is no one left to answer.
"""

from __future__ import annotations

import logging
import re

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from service.schemas import Problem, ProblemError, encoder

PROBLEM_MEDIA_TYPE = "application/problem+json"
RETRY_AFTER_SECONDS = 5

logger = logging.getLogger(__name__)


# A problem document quotes at most this much of any offending value, key or path, and its detail is cut here:
# bad input is never echoed back at length (a 900 KB bad value once made a 1.8 MB answer).
QUOTE_LIMIT = 64
DETAIL_LIMIT = 1024
_QUOTED = re.compile(rf"(`|'|\")([^`'\"]{{{QUOTE_LIMIT + 1},}})\1")
# An unquoted run as long, such as a JSON path through an overlong key.
_RUN = re.compile(rf"[^\s`'\"…]{{{QUOTE_LIMIT + 1},}}")


def shortened(text: str) -> str:
    """`text` with every quoted run, and every unbroken one, longer than QUOTE_LIMIT cut to its start, and the whole
    to DETAIL_LIMIT."""
    if len(text) <= QUOTE_LIMIT:
        return text
    text = _QUOTED.sub(lambda m: f"{m[1]}{m[2][:QUOTE_LIMIT]}…{m[1]} (cut, {len(m[2]):,} characters)", text)
    text = _RUN.sub(lambda m: f"{m[0][:QUOTE_LIMIT]}…", text)
    return text if len(text) <= DETAIL_LIMIT else text[:DETAIL_LIMIT] + "… (cut)"


def quoted(value: str) -> str:
    """A value for a message: its repr, cut to QUOTE_LIMIT characters."""
    return repr(value) if len(value) <= QUOTE_LIMIT else f"{value[:QUOTE_LIMIT]!r}… (cut, {len(value):,} characters)"


class ServiceError(Exception):
    """An error with an HTTP status and a problem document."""

    status = 500
    title = "Internal Server Error"
    slug = "internal-error"

    def __init__(self, detail: str, errors: list[ProblemError] | None = None) -> None:
        super().__init__(detail)
        self.detail = shortened(detail)
        self.errors = [ProblemError(shortened(e.path), shortened(e.message)) for e in errors or []]

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ServiceError):
    """The body is not JSON, not UTF-8, or empty."""

    status, title, slug = 400, "Malformed request body", "malformed-body"


class InvalidHeader(BadRequest):
    """A request header has a value we cannot use."""

    title, slug = "Invalid header", "invalid-header"


class InvalidParameter(BadRequest):
    """A query parameter (or a search cursor) we cannot use."""

    title, slug = "Invalid query parameter", "invalid-parameter"


class Unauthorized(ServiceError):
    """A missing or wrong API key."""

    status, title, slug = 401, "Unauthorized", "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="credit-scoring"'}


class Forbidden(ServiceError):
    """The key (or its absence) does not allow this endpoint."""

    status, title, slug = 403, "Forbidden", "forbidden"


class NotFound(ServiceError):
    """No such decision, or no such path."""

    status, title, slug = 404, "Not found", "not-found"


class MethodNotAllowed(ServiceError):
    """The path exists but not for this method."""

    status, title, slug = 405, "Method not allowed", "method-not-allowed"

    def __init__(self, detail: str, allow: str = "") -> None:
        super().__init__(detail)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allow} if self.allow else {}


class Conflict(ServiceError):
    """A request with the same Idempotency-Key is still being processed."""

    status, title, slug = 409, "Request in flight", "idempotency-key-in-flight"


class OutcomeConflict(Conflict):
    """The decision already has another outcome on record."""

    title, slug = "Outcome already recorded", "outcome-conflict"


class PayloadTooLarge(ServiceError):
    """The body is larger than the route accepts."""

    status, title, slug = 413, "Payload too large", "payload-too-large"


class UnsupportedMediaType(ServiceError):
    """The Content-Type is not JSON."""

    status, title, slug = 415, "Unsupported media type", "unsupported-media-type"


class ValidationFailed(ServiceError):
    """Well-formed JSON that is not a valid request."""

    status, title, slug = 422, "Invalid request", "validation-error"


class DuplicateKey(ValidationFailed):
    """A JSON object names a key twice: which one counts would depend on who reads it."""

    title, slug = "Duplicate key", "duplicate-key"


class IdempotencyKeyReused(ValidationFailed):
    """The Idempotency-Key was first used with another body."""

    title, slug = "Idempotency-Key reused", "idempotency-key-reused"


class ModelRefused(ValidationFailed):
    """The model version exists but cannot be loaded, or cannot take the role asked for; nothing changed."""

    title, slug = "Model version refused", "model-refused"


class ServiceUnavailable(ServiceError):
    """The service cannot answer now; the client should retry."""

    status, title, slug = 503, "Service unavailable", "service-unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}


class AtCapacity(ServiceUnavailable):
    """This worker is serving as many requests as it admits; the client should retry shortly."""

    title, slug = "At capacity", "at-capacity"

    def __init__(self) -> None:
        super().__init__("This worker is serving as many requests as it admits at once; retry in a moment.")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class StoreUnavailable(ServiceUnavailable):
    """The system of record did not answer in time."""


class ClientGone(Exception):
    """The client disconnected before its request was read; nothing to answer."""


# msgspec reports missing and unknown fields at the enclosing object's path; we
# append the field so `errors[].path` names it, as for every other error.
_FIELD_IN_MESSAGE = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]+)`")


def from_validation_error(exc: msgspec.ValidationError) -> ValidationFailed:
    message, sep, path = str(exc).rpartition(" - at `")
    if sep:
        path = path.rstrip("`")
    else:
        message, path = str(exc), "$"
    field = _FIELD_IN_MESSAGE.match(message)
    if field:
        path = f"{path}.{field.group(1)}"
    return ValidationFailed(
        f"The request body is not valid: {message} at {path}.",
        [ProblemError(path=path, message=message)],
    )


def problem_response(error: ServiceError) -> Response:
    problem = Problem(
        type=f"https://credit-scoring.example/problems/{error.slug}",
        title=error.title,
        status=error.status,
        detail=error.detail,
        errors=error.errors,
    )
    return Response(
        encoder.encode(problem), status_code=error.status, headers=error.headers(), media_type=PROBLEM_MEDIA_TYPE
    )


async def handle_service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    if exc.status >= 500:  # ours, not the client's: operators should see it
        logger.warning("%s %s answered %d: %s", request.method, request.url.path, exc.status, exc.detail)
    return problem_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 (routing) as problem documents."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return problem_response(NotFound(f"There is no resource at {quoted(request.url.path)}."))
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return problem_response(
            MethodNotAllowed(f"{request.method} is not allowed on {quoted(request.url.path)}; allowed: {allow}.", allow)
        )
    error = ServiceError(str(exc.detail))
    error.status, error.title = exc.status_code, str(exc.detail)
    return problem_response(error)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Last resort: a bug must still answer with a problem document, and be logged whole."""
    logger.exception("Unhandled error while serving %s %s", request.method, request.url.path)
    return problem_response(ServiceError("An unexpected error occurred; it has been logged."))
