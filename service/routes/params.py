"""Query parameters: a time window (`since`, `until`) and a bounded `limit`, with 400s that name the parameter."""

from __future__ import annotations

import datetime as dt

from starlette.requests import Request

from service.errors import InvalidParameter, quoted
from service.monitoring import DEFAULT_WINDOW

# Times outside these bounds are refused: windows are computed from them (until - 10 years) without overflowing.
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)


def timestamp(request: Request, name: str) -> dt.datetime | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.strip().replace("Z", "+00:00"))
        # A time without an offset is read as UTC, the zone every stored time is in.
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise InvalidParameter(
            f"{name} must be an ISO 8601 time such as 2026-11-29T10:15:00Z, got {quoted(raw)}."
        ) from None
    if not EARLIEST <= value < LATEST:
        raise InvalidParameter(f"{name} must be between {EARLIEST.year} and {LATEST.year}, got {quoted(raw)}.")
    return value


def window(request: Request) -> tuple[dt.datetime, dt.datetime]:
    """[since, until): by default the last 24 hours."""
    until = timestamp(request, "until") or dt.datetime.now(dt.UTC)
    since = timestamp(request, "since") or until - DEFAULT_WINDOW
    if since >= until:
        raise InvalidParameter(f"since ({since.isoformat()}) must be before until ({until.isoformat()}).")
    return since, until


def limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise InvalidParameter(f"limit must be an integer from 1 to {most}, got {quoted(raw)}.")
    return int(raw)
