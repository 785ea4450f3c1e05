"""Projects: create, list, show, credentials, lifecycle, maintenance, push and what a migration leaves."""

import asyncio
import hashlib
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from contract.stacks import MAX_LOG_LINES

from ..errors import BadRequest, FluxError, NotImplementedHere
from ..gateways import service_url
from ..projects import POOLED_NOTE, check_hash, kept_copy, list_item
from ..store import User
from .common import PREFIX, Services, as_json, current_user, flag, query_flag, read_json, services

router = APIRouter(prefix=PREFIX)
MAX_PUSH_BYTES = 4 * 1024 * 1024


class CreateRequest(BaseModel):
    name: str
    mode: str = "v2_shared"
    host: str | None = Field(None, description="docker agent to place a dedicated project on")
    stripSupabaseRestPrefix: bool | None = None


class MaintenanceRequest(BaseModel):
    enabled: bool


class LifecycleRequest(BaseModel):
    action: str


def push_files(body: dict) -> list[dict]:
    """The files of a push: `files`, or one `sql` with its optional `migration` (existing clients)."""
    if "files" in body:
        files = body["files"]
        shape = "files must be a list of {filename, sql, version?, checksum?}, each a string"
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise BadRequest(shape)
        picked = [{k: f[k] for k in ("filename", "sql", "version", "checksum") if f.get(k) is not None}
                  for f in files]
        if not all(isinstance(f.get("filename"), str) and isinstance(f.get("sql"), str)
                   and all(isinstance(v, str) for v in f.values()) for f in picked):
            raise BadRequest(shape)
        return picked
    sql_text = body.get("sql")
    if not isinstance(sql_text, str):
        raise BadRequest("push needs sql (a string) or files")
    migration = body.get("migration") or {}
    if migration:
        return [{"filename": str(migration.get("filename", "")), "version": str(migration.get("version", "")),
                 "checksum": str(migration.get("checksum", "")), "sql": sql_text}]
    digest = hashlib.sha256(sql_text.encode()).hexdigest()
    return [{"filename": f"adhoc-{digest[:12]}.sql", "sql": sql_text}]


@router.post("/create", status_code=201)
async def create_project(body: CreateRequest, user: User = Depends(current_user), s: Services = Depends(services)):
    project, secret = await s.projects.create(user, body.name, body.mode, body.host)
    if project.mode == "v2_shared":
        stored = {"postgresPassword": "n/a-v2-shared", "postgresContainerHost": "shared-cluster",
                  "note": POOLED_NOTE}
    else:
        stored = {"postgresPassword": s.projects.postgres_password(project),
                  "postgresContainerHost": f"{project.db_host}:{project.db_port}",
                  "note": "Dedicated project: its own Postgres and PostgREST containers."}
    return {
        "summary": list_item(project, s.projects.base_domain),
        "mode": project.mode,
        "serviceUrl": service_url(project, s.projects.base_domain),
        "projectJwtSecret": secret,
        "secrets": {"pgrstJwtSecret": secret, **stored},
    }

@router.get("/list")
async def list_projects(user: User = Depends(current_user), s: Services = Depends(services)):
    return as_json(await s.projects.listing(user))

@router.get("/projects/{hash_}")
async def show_project(hash_: str, user: User = Depends(current_user), s: Services = Depends(services)):
    project = await s.projects.get(user, hash_)
    return {"slug": project.slug, "hash": project.hash, "mode": project.mode, "name": project.name,
            "apiSchema": project.api_schema, "lifecycleState": project.lifecycle,
            "maintenance": project.maintenance, "createdAt": project.created_at.isoformat(),
            **({"pooledCopy": kept_copy(project)} if project.kept_copy_bytes is not None else {}),
            "serviceUrl": service_url(project, s.projects.base_domain)}

@router.get("/projects/{hash_}/credentials")
async def project_credentials(hash_: str, user: User = Depends(current_user), s: Services = Depends(services)):
    return s.projects.credentials(await s.projects.get(user, hash_))

@router.get("/projects/{hash_}/migrations")
async def project_migrations(hash_: str, user: User = Depends(current_user), s: Services = Depends(services)):
    return await s.projects.migrations(await s.projects.get(user, hash_))

@router.get("/projects/{hash_}/dumps")
async def project_dumps(hash_: str, slug: str | None = None, all: bool = False, user: User = Depends(current_user),
                        s: Services = Depends(services)):
    """The project's dump files (those removed too with `all`), each as its db host sees it now."""
    return await s.projects.dump_files.listing(await s.projects.get(user, hash_, slug), removed_too=all)


@router.get("/projects/{hash_}/activity")
async def project_activity(hash_: str, limit: int = 20, user: User = Depends(current_user),
                           s: Services = Depends(services)):
    """What was done to the project, newest first (operations and migrations, with outcomes)."""
    return await s.projects.activity(await s.projects.get(user, hash_), limit)


@router.get("/projects/{hash_}/api-env")
async def project_api_env(hash_: str, slug: str | None = None, user: User = Depends(current_user),
                          s: Services = Depends(services)):
    """A dedicated project's PostgREST environment: what Flux sets (secrets hidden), what its owner chose."""
    return s.projects.api_env(await s.projects.get(user, hash_, slug))


@router.patch("/projects/{hash_}/api-env")
async def change_project_api_env(hash_: str, request: Request, slug: str | None = None,
                                 user: User = Depends(current_user), s: Services = Depends(services)):
    """Body {"env": {"PGRST_...": "value" | null}}: the API container is made again with the settings."""
    body = await read_json(request)
    if set(body) != {"env"}:
        raise BadRequest('send {"env": {"PGRST_DB_MAX_ROWS": "1000", "PGRST_OTHER": null}}: values set '
                         'settings, null removes them')
    return await s.projects.change_api_env(await s.projects.get(user, hash_, slug), body["env"])


