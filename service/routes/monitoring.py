"""Outcomes and monitoring: PUT /decisions/{id}/outcome and GET /monitoring (both with the API key).

A lender reports, months later, whether a borrower defaulted; monitoring compares
a version's recent applicants with its training population (PSI) and its
predictions with those outcomes (back-testing). The counting is aggregate SQL in
the system of record, so every replica gives the same answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

from starlette.requests import Request
from starlette.responses import Response

from service import monitoring
from service.errors import NotFound, OutcomeConflict, ValidationFailed
from service.keys import authorize
from service.models.assignment import ModelManager
from service.models.metadata import Metadata
from service.models.registry import UnknownVersion
from service.routes import params
from service.routes.bodies import decode, json_response, read_json_body
from service.schemas import ProblemError, encoder, outcome_decoder

MAX_OUTCOME_BODY = 4096
# A clock a little ahead of ours is not an observation from the future.
CLOCK_SKEW = dt.timedelta(minutes=5)


def _invalid(path: str, message: str) -> ValidationFailed:
    return ValidationFailed(f"The request body is not valid: {message} at {path}.", [ProblemError(path, message)])


async def record_outcome(request: Request) -> Response:
    key = authorize(request)
    decision_id: uuid.UUID = request.path_params["decision_id"]
    outcome = decode(outcome_decoder, await read_json_body(request, MAX_OUTCOME_BODY))
    if outcome.observed_at > dt.datetime.now(dt.UTC) + CLOCK_SKEW:
        raise _invalid("$.observed_at", "Expected a time that has passed, got one in the future")
    result, recorded, decided_at = await request.app.state.store.record_outcome(
        decision_id, outcome, key.id if key is not None else None
    )
    if result == "unknown":
        raise NotFound(f"There is no decision with id {decision_id}.")
    if result == "too_early":
        raise _invalid("$.observed_at", f"Expected a time after the decision was made ({decided_at.isoformat()})")
    if result == "different":
        raise OutcomeConflict(
            f"Decision {decision_id} already has another outcome on record: defaulted={str(recorded.defaulted).lower()}"
            f", observed at {recorded.observed_at.isoformat()}. Outcomes are not overwritten."
        )
    return json_response(encoder.encode(recorded), 201 if result == "created" else 200)


async def _metadata(manager: ModelManager, version: str | None) -> Metadata:
    current = manager.current
    assert current is not None
    if version is None or version == current.champion.version:
        return current.champion.metadata
    try:
        entry = await asyncio.to_thread(manager.registry.get, version)
    except UnknownVersion as exc:
        raise NotFound(str(exc)) from None
    if entry.metadata is None:
        raise NotFound(f"Model version {version} cannot be read: {entry.error}")
    return entry.metadata


async def get_monitoring(request: Request) -> Response:
    """A version (default: the champion) over a window (default: the last 24 h)."""
    authorize(request, read_only=True)
    since, until = params.window(request)
    metadata = await _metadata(request.app.state.models, request.query_params.get("model_version"))
    counts = await request.app.state.store.monitoring_counts(
        metadata.version, since, until, metadata.training_distribution
    )
    return json_response(encoder.encode(monitoring.report(metadata, since, until, counts)))
