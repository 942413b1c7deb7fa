"""The decisions API: decode → score → record → respond, the challenger's share after the commit, and reads.

GET /decisions/{id} answers from the cache, else the system of record; with
`include=applicant` (audit keys only) it adds the inputs the decision was made
from, read from the system of record.

Handlers reach the models, the store and the cache only through
`request.app.state`, which the lifecycle fills at start-up. A request takes the
worker's model set once, when it starts, and finishes on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import uuid
from collections.abc import Iterator, Sequence

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service import metrics
from service.errors import Conflict, IdempotencyKeyReused, InvalidHeader, InvalidParameter, NotFound, quoted
from service.keys import authorize, authorize_audit
from service.models.assignment import ModelSet
from service.routes.bodies import decode, json_response, read_json_body
from service.schemas import (
    Applicant,
    AuditedDecision,
    BatchResponse,
    Decision,
    applicant_decoder,
    batch_decoder,
    encoder,
)
from service.storage import Record

error_logger = logging.getLogger("service.errors")

MAX_BODY = 1024 * 1024
MAX_BATCH_BODY = 8 * 1024 * 1024
MAX_IDEMPOTENCY_KEY = 255


# -- request plumbing --------------------------------------------------------------


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise InvalidHeader(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters.")
    return key


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


def _shadow(request: Request, models: ModelSet, decisions: Sequence[Decision], applicants: Sequence[Applicant]) -> None:
    """Hand the sampled share of committed decisions to the challenger's queue: O(1) each, never waits."""
    if models.challenger is None:
        return
    queue = request.app.state.challenger_queue
    for decision, applicant in zip(decisions, applicants, strict=True):
        if models.sampled(decision.id):
            queue.offer(decision.id, applicant)


def _key_id(request: Request) -> str | None:
    key = authorize(request)
    return key.id if key is not None else None


async def create_decision(request: Request) -> Response:
    state = request.app.state
    key_id = _key_id(request)
    key = _idempotency_key(request)
    applicant = decode(applicant_decoder, await read_json_body(request, MAX_BODY))
    # The model set this request started with: a swap meanwhile does not change its answer.
    models: ModelSet = state.models.current
    decision = models.champion.decide(applicant, uuid.uuid4(), _now())
    if key is None:
        await state.store.insert(Record(decision, applicant, key_id=key_id))
    else:
        request_hash = hashlib.sha256(encoder.encode(applicant)).hexdigest()
        with _claim(request, key):
            existing = await state.store.insert(Record(decision, applicant, key, request_hash, key_id=key_id))
        if existing is not None:
            if existing.request_hash != request_hash:
                raise _key_reused(key)
            return json_response(
                encoder.encode(existing.decision), 200, {"Location": f"/decisions/{existing.decision.id}"}
            )
    # The row is committed: only now may we answer 201. The rest does not make the answer.
    payload = encoder.encode(decision)
    asyncio.get_running_loop().call_soon(_after_answer, request, models, decision, applicant, payload)
    return json_response(payload, 201, {"Location": f"/decisions/{decision.id}"})


def _after_answer(request: Request, models: ModelSet, decision: Decision, applicant: Applicant, payload: bytes) -> None:
    """A new decision's counts, its challenger sample and its cache entry, once its answer is on its way.

    Run by the loop right after the request's step, which writes the answer (sent in the same step unless the
    client stopped reading): none of it waits or is meant to raise, but at one request every 10 ms it cost
    ~35 µs before the answer.
    """
    try:
        _count(decision)
        _shadow(request, models, (decision,), (applicant,))
        request.app.state.cache.set_many([(decision.id, payload)])
    except Exception:  # a bug: logged as the middleware logs one, with the request id (the answer has gone)
        error_logger.exception("Unhandled error after answering POST /decisions with %s", decision.id)


async def create_batch(request: Request) -> Response:
    state = request.app.state
    key_id = _key_id(request)
    key = _idempotency_key(request)
    batch = decode(batch_decoder, await read_json_body(request, MAX_BATCH_BODY))
    now = _now()
    batch_id = uuid.uuid4()
    models: ModelSet = state.models.current
    champion = models.champion
    decisions = [champion.decide(a, uuid.uuid4(), now) for a in batch.applicants]
    records = [
        Record(d, a, batch_id=batch_id, batch_position=i, key_id=key_id)
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
            return json_response(encoder.encode(BatchResponse(existing.decisions)), 200)
    for decision in decisions:
        _count(decision)
    _shadow(request, models, decisions, batch.applicants)
    # Not written to the cache: bulk scoring is rarely read back one decision at a
    # time, and up to 1000 entries per request would push out the single decisions
    # that are. A batch decision is cached on its first GET instead. (Writing them
    # cost ~17 µs of CPU per decision, in the worker and in Redis: a quarter of it.)
    return json_response(b'{"decisions":[' + b",".join(encoder.encode(d) for d in decisions) + b"]}", 201)


async def get_decision(request: Request) -> Response:
    state = request.app.state
    include = request.query_params.get("include")
    if include is not None:
        authorize_audit(request)  # who asks comes first: without an audit key, the parameter is not theirs to use
        if include != "applicant":
            raise InvalidParameter(f"include may only be `applicant`, got {quoted(include)}.")
        return await _audited(request)
    authorize(request, read_only=True)
    # The route's uuid convertor already turned anything else into a 404.
    decision_id: uuid.UUID = request.path_params["decision_id"]
    payload = await state.cache.get(decision_id)
    if payload is None:
        decision = await state.store.get(decision_id)
        if decision is None:
            raise NotFound(f"There is no decision with id {decision_id}.")
        payload = encoder.encode(decision)
        state.cache.set_many([(decision_id, payload)])
    return json_response(payload)


async def _audited(request: Request) -> Response:
    """GET /decisions/{id}?include=applicant: the decision, the inputs it was made from, who erased them."""
    decision_id: uuid.UUID = request.path_params["decision_id"]
    found = await request.app.state.store.audited(decision_id)
    if found is None:
        raise NotFound(f"There is no decision with id {decision_id}.")
    d = found.decision
    fields = {name: getattr(d, name) for name in d.__struct_fields__}
    applicant = None if found.applicant is None else msgspec.convert(found.applicant, Applicant)
    view = AuditedDecision(**fields, applicant=applicant, erasure=found.erasure, key_id=found.key_id)
    return json_response(encoder.encode(view))
