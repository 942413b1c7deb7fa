"""The ceiling: a Starlette app that only decodes the applicant and encodes a reply.

Served with the same uvicorn flags as the service, it measures what this machine
can do for one request of this shape before any scoring, storage or caching.
"""

from __future__ import annotations

import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service.schemas import Applicant, applicant_decoder, encoder


async def decide(request: Request) -> Response:
    applicant: Applicant = applicant_decoder.decode(await request.body())
    reply = {"id": uuid.uuid4(), "age": applicant.age, "decision": "approve"}
    return Response(encoder.encode(reply), status_code=201, media_type="application/json")


app = Starlette(routes=[Route("/decisions", decide, methods=["POST"])])
