"""The HTTP API under /api/cli/v1, for the flux CLI and existing Flux clients.

Every response is JSON, errors included: `{"error": "<message>"}`.
"""

import asyncio
import datetime
import hashlib
import json
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from . import __version__
from .access import ADMIN, OPERATOR, ApiGuard, BodyLimits, FailureLimiter, require_admin
from .catalog import Agent, ApiToken, Catalog, Job, User
from .errors import BadRequest, FluxError, NotFound, Unauthorized
from .dashboard import mount as mount_dashboard
from .fleet import Fleet, check_agent_name, check_roles
from .gateways import service_url
from .migrate import Migrations, Options
from .projects import POOLED_NOTE, Projects, check_hash, kept_copy, list_item
from .tokens import new_api_token, new_join_token, token_hash

log = logging.getLogger(__name__)

PREFIX = "/api/cli/v1"
# Job kinds an operator may run by hand through the API; operations send others.
DIAGNOSTIC_JOBS = ("facts.collect", "diag.wait")
MAX_JOIN_TOKEN_TTL = 30 * 24 * 3600
MAX_PUSH_BYTES = 4 * 1024 * 1024
MAX_JOB_REQUEST_BYTES = 32 * 1024 * 1024


class JoinTokenRequest(BaseModel):
    roles: list[str] = Field(description="roles the enrolling agent may take: db, docker, gateway")
    ttl_seconds: int = Field(3600, ge=60, le=MAX_JOIN_TOKEN_TTL)


class CreateRequest(BaseModel):
    name: str
    mode: str = "v2_shared"
    host: str | None = Field(None, description="docker agent to place a dedicated project on")
    stripSupabaseRestPrefix: bool | None = None


class MaintenanceRequest(BaseModel):
    enabled: bool


class LifecycleRequest(BaseModel):
    action: str


