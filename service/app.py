"""The ASGI application: `uvicorn service.app:app`."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from service.errors import ServiceError, handle_http_exception, handle_service_error
from service.lifecycle import Lifecycle, QuietStartupFailure, Step, default_steps
from service.middleware import Gate, RequestContext
from service.routes import ROUTES
from service.settings import Settings


def create_app(settings: Settings | None = None, steps: Sequence[Step] | None = None) -> Starlette:
    """Build the app; with no settings, start-up reads them from the environment."""
    app = Starlette(
        routes=ROUTES,
        middleware=[
            Middleware(QuietStartupFailure),
            Middleware(RequestContext),
            Middleware(Gate),
        ],
        exception_handlers={ServiceError: handle_service_error, HTTPException: handle_http_exception},
        lifespan=Lifecycle(steps if steps is not None else default_steps(settings)),
    )
    # /decisions/ is not /decisions: answer 404, not a redirect built from the Host header.
    app.router.redirect_slashes = False
    return app


app = create_app()