# How often a followed log asks the docker agent for new lines.
LOG_POLL_S = 1.0


@router.get("/logs")
async def project_logs(request: Request, hash: str, slug: str | None = None, service: str = "api", tail: int = 100,
                       follow: str | None = None, user: User = Depends(current_user),
                       s: Services = Depends(services)):
    """Server-sent events, one per line of the project's api or db container ({"line": ...}, or
    {"error": ...} once when the lines cannot be read); with follow=1, new lines as they come."""
    project = await s.projects.get(user, hash, slug)
    following = query_flag(follow, "follow")
    first = await s.projects.logs(project, service, tail)  # bad input fails here, as a plain 400

    def event(value: dict) -> str:
        return f"data: {json.dumps(value)}\n\n"

    async def events():
        batch = first
        while True:
            for item in batch["lines"]:
                yield event({"line": item["line"], "at": item["at"]})
            if not following or await request.is_disconnected():
                return
            await asyncio.sleep(LOG_POLL_S)
            try:
                batch = await s.projects.logs(project, service, MAX_LOG_LINES, batch["until"])
            except FluxError as exc:
                yield event({"error": exc.message})
                return

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})



@router.get("/projects/{hash_}/metadata")
async def project_metadata(hash_: str, user: User = Depends(current_user), s: Services = Depends(services)):
    return await s.projects.metadata(await s.projects.get(user, hash_))


@router.patch("/projects/{hash_}/metadata")
async def change_project_metadata(hash_: str, request: Request, user: User = Depends(current_user),
                                  s: Services = Depends(services)):
    """Body {"metadata": {key: "value" | null}}: sets each key, or removes it where null."""
    body = await read_json(request)
    if set(body) != {"metadata"}:
        raise BadRequest('send {"metadata": {"key": "value", "other": null}}: values set keys, null removes them')
    return await s.projects.change_metadata(await s.projects.get(user, hash_), body["metadata"])


# Parts of the hosted service's API with no meaning on a self-hosted fleet.
ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE"]
HOSTED_ONLY = "AI summaries and MCP intents are features of the hosted Flux service; a self-hosted fleet has none"


@router.api_route("/ai/{rest:path}", methods=ANY_METHOD, include_in_schema=False)
@router.api_route("/mcp/{rest:path}", methods=ANY_METHOD, include_in_schema=False)
@router.api_route("/projects/{hash_}/ai-summary", methods=["GET", "POST"], include_in_schema=False)
@router.api_route("/projects/{hash_}/ai/{rest:path}", methods=ANY_METHOD, include_in_schema=False)
@router.api_route("/projects/{hash_}/mcp/{rest:path}", methods=ANY_METHOD, include_in_schema=False)
async def hosted_only(request: Request, user: User = Depends(current_user)):
    raise NotImplementedHere(f"{request.method} {request.url.path}: {HOSTED_ONLY}")


@router.post("/projects/{hash_}/lifecycle")
async def project_lifecycle(hash_: str, body: LifecycleRequest, user: User = Depends(current_user),
                            s: Services = Depends(services)):
    return await s.projects.lifecycle(await s.projects.get(user, hash_), body.action)

@router.post("/projects/{hash_}/probe")
async def project_probe(hash_: str, user: User = Depends(current_user), s: Services = Depends(services)):
    return await s.projects.probe(await s.projects.get(user, hash_))

@router.post("/projects/{hash_}/repair")
async def project_repair(hash_: str, user: User = Depends(current_user), s: Services = Depends(services)):
    return await s.projects.repair(await s.projects.get(user, hash_))

@router.delete("/projects/{hash_}")
async def project_delete(hash_: str, slug: str | None = None, force: str | None = None,
                         skipBackupCheck: str | None = None, user: User = Depends(current_user),
                         s: Services = Depends(services)):
    """Deletes the project (mode `catalog`); with force=1 and no project of the user's under the
    hash, an admin removes the Docker objects left behind under it (mode `orphan`)."""
    if not query_flag(skipBackupCheck, "skipBackupCheck"):
        project = await s.catalog.project_by_hash(user.id, check_hash(hash_))
        if project is not None and project.lifecycle == "active":
            await s.backups.gate(await s.projects.get(user, hash_, slug), "delete")
    return await s.projects.nuke(user, hash_, slug, query_flag(force, "force"))

@router.post("/projects/{hash_}/maintenance")
async def project_maintenance(hash_: str, body: MaintenanceRequest, user: User = Depends(current_user),
                              s: Services = Depends(services)):
    return await s.projects.set_maintenance(await s.projects.get(user, hash_), body.enabled)

@router.delete("/projects/{hash_}/staged-stack")
async def discard_staged_stack(hash_: str, slug: str, user: User = Depends(current_user),
                               s: Services = Depends(services)):
    return await s.projects.discard_staged_stack(await s.projects.get(user, hash_, slug))

@router.delete("/projects/{hash_}/pooled-copy")
async def drop_pooled_copy(hash_: str, slug: str, user: User = Depends(current_user), s: Services = Depends(services)):
    return await s.projects.drop_kept_copy(await s.projects.get(user, hash_, slug))

@router.post("/push")
async def push(request: Request, user: User = Depends(current_user), s: Services = Depends(services)):
    body = await read_json(request)
    dry_run = flag(body, "dryRun")
    slug, hash_ = body.get("slug"), body.get("hash")
    if not isinstance(slug, str) or not isinstance(hash_, str):
        raise BadRequest("push needs slug and hash")
    project = await s.projects.get(user, hash_, slug)
    result = await s.projects.push(project, push_files(body), dry_run)
    result["skippedFiles"] = result.pop("skipped")
    result["skipped"] = not result["applied"]
    return result
