"""The HTTP API under /api/cli/v1, for the flux CLI and existing Flux clients, and the dashboard.

Every API response is JSON, errors included: `{"error": "<message>"}`. Routes live in one
module per resource; this module builds the app around them.
"""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import FluxError
from ..fleet import Fleet
from ..migrate import Migrations
from ..projects import Projects
from ..store import Catalog
from . import agents, backups, migrations, projects, users
from .access import ApiGuard, BodyLimits, FailureLimiter
from .common import PREFIX, Services, error_response, log, validation_message
from .dashboard import mount as mount_dashboard
from .follower import FollowTheLeader

MAX_JOB_REQUEST_BYTES = 32 * 1024 * 1024


def create_app(catalog: Catalog, fleet: Fleet, projects_: Projects, migrations_: Migrations, ca_fingerprint: str,
               enroll_address: str, backups_=None, forward_ca: str | None = None) -> FastAPI:
    app = FastAPI(
        title="Flux control plane API",
        version=__version__,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = Services(catalog, fleet, projects_, migrations_, ca_fingerprint, enroll_address,
                                  backups_)

    @app.exception_handler(FluxError)
    async def flux_error(_: Request, exc: FluxError):
        return error_response(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return error_response(400, validation_message(exc))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error in the HTTP API")
        return error_response(500, "internal error; the controller's log has the details")

    limiter = FailureLimiter()
    mount_dashboard(app, catalog, fleet, projects_, migrations_, limiter)
    app.add_middleware(ApiGuard, catalog=catalog, prefix=PREFIX, public_paths={f"{PREFIX}/openapi.json"},
                       body_limits=BodyLimits({("POST", f"{PREFIX}/push"): projects.MAX_PUSH_BYTES,
                                               # Diagnostic jobs (admins only) may probe the fleet's own limit.
                                               ("POST", f"{PREFIX}/agents/[^/]+/jobs"): MAX_JOB_REQUEST_BYTES}),
                       limiter=limiter)
    for module in (users, agents, projects, backups, migrations):
        app.include_router(module.router)
    # Outermost: a follower forwards before its own guard reads the request.
    app.add_middleware(FollowTheLeader, fleet=fleet, tls_ca=forward_ca)
    return app
