"""What integrators and auditors search and erase: the search of decisions, and erasure of their inputs.

GET /decisions                      search by time window, decision and reference, newest first, paged by cursor
DELETE /decisions/{id}/applicant    erase the inputs and the reference, keep the decision (admin keys only)

(GET /decisions/{id}?include=applicant, the inputs for an audit, is in decisions.py beside the plain GET.)

A window search does not list the newest few seconds (three DATABASE_REQUEST_TIMEOUTs,
storage.COMMIT_BOUND): a decision's time is taken before its row commits, so a row
younger than that may still land above a page already served, and a listing that
went that close to now could skip it. Older rows have committed or never will (the
store refuses a write that queued too long). The page says which window it searched.
"""

from __future__ import annotations

import datetime as dt
import uuid

from starlette.requests import Request
from starlette.responses import Response

from service import cursors
from service.errors import InvalidParameter, NotFound, ServiceUnavailable, quoted
from service.keys import authorize, authorize_admin
from service.routes.bodies import json_response
from service.routes.params import limit, timestamp
from service.schemas import ErasedDecision, SearchPage, encoder
from service.storage import COMMIT_BOUND, Search

DEFAULT_LIMIT = 100
MOST_LIMIT = 1000
DEFAULT_WINDOW = dt.timedelta(hours=24)
# A reference search reaches back this far by default: the lender's own id should find its decision.
# (Its default `until` is now, taken when the request arrives.)
REFERENCE_WINDOW = dt.timedelta(days=3660)
DECISIONS = ("approve", "decline", "refer")
_FILTERS = ("since", "until", "decision", "reference")


def _reference(request: Request) -> str | None:
    raw = request.query_params.get("reference")
    if raw is None:
        return None
    if not 1 <= len(raw) <= 64 or not raw.isascii() or not raw.isprintable():
        raise InvalidParameter(f"reference must be 1 to 64 printable ASCII characters, got {quoted(raw)}.")
    return raw


def _decision(request: Request) -> str | None:
    raw = request.query_params.get("decision")
    if raw is not None and raw not in DECISIONS:
        raise InvalidParameter(f"decision must be one of {', '.join(DECISIONS)}, got {quoted(raw)}.")
    return raw


def _first_page(request: Request) -> cursors.Position:
    """The search a request without a cursor starts: its window (bounded by the horizon) and filters."""
    now = dt.datetime.now(dt.UTC)
    reference = _reference(request)
    until = timestamp(request, "until") or now
    since = timestamp(request, "since") or until - (DEFAULT_WINDOW if reference is None else REFERENCE_WINDOW)
    if since >= until:
        raise InvalidParameter(f"since ({since.isoformat()}) must be before until ({until.isoformat()}).")
    if reference is None:
        # Only rows that have certainly committed or failed (see the module's docstring); a window
        # that lies wholly past the horizon is empty for now.
        horizon = now - dt.timedelta(seconds=COMMIT_BOUND * request.app.state.settings.database_request_timeout)
        until = max(since, min(until, horizon))
    # A reference names a handful of decisions, read in one page: no horizon, so a decision is found
    # the moment it is made.
    return cursors.Position(
        v=cursors.VERSION,
        since=since.isoformat(),
        until=until.isoformat(),
        decision=_decision(request),
        reference=reference,
        after_created_at=None,
        after_id=None,
    )


def _continued(request: Request, cursor: str) -> cursors.Position:
    """The search a cursor continues: it carries the window and filters, so it comes alone (with a limit)."""
    given = [name for name in _FILTERS if name in request.query_params]
    if given:
        raise InvalidParameter(
            f"cursor continues an earlier search; send it alone (with limit), not with {', '.join(given)}."
        )
    return cursors.open_cursor(request.app.state.cursor_key, cursor)


async def search(request: Request) -> Response:
    """GET /decisions: one page of a search, newest first."""
    authorize(request, read_only=True)
    page_size = limit(request, DEFAULT_LIMIT, MOST_LIMIT)
    cursor = request.query_params.get("cursor")
    position = _first_page(request) if cursor is None else _continued(request, cursor)
    after = None
    if position.after_created_at is not None and position.after_id is not None:
        after = (dt.datetime.fromisoformat(position.after_created_at), uuid.UUID(position.after_id))
    since, until = dt.datetime.fromisoformat(position.since), dt.datetime.fromisoformat(position.until)
    # One more than the page: whether there is a next page, without a second query.
    rows = await request.app.state.store.search(
        Search(since, until, position.decision, position.reference, after, page_size + 1)
    )
    decisions, more = rows[:page_size], len(rows) > page_size
    next_cursor = None
    if more:
        last = decisions[-1]
        next_cursor = cursors.sign(
            request.app.state.cursor_key,
            cursors.Position(
                v=cursors.VERSION,
                since=position.since,
                until=position.until,
                decision=position.decision,
                reference=position.reference,
                after_created_at=last.created_at.isoformat(),
                after_id=str(last.id),
            ),
        )
    return json_response(encoder.encode(SearchPage(decisions=decisions, next=next_cursor, since=since, until=until)))


async def erase(request: Request) -> Response:
    """DELETE /decisions/{id}/applicant: erase the applicant's inputs and the reference; the decision stays."""
    key = authorize_admin(request)
    decision_id: uuid.UUID = request.path_params["decision_id"]
    state = request.app.state
    erasure = await state.store.erase(decision_id, key.id)
    if erasure is None:
        raise NotFound(f"There is no decision with id {decision_id}.")
    # The cached answer still holds the reference: it goes too, or the erasure is not done.
    if not await state.cache.delete([decision_id]):
        raise ServiceUnavailable(
            "The inputs are erased, but the cached copy of the decision could not be removed (the cache is"
            " unreachable); repeat the request: it is safe to."
        )
    body = ErasedDecision(id=decision_id, erased_at=erasure.erased_at, erased_by=erasure.erased_by)
    return json_response(encoder.encode(body))
