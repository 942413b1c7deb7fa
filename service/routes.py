"""HTTP handlers: decode → score → record → respond.

Handlers reach the model, the store and the cache only through
`request.app.state`, which the lifecycle fills at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from service import metrics, openapi
from service.errors import (
    PROBLEM_MEDIA_TYPE,
    RETRY_AFTER_SECONDS,
    BadRequest,
    ClientGone,
    Conflict,
    IdempotencyKeyReused,
    InvalidHeader,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    from_validation_error,
)
from service.schemas import BatchResponse, Decision, applicant_decoder, batch_decoder, encoder
from service.storage import Record

JSON = "application/json"
MAX_BODY = 1024 * 1024
MAX_BATCH_BODY = 8 * 1024 * 1024
MAX_IDEMPOTENCY_KEY = 255


# -- request plumbing --------------------------------------------------------------


def _authorize(request: Request) -> None:
    keys: tuple[bytes, ...] = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Send the API key as `Authorization: Bearer <key>`.")
    presented = token.strip().encode()
    # Compare against every key, without short-circuiting, in constant time.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key)
    if not matched:
        raise Unauthorized("The API key is not valid.")


async def _read_json_body(request: Request, limit: int) -> bytes:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON and not (media_type.startswith("application/") and media_type.endswith("+json")):
        shown = media_type or "none"
        raise UnsupportedMediaType(f"Content-Type must be application/json, got {shown}.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The body is {declared} bytes; this endpoint accepts at most {limit}.")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body carries no Content-Length to check up front
                raise PayloadTooLarge(f"The body exceeds {limit} bytes, the most this endpoint accepts.")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone("The client disconnected before sending the whole body.") from None
    body = b"".join(chunks)
    if not body.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    return body


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise from_validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}.") from None
    except UnicodeDecodeError:  # msgspec checks UTF-8 lazily, inside strings
        raise BadRequest("The request body is not valid UTF-8.") from None


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise InvalidHeader(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters.")
    return key


def _json(payload: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(payload, status_code=status, headers=headers, media_type=JSON)


def _count(decision: Decision) -> None:
    metrics.count(metrics.decisions, decision.decision, decision.risk_category)
    metrics.observe(metrics.probability, decision.probability_of_default)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# -- decisions ------------------------------------------------------------------------


@contextlib.contextmanager
def _claim(request: Request, key: str) -> Iterator[None]:
    """Hold an Idempotency-Key for the duration of one request in this process."""
    in_flight: set[str] = request.app.state.idempotency_in_flight
    if key in in_flight:
        raise Conflict(f"A request with Idempotency-Key {key!r} is still being processed; retry shortly.")
    in_flight.add(key)
    try:
        yield
    finally:
        in_flight.discard(key)


def _key_reused(key: str) -> IdempotencyKeyReused:
    return IdempotencyKeyReused(f"Idempotency-Key {key!r} was already used with a different body; use a new key.")


async def create_decision(request: Request) -> Response:
    state = request.app.state
    _authorize(request)
    key = _idempotency_key(request)
    applicant = _decode(applicant_decoder, await _read_json_body(request, MAX_BODY))
    decision = state.model.decide(applicant, uuid.uuid4(), _now())
    if key is None:
        await state.store.insert(Record(decision, applicant))
    else:
        request_hash = hashlib.sha256(encoder.encode(applicant)).hexdigest()
        with _claim(request, key):
            existing = await state.store.insert(Record(decision, applicant, key, request_hash))
        if existing is not None:
            if existing.request_hash != request_hash:
                raise _key_reused(key)
            return _json(encoder.encode(existing.decision), 200, {"Location": f"/decisions/{existing.decision.id}"})
    # The row is committed: only now may we answer 201.
    _count(decision)
    payload = encoder.encode(decision)
    await state.cache.set_many([(decision.id, payload)])
    return _json(payload, 201, {"Location": f"/decisions/{decision.id}"})


async def create_batch(request: Request) -> Response:
    state = request.app.state
    _authorize(request)
    key = _idempotency_key(request)
    batch = _decode(batch_decoder, await _read_json_body(request, MAX_BATCH_BODY))
    now = _now()
    batch_id = uuid.uuid4()
    decisions = [state.model.decide(a, uuid.uuid4(), now) for a in batch.applicants]
    records = [
        Record(d, a, batch_id=batch_id, batch_position=i)
        for i, (d, a) in enumerate(zip(decisions, batch.applicants, strict=True))
    ]
    if key is None:
        await state.store.insert_many(records)
    else:
        request_hash = hashlib.sha256(encoder.encode(batch)).hexdigest()
        records[0] = dataclasses.replace(records[0], idempotency_key=key, request_hash=request_hash)
        with _claim(request, key):
            existing = await state.store.insert_many(records)
        if existing is not None:
            if existing.request_hash != request_hash:
                raise _key_reused(key)
            return _json(encoder.encode(BatchResponse(existing.decisions)), 200)
    for decision in decisions:
        _count(decision)
    # Not written to the cache: bulk scoring is rarely read back one decision at a
    # time, and up to 1000 entries per request would push out the single decisions
    # that are. A batch decision is cached on its first GET instead. (Writing them
    # cost ~17 µs of CPU per decision, in the worker and in Redis: a quarter of it.)
    return _json(b'{"decisions":[' + b",".join(encoder.encode(d) for d in decisions) + b"]}", 201)


async def get_decision(request: Request) -> Response:
    state = request.app.state
    _authorize(request)
    # The route's uuid convertor already turned anything else into a 404.
    decision_id: uuid.UUID = request.path_params["decision_id"]
    payload = await state.cache.get(decision_id)
    if payload is None:
        decision = await state.store.get(decision_id)
        if decision is None:
            raise NotFound(f"There is no decision with id {decision_id}.")
        payload = encoder.encode(decision)
        await state.cache.set_many([(decision_id, payload)])
    return _json(payload)


# -- model and health ---------------------------------------------------------------------


async def get_model(request: Request) -> Response:
    return _json(request.app.state.model.metadata_json)


async def get_metrics(request: Request) -> Response:
    request.app.state.store.observe_pool()
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


async def get_openapi(request: Request) -> Response:
    return _json(openapi.DOCUMENT_JSON)


async def live(request: Request) -> Response:
    return _json(b'{"status":"ok"}')


async def ready(request: Request) -> Response:
    state = request.app.state
    checks = {"model": "ok" if getattr(state, "model", None) is not None else "missing"}
    try:
        await asyncio.wait_for(state.store.ping(), state.settings.database_request_timeout)
        checks["database"] = "ok"
    except (StoreUnavailable, TimeoutError):
        checks["database"] = "unavailable"
    # The cache is best-effort: reported, never a reason to take the pod out.
    checks["cache"] = "ok" if await state.cache.ping() else "unavailable"
    if state.shutting_down:
        checks["shutdown"] = "in progress"
    failing = [name for name in ("model", "database") if checks[name] != "ok"]
    if state.shutting_down:
        failing.append("shutdown")
    if not failing:
        return _json(encoder.encode({"status": "ready", "checks": checks}))
    problem = {
        "type": "https://credit-scoring.example/problems/not-ready",
        "title": "Not ready",
        "status": 503,
        "detail": f"Not ready: {', '.join(failing)}.",
        "checks": checks,
    }
    return Response(
        encoder.encode(problem),
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        media_type=PROBLEM_MEDIA_TYPE,
    )


ROUTES = [
    Route("/decisions", create_decision, methods=["POST"]),
    Route("/decisions/batch", create_batch, methods=["POST"]),
    Route("/decisions/{decision_id:uuid}", get_decision, methods=["GET"]),
    Route("/model", get_model, methods=["GET"]),
    Route("/health/live", live, methods=["GET"]),
    Route("/metrics", get_metrics, methods=["GET"]),
    Route("/openapi.json", get_openapi, methods=["GET"]),
    Route("/health/ready", ready, methods=["GET"]),
]