class UserRequest(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
    role: str = Field(OPERATOR, pattern=f"^({ADMIN}|{OPERATOR})$")
    plan: str = Field("pro", pattern="^(hobby|pro)$")


class JobRequest(BaseModel):
    kind: str = Field(description=f"one of {', '.join(DIAGNOSTIC_JOBS)}")
    params: dict = Field(default_factory=dict)
    job_id: str | None = Field(None, min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                               description="idempotency key: a job sent twice with one id runs once")


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value else None


def agent_view(agent: Agent, connected: bool, gateway: dict | None = None) -> dict:
    view = {
        "name": agent.name,
        "roles": agent.roles,
        "connected": connected,
        "revoked": agent.revoked_at is not None,
        "last_seen": _iso(agent.last_seen),
        "cert_expires_at": _iso(agent.cert_expires_at),
        "facts": agent.facts,
    }
    if gateway is not None:
        # healthy | unhealthy (stops serving when its lease runs out) | unknown (not synced yet)
        view["gateway"] = gateway
    return view


def job_view(job: Job) -> dict:
    return {
        "id": job.id, "agent": job.agent, "kind": job.kind, "state": job.state,
        "output": job.output, "error": job.error, "retryable": job.retryable,
        "progress": job.progress,
    }


def token_view(token: ApiToken, current_hash: str | None) -> dict:
    return {"id": token.id, "user": token.user, "fingerprint": token.token_hash[:12],
            "createdAt": _iso(token.created_at), "lastUsedAt": _iso(token.last_used_at),
            "current": token.token_hash == current_hash}


def flag(body: dict, key: str, default: bool = False) -> bool:
    """A JSON boolean, strictly: `"false"`, 0 or null are errors, not truthy or falsy guesses."""
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false (a JSON boolean), got {json.dumps(value)[:40]}")
    return value


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


async def read_json(request: Request) -> dict:
    """The request's JSON object (ApiGuard has already held its body to the route's limit)."""
    try:
        value = json.loads(await request.body() or b"{}")
    except ValueError:
        raise BadRequest("request body is not valid JSON") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply to be a request") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


def push_files(body: dict) -> list[dict]:
    """The files of a push: `files`, or one `sql` with its optional `migration` (existing clients)."""
    if "files" in body:
        files = body["files"]
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise BadRequest("files must be a list of {filename, sql, version?, checksum?}")
        return [{k: f[k] for k in ("filename", "sql", "version", "checksum") if k in f} for f in files]
    sql_text = body.get("sql")
    if not isinstance(sql_text, str):
        raise BadRequest("push needs sql (a string) or files")
    migration = body.get("migration") or {}
    if migration:
        return [{"filename": str(migration.get("filename", "")), "version": str(migration.get("version", "")),
                 "checksum": str(migration.get("checksum", "")), "sql": sql_text}]
    digest = hashlib.sha256(sql_text.encode()).hexdigest()
    return [{"filename": f"adhoc-{digest[:12]}.sql", "sql": sql_text}]


def create_app(catalog: Catalog, fleet: Fleet, projects: Projects, migrations: Migrations, ca_fingerprint: str,
               enroll_address: str) -> FastAPI:
    app = FastAPI(
        title="Flux control plane API",
        version=__version__,
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(FluxError)
    async def flux_error(_: Request, exc: FluxError):
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return _error(400, _validation_message(exc))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error in the HTTP API")
        return _error(500, "internal error; the controller's log has the details")

    async def current_user(request: Request) -> User:
        # ApiGuard authenticated the request from its headers before anything read its body.
        user = getattr(request.state, "user", None)
        if user is None:
            raise Unauthorized()
        return user

    async def admin(user: User = Depends(current_user)) -> User:
        require_admin(user)
        return user

    def caller_token_hash(request: Request) -> str:
        return token_hash(request.headers.get("authorization", "").partition(" ")[2].strip())

    def gateway_view(agent: Agent) -> dict | None:
        return projects.gateways.view(agent.name) if "gateway" in agent.roles else None

    async def known_agent(name: str) -> Agent:
        check_agent_name(name)
        agent = await catalog.get_agent(name)
        if agent is None:
            raise NotFound(f"no agent named {name}")
        return agent

    limiter = FailureLimiter()
    mount_dashboard(app, catalog, fleet, projects, migrations, limiter)
    app.add_middleware(ApiGuard, catalog=catalog, prefix=PREFIX, public_paths={f"{PREFIX}/openapi.json"},
                       body_limits=BodyLimits({("POST", f"{PREFIX}/push"): MAX_PUSH_BYTES,
                                               # Diagnostic jobs (admins only) may probe the fleet's own limit.
                                               ("POST", f"{PREFIX}/agents/[^/]+/jobs"): MAX_JOB_REQUEST_BYTES}),
                       limiter=limiter)

    @app.get(f"{PREFIX}/auth/verify")
    async def verify(user: User = Depends(current_user)):
        return {"ok": True, "user": user.name, "plan": user.plan,
                "defaultMode": "v2_shared", "cliRole": user.cli_role}

    @app.post(f"{PREFIX}/agents/tokens", status_code=201)
    async def create_join_token(body: JoinTokenRequest, user: User = Depends(admin)):
        roles = check_roles(body.roles)
        token = new_join_token()
        expires_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
            seconds=body.ttl_seconds)
        await catalog.create_join_token(token_hash(token), roles, expires_at, user.id)
        return {"token": token, "roles": roles, "expires_at": expires_at.isoformat(),
                "ca_fingerprint": ca_fingerprint, "enroll_address": enroll_address}

    @app.get(f"{PREFIX}/agents")
    async def list_agents(_: User = Depends(admin)):
        return [agent_view(a, fleet.connected(a.name), gateway_view(a)) for a in await catalog.list_agents()]

    @app.get(f"{PREFIX}/agents/{{name}}")
    async def show_agent(name: str, _: User = Depends(admin)):
        agent = await known_agent(name)
        return agent_view(agent, fleet.connected(agent.name), gateway_view(agent))

    @app.post(f"{PREFIX}/agents/{{name}}/revoke")
    async def revoke_agent(name: str, _: User = Depends(admin)):
        agent = await known_agent(name)
        await catalog.revoke_agent(agent.name)
        fleet.revoke(agent.name)
        return {"ok": True, "name": agent.name, "revoked": True}

    @app.post(f"{PREFIX}/agents/{{name}}/ping")
    async def ping_agent(name: str, _: User = Depends(admin)):
        agent = await known_agent(name)
        rtt_ms = await fleet.ping(agent.name)
        return {"name": agent.name, "rtt_ms": round(rtt_ms, 3)}

    @app.post(f"{PREFIX}/agents/{{name}}/jobs", status_code=202)
    async def run_job(name: str, body: JobRequest, _: User = Depends(admin)):
        agent = await known_agent(name)
        if body.kind not in DIAGNOSTIC_JOBS:
            raise BadRequest(f"unknown job kind {body.kind!r}; one of {', '.join(DIAGNOSTIC_JOBS)}")
        job = await fleet.submit(agent.name, body.kind, body.params, body.job_id)
        return job_view(job)

    @app.get(f"{PREFIX}/jobs/{{job_id}}")
    async def get_job(job_id: str, wait: float = 0, _: User = Depends(admin)):
        if not 0 <= wait <= 60:
            raise BadRequest("wait must be between 0 and 60 seconds")
        return job_view(await fleet.wait(job_id, wait))

    # users and API tokens

    @app.get(f"{PREFIX}/users")
    async def list_users(_: User = Depends(admin)):
        return [{"name": u.name, "cliRole": u.cli_role, "plan": u.plan} for u in await catalog.list_users()]

    @app.post(f"{PREFIX}/users", status_code=201)
    async def add_user(body: UserRequest, _: User = Depends(admin)):
        token = new_api_token()
        user = await catalog.create_user(body.name, token_hash(token), body.role, body.plan)
        return {"user": user.name, "cliRole": user.cli_role, "plan": user.plan, "token": token}

    @app.get(f"{PREFIX}/tokens")
    async def list_tokens(request: Request, all: bool = False, user: User = Depends(current_user)):
        if all:
            require_admin(user)
        tokens = await catalog.api_tokens(None if all else user.id)
        return [token_view(t, caller_token_hash(request)) for t in tokens]

    @app.post(f"{PREFIX}/tokens", status_code=201)
    async def create_token(user: User = Depends(current_user)):
        token = new_api_token()
        created = await catalog.add_api_token(user.id, token_hash(token))
        return {**token_view(created, None), "token": token}

    @app.delete(f"{PREFIX}/tokens/{{token_id}}")
    async def revoke_token(token_id: int, user: User = Depends(current_user)):
        token = await catalog.api_token(token_id)
        if token is None or (token.user_id != user.id and user.cli_role != ADMIN):
            raise NotFound(f"no API token {token_id}")
        await catalog.delete_api_token(token_id)
        return {"ok": True, "id": token_id, "revoked": True}

    # projects

    @app.post(f"{PREFIX}/create", status_code=201)
    async def create_project(body: CreateRequest, user: User = Depends(current_user)):
        project, secret = await projects.create(user, body.name, body.mode, body.host)
        if project.mode == "v2_shared":
            stored = {"postgresPassword": "n/a-v2-shared", "postgresContainerHost": "shared-cluster",
                      "note": POOLED_NOTE}
        else:
            stored = {"postgresPassword": projects.postgres_password(project),
                      "postgresContainerHost": f"{project.db_host}:{project.db_port}",
                      "note": "Dedicated project: its own Postgres and PostgREST containers."}
        return {
            "summary": list_item(project, projects.base_domain),
            "mode": project.mode,
            "serviceUrl": service_url(project, projects.base_domain),
            "projectJwtSecret": secret,
            "secrets": {"pgrstJwtSecret": secret, **stored},
        }

    @app.get(f"{PREFIX}/list")
    async def list_projects(user: User = Depends(current_user)):
        return await projects.listing(user)

    @app.get(f"{PREFIX}/projects/{{hash_}}")
    async def show_project(hash_: str, user: User = Depends(current_user)):
        project = await projects.get(user, hash_)
        return {"slug": project.slug, "hash": project.hash, "mode": project.mode, "name": project.name,
                "apiSchema": project.api_schema, "lifecycleState": project.lifecycle,
                "maintenance": project.maintenance, "createdAt": project.created_at.isoformat(),
                **({"pooledCopy": kept_copy(project)} if project.kept_copy_bytes is not None else {}),
                "serviceUrl": service_url(project, projects.base_domain)}

    @app.get(f"{PREFIX}/projects/{{hash_}}/credentials")
    async def project_credentials(hash_: str, user: User = Depends(current_user)):
        return projects.credentials(await projects.get(user, hash_))

    @app.get(f"{PREFIX}/projects/{{hash_}}/migrations")
    async def project_migrations(hash_: str, user: User = Depends(current_user)):
        return await projects.migrations(await projects.get(user, hash_))

    @app.get(f"{PREFIX}/projects/{{hash_}}/backups")
    async def project_backups(hash_: str, user: User = Depends(current_user)):
        await projects.get(user, hash_)
        return {"backups": []}

    @app.post(f"{PREFIX}/projects/{{hash_}}/lifecycle")
    async def project_lifecycle(hash_: str, body: LifecycleRequest, user: User = Depends(current_user)):
        return await projects.lifecycle(await projects.get(user, hash_), body.action)

    @app.post(f"{PREFIX}/projects/{{hash_}}/probe")
    async def project_probe(hash_: str, user: User = Depends(current_user)):
        return await projects.probe(await projects.get(user, hash_))

    @app.post(f"{PREFIX}/projects/{{hash_}}/repair")
    async def project_repair(hash_: str, user: User = Depends(current_user)):
        return await projects.repair(await projects.get(user, hash_))

    @app.delete(f"{PREFIX}/projects/{{hash_}}")
    async def project_delete(hash_: str, slug: str, user: User = Depends(current_user)):
        return await projects.delete(await projects.get(user, hash_, slug))

    @app.post(f"{PREFIX}/projects/{{hash_}}/maintenance")
    async def project_maintenance(hash_: str, body: MaintenanceRequest, user: User = Depends(current_user)):
        return await projects.set_maintenance(await projects.get(user, hash_), body.enabled)

    @app.post(f"{PREFIX}/migrate")
    async def migrate(request: Request, user: User = Depends(current_user)):
        body = await read_json(request)
        for key in ("dryRun", "dumpOnly", "staged", "yes", "newJwtSecret", "lockWrites", "noLockWrites",
                    "dropSourceAfter", "preserveJwtSecret", "skipBackupCheck"):
            if key in body:
                flag(body, key)
        slug, hash_ = body.get("slug"), body.get("hash")
        if not isinstance(slug, str) or not isinstance(hash_, str):
            raise BadRequest("migrate needs slug and hash")
        check_hash(hash_)
        project = await catalog.project_by_hash(user.id, hash_)
        if project is None or project.lifecycle in ("provisioning", "deleting"):
            raise NotFound("Project not found for this API key")
        if slug != project.slug:
            raise BadRequest(f"slug {slug!r} does not own hash {hash_} (that project is {project.slug!r})")
        options = Options.from_request(body)
        if options.dry_run:
            return await migrations.dry_run(project, options)
        return await follow(request, await migrations.start(project, options))

    async def follow(request: Request, row):
        """The migration's result, or with Accept: application/x-ndjson its events as they happen."""
        if "application/x-ndjson" not in request.headers.get("accept", ""):
            result = await migrations.wait(row.id)
            return JSONResponse(result, status_code=200 if result["ok"] else 400)
        queue = migrations.subscribe(row.id)

        async def events():
            try:
                yield json.dumps({"event": "started", "migrationId": row.id, "kind": row.kind}) + "\n"
                while True:
                    event = await queue.get()
                    yield json.dumps(event) + "\n"
                    if event.get("event") == "result":
                        return
            finally:
                migrations.unsubscribe(row.id, queue)

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @app.get(f"{PREFIX}/migrations/{{migration_id}}")
    async def migration_status(migration_id: str, user: User = Depends(current_user)):
        try:
            return await migrations.wait_status(migration_id, None if user.cli_role == ADMIN else user.id)
        except ValueError:
            raise BadRequest("invalid migration id") from None

    @app.delete(f"{PREFIX}/projects/{{hash_}}/staged-stack")
    async def discard_staged_stack(hash_: str, slug: str, user: User = Depends(current_user)):
        return await projects.discard_staged_stack(await projects.get(user, hash_, slug))

    @app.delete(f"{PREFIX}/projects/{{hash_}}/pooled-copy")
    async def drop_pooled_copy(hash_: str, slug: str, user: User = Depends(current_user)):
        return await projects.drop_kept_copy(await projects.get(user, hash_, slug))

    @app.get(f"{PREFIX}/projects/{{hash_}}/migration")
    async def project_latest_migration(hash_: str, user: User = Depends(current_user)):
        return await migrations.latest(await projects.get(user, hash_))

    @app.get(f"{PREFIX}/migrations/{{migration_id}}/events")
    async def migration_events(migration_id: str, user: User = Depends(current_user)):
        """The migration as it stands, then its events as they happen (NDJSON), ending with its result."""
        try:
            status = await migrations.wait_status(migration_id, None if user.cli_role == ADMIN else user.id)
        except ValueError:
            raise BadRequest("invalid migration id") from None
        queue = migrations.subscribe(status["migrationId"])

        async def events():
            try:
                yield json.dumps({"event": "status", **status}) + "\n"
                if not status.get("running"):
                    yield json.dumps({"event": "result", **status}) + "\n"
                    return
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), 15)
                    except asyncio.TimeoutError:
                        # The run may have ended between the status read and the subscription.
                        now = await migrations.wait_status(status["migrationId"], None)
                        if now.get("running"):
                            continue
                        event = {"event": "result", **now}
                    yield json.dumps(event) + "\n"
                    if event.get("event") == "result":
                        return
            finally:
                migrations.unsubscribe(status["migrationId"], queue)

        return StreamingResponse(events(), media_type="application/x-ndjson")

    @app.post(f"{PREFIX}/migrations/{{migration_id}}/resume")
    async def migration_resume(migration_id: str, request: Request, user: User = Depends(current_user)):
        try:
            row = await migrations.resume(migration_id, None if user.cli_role == ADMIN else user.id)
        except ValueError:
            raise BadRequest("invalid migration id") from None
        return await follow(request, row)

    @app.post(f"{PREFIX}/push")
    async def push(request: Request, user: User = Depends(current_user)):
        body = await read_json(request)
        dry_run = flag(body, "dryRun")
        slug, hash_ = body.get("slug"), body.get("hash")
        if not isinstance(slug, str) or not isinstance(hash_, str):
            raise BadRequest("push needs slug and hash")
        project = await projects.get(user, hash_, slug)
        result = await projects.push(project, push_files(body), dry_run)
        result["skippedFiles"] = result.pop("skipped")
        result["skipped"] = not result["applied"]
        return result

    return app
