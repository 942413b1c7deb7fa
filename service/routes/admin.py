"""The admin API: the registry, promotion and rollback, the challenger and its comparison.

Every call needs an admin key (`ADMIN_API_KEYS`; 403 without one) and every
change is logged with the key's id, never its secret. A change is verified in
this worker first (a version that cannot be loaded answers 422 and changes
nothing), then recorded in the system of record, which tells every worker of
every replica; this worker swaps at once, the others within seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable
from typing import TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from service.errors import ModelRefused, NotFound
from service.keys import authorize_admin
from service.models.assignment import ModelManager
from service.models.metadata import ModelError
from service.models.registry import UnknownVersion
from service.monitoring import Ranking
from service.routes import params
from service.routes.bodies import decode, json_response, read_json_body
from service.schemas import (
    Assignment,
    AssignmentHistory,
    ChallengerAssignment,
    ModelsOverview,
    VersionSummary,
    challenger_request_decoder,
    encoder,
)
from service.storage.model_records import Next

logger = logging.getLogger("service.admin")
T = TypeVar("T")

MAX_ADMIN_BODY = 4096
# Workers report every 15 s; one silent for a minute is gone (stopped, or killed).
WORKER_STALE = dt.timedelta(seconds=60)
HISTORY_DEFAULT, HISTORY_MOST = 100, 1000


async def _verified(loading: Awaitable[T]) -> T:
    """Load a version for a role, in this worker, before anything is recorded: 404 unknown, 422 unusable."""
    try:
        return await loading
    except UnknownVersion as exc:
        raise NotFound(str(exc)) from None
    except ModelError as exc:
        raise ModelRefused(f"Nothing changed: {exc}") from None


async def _apply_here(request: Request, assignment: Assignment, prepared: str | None) -> None:
    """This worker swaps now (the others follow the NOTIFY, or their next read, within seconds)."""
    manager: ModelManager = request.app.state.models
    try:
        await manager.refresh(request.app.state.store.read_assignment)
    except ModelError as exc:  # verified a moment ago; the watcher retries and the report shows it
        logger.error("Recorded revision %d but could not apply it in this worker: %s", assignment.revision, exc)
    finally:
        if prepared is not None:  # not taken (the change changed nothing, or lost to a newer one): stop it
            manager.discard(prepared)


async def list_models(request: Request) -> Response:
    authorize_admin(request)
    state = request.app.state
    manager: ModelManager = state.models
    assignment = await state.store.read_assignment()
    entries = await asyncio.to_thread(manager.registry.scan)
    workers = await state.store.workers(dt.datetime.now(dt.UTC) - WORKER_STALE)
    challenger = assignment.challenger.version if assignment.challenger else None
    versions = []
    for entry in entries:
        m = entry.metadata
        role = (
            "champion"
            if entry.version == assignment.champion
            else "challenger"
            if entry.version == challenger
            else None
        )
        versions.append(
            VersionSummary(
                version=entry.version,
                kind=m.kind if m else None,
                trained_at=m.trained_at if m else None,
                sha256=m.sha256 if m else None,
                metrics=msgspec.structs.asdict(m.metrics) if m else None,
                role=role,  # type: ignore[arg-type]
                error=entry.error,
            )
        )
    return json_response(encoder.encode(ModelsOverview(assignment=assignment, versions=versions, workers=workers)))


async def promote(request: Request) -> Response:
    """Make a version champion (a rollback is a promotion of the version before)."""
    key = authorize_admin(request)
    state = request.app.state
    manager: ModelManager = state.models
    version: str = request.path_params["version"]
    manager.prepare(await _verified(manager.load_champion(version)))

    def change(current: Assignment | None) -> tuple[str, Next] | None:
        kept = current.challenger if current is not None else None
        if kept is not None and kept.version == version:
            kept = None  # the challenger became champion: it no longer shadows itself
        if current is not None and current.champion == version and kept == current.challenger:
            return None
        return "promote", (version, kept)

    before = manager.current.assignment if manager.current else None
    try:
        assignment: Assignment = await state.store.change_assignment(change, key.id)
    except BaseException:
        manager.discard(version)
        raise
    await _apply_here(request, assignment, version)
    if before is not None and assignment.revision == before.revision:
        logger.info(
            "Admin key %s promoted %s, which is the champion already (revision %d)", key.id, version, before.revision
        )
    else:
        was = before.champion if before is not None else None
        logger.info(
            "Admin key %s promoted %s to champion (revision %d; was %s)", key.id, version, assignment.revision, was
        )
    return json_response(encoder.encode(assignment))


async def set_challenger(request: Request) -> Response:
    """Shadow the champion with a version on a share of decisions, or stop (`{"version": null}`)."""
    key = authorize_admin(request)
    state = request.app.state
    manager: ModelManager = state.models
    wanted = decode(challenger_request_decoder, await read_json_body(request, MAX_ADMIN_BODY))
    version: str | None = wanted.version

    def change(current: Assignment | None) -> tuple[str, Next] | None:
        if current is None:
            raise ModelRefused("There is no champion yet to challenge.")
        if version is None:
            return None if current.challenger is None else ("challenger", (current.champion, None))
        if version == current.champion:
            raise ModelRefused(f"Nothing changed: {version} is the champion; a challenger must be another version.")
        new = ChallengerAssignment(version=version, share=wanted.share)
        return None if current.challenger == new else ("challenger", (current.champion, new))

    current = manager.current
    serving = current.challenger.version if current is not None and current.challenger is not None else None
    if version is not None and version != serving:
        if current is not None and current.champion.version == version:
            change(current.assignment)  # the same 422, before starting a process for nothing
        manager.prepare(await _verified(manager.load_challenger(version)))
    try:
        assignment: Assignment = await state.store.change_assignment(change, key.id)
    except BaseException:
        if version is not None:
            manager.discard(version)
        raise
    await _apply_here(request, assignment, version)
    if current is not None and assignment.revision == current.assignment.revision:
        logger.info(
            "Admin key %s asked for challenger %s: so it is already (revision %d)", key.id, version, assignment.revision
        )
    elif version is None:
        logger.info("Admin key %s stopped the challenger (revision %d)", key.id, assignment.revision)
    else:
        logger.info(
            "Admin key %s set challenger %s at share %g (revision %d)",
            key.id,
            version,
            wanted.share,
            assignment.revision,
        )
    return json_response(encoder.encode(assignment))


async def comparison(request: Request) -> Response:
    """Champion against challenger on the decisions both scored in the window (default: the last 24 h)."""
    authorize_admin(request)
    state = request.app.state
    since, until = params.window(request)
    current = await state.store.read_assignment()
    champion = request.query_params.get("champion") or current.champion
    challenger = request.query_params.get("challenger") or (current.challenger.version if current.challenger else None)
    if challenger is None:
        raise NotFound("No challenger is assigned; name one with ?challenger=<version>.")
    result = await state.store.compare(champion, challenger, since, until)
    # Back-testing both on the loans whose outcome is known, when there are any.
    champion_ranking, challenger_ranking = await state.store.compare_outcomes(champion, challenger, since, until)
    total = champion_ranking.defaults + champion_ranking.non_defaults
    if total:
        result = msgspec.structs.replace(
            result,
            outcomes={
                "count": total,
                "default_rate": champion_ranking.defaults / total,
                "champion": _back_test(champion_ranking),
                "challenger": _back_test(challenger_ranking),
            },
        )
    return json_response(encoder.encode(result))


def _back_test(ranking: Ranking) -> dict[str, float | None]:
    auc = ranking.roc_auc
    return {"roc_auc": auc, "gini": None if auc is None else 2 * auc - 1, "ks": ranking.ks}


async def history(request: Request) -> Response:
    """Every change of the assignment, newest first: from what, to what, by which key, when."""
    authorize_admin(request)
    limit = params.limit(request, HISTORY_DEFAULT, HISTORY_MOST)
    changes = await request.app.state.store.assignment_history(limit)
    return json_response(encoder.encode(AssignmentHistory(changes=changes)))
