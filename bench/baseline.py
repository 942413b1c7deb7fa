"""The ceilings: what this machine can do for a request of this shape, served with the service's uvicorn flags.

- `app` only decodes the applicant and encodes a reply: the ceiling before any
  scoring, storage or caching (bench/run.py, bench/latency.py).
- `committing_app` also scores the applicant and commits it before it answers, the
  way most services do: one autocommitted INSERT of the service's own row per
  request, on a psycopg pool of `DATABASE_POOL_SIZE` connections to `DATABASE_URL`
  (whose table the service has created), with the service's collector settings.
  It is the least a service that commits before answering costs on this stack and
  this database: bench/latency.py judges the service's latency against it,
  measured in the same run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import uuid
from collections.abc import AsyncIterator

import psycopg_pool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.lifecycle.runner import GC_YOUNG_THRESHOLD
from service.models.registry import Registry, ScorecardModel, load_scorecard
from service.schemas import Applicant, applicant_decoder, encoder
from service.settings import DEFAULT_MODEL_DIR, Settings
from service.storage import Record
from service.storage.base import _row
from service.storage.postgres import _PG_INSERT


def shipped_scorecard() -> ScorecardModel:
    """The newest logistic version shipped in the repository, loaded as the service loads it (the benches' model)."""
    newest = Registry(DEFAULT_MODEL_DIR).newest()
    assert newest is not None
    return load_scorecard(newest, None)


async def decide(request: Request) -> Response:
    applicant: Applicant = applicant_decoder.decode(await request.body())
    reply = {"id": uuid.uuid4(), "age": applicant.age, "decision": "approve"}
    return Response(encoder.encode(reply), status_code=201, media_type="application/json")


app = Starlette(routes=[Route("/decisions", decide, methods=["POST"])])


@contextlib.asynccontextmanager
async def _committing(app: Starlette) -> AsyncIterator[None]:
    settings = Settings.from_env()
    if settings.database_url is None:
        raise RuntimeError("committing_app commits to DATABASE_URL, which is not set")
    app.state.model = shipped_scorecard()
    size = settings.database_pool_size
    async with psycopg_pool.AsyncConnectionPool(
        settings.database_url, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False
    ) as pool:
        await pool.wait()
        app.state.pool = pool
        # The service's collector settings (service/lifecycle/runner.py), so that what sets this ceiling's tail is
        # the commit, not a full collection of start-up's objects under load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        yield


async def decide_and_commit(request: Request) -> Response:
    applicant: Applicant = applicant_decoder.decode(await request.body())
    decision = request.app.state.model.decide(applicant, uuid.uuid4(), dt.datetime.now(dt.UTC))
    async with request.app.state.pool.connection() as conn:
        await conn.execute(_PG_INSERT, _row(Record(decision, applicant), "postgres"))
    return Response(encoder.encode(decision), status_code=201, media_type="application/json")


committing_app = Starlette(routes=[Route("/decisions", decide_and_commit, methods=["POST"])], lifespan=_committing)
