"""Migrations: start one (or its dry run), follow it, see it, resume it."""

import asyncio
import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import BadRequest, NotFound
from ..migrate import Options
from ..projects import check_hash
from ..store import User
from .access import ADMIN
from .common import PREFIX, Services, current_user, flag, read_json, services

router = APIRouter(prefix=PREFIX)


@router.post("/migrate")
async def migrate(request: Request, user: User = Depends(current_user), s: Services = Depends(services)):
    body = await read_json(request)
    for key in ("dryRun", "dumpOnly", "staged", "yes", "newJwtSecret", "lockWrites", "noLockWrites",
                "dropSourceAfter", "preserveJwtSecret", "skipBackupCheck", "online"):
        if key in body:
            flag(body, key)
    slug, hash_ = body.get("slug"), body.get("hash")
    if not isinstance(slug, str) or not isinstance(hash_, str):
        raise BadRequest("migrate needs slug and hash")
    check_hash(hash_)
    project = await s.catalog.project_by_hash(user.id, hash_)
    if project is None or project.lifecycle in ("provisioning", "deleting"):
        raise NotFound("Project not found for this API key")
    if slug != project.slug:
        raise BadRequest(f"slug {slug!r} does not own hash {hash_} (that project is {project.slug!r})")
    options = Options.from_request(body)
    if options.dry_run:
        return await s.migrations.dry_run(project, options)
    # The gate is on a migrate that moves the project: a dump-only or staged run leaves it serving where it is.
    if not (options.dump_only or options.staged or body.get("skipBackupCheck", False)):
        try:
            await s.backups.gate(project, "a real migrate")
        except BadRequest as exc:
            return JSONResponse({"ok": False, "phase": "backup", "error": exc.message}, status_code=400)
    return await follow(s, request, await s.migrations.start(project, options))

async def follow(s: Services, request: Request, row):
    """The migration's result, or with Accept: application/x-ndjson its events as they happen."""
    if "application/x-ndjson" not in request.headers.get("accept", ""):
        result = await s.migrations.wait(row.id)
        return JSONResponse(result, status_code=200 if result["ok"] else 400)
    queue = s.migrations.subscribe(row.id)

    async def events():
        try:
            yield json.dumps({"event": "started", "migrationId": row.id, "kind": row.kind}) + "\n"
            while True:
                event = await queue.get()
                yield json.dumps(event) + "\n"
                if event.get("event") == "result":
                    return
        finally:
            s.migrations.unsubscribe(row.id, queue)

    return StreamingResponse(events(), media_type="application/x-ndjson")

@router.get("/migrations/{migration_id}")
async def migration_status(migration_id: str, user: User = Depends(current_user), s: Services = Depends(services)):
    try:
        return await s.migrations.wait_status(migration_id, None if user.cli_role == ADMIN else user.id)
    except ValueError:
        raise BadRequest("invalid migration id") from None

@router.get("/projects/{hash_}/migration")
async def project_latest_migration(hash_: str, user: User = Depends(current_user), s: Services = Depends(services)):
    return await s.migrations.latest(await s.projects.get(user, hash_))

@router.get("/migrations/{migration_id}/events")
async def migration_events(migration_id: str, user: User = Depends(current_user), s: Services = Depends(services)):
    """The migration as it stands, then its events as they happen (NDJSON), ending with its result."""
    try:
        status = await s.migrations.wait_status(migration_id, None if user.cli_role == ADMIN else user.id)
    except ValueError:
        raise BadRequest("invalid migration id") from None
    queue = s.migrations.subscribe(status["migrationId"])

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
                    now = await s.migrations.wait_status(status["migrationId"], None)
                    if now.get("running"):
                        continue
                    event = {"event": "result", **now}
                yield json.dumps(event) + "\n"
                if event.get("event") == "result":
                    return
        finally:
            s.migrations.unsubscribe(status["migrationId"], queue)

    return StreamingResponse(events(), media_type="application/x-ndjson")

@router.post("/migrations/{migration_id}/resume")
async def migration_resume(migration_id: str, request: Request, user: User = Depends(current_user),
                           s: Services = Depends(services)):
    try:
        row = await s.migrations.resume(migration_id, None if user.cli_role == ADMIN else user.id)
    except ValueError:
        raise BadRequest("invalid migration id") from None
    return await follow(s, request, row)


async def _window_project(s: Services, request: Request, user: User, hash_: str):
    body = await read_json(request)
    project = await s.projects.get(user, hash_)
    slug = body.get("slug")
    if slug is not None and slug != project.slug:
        raise BadRequest(f"slug {slug!r} does not own hash {hash_} (that project is {project.slug!r})")
    return project, body


@router.post("/projects/{hash_}/migration/rollback")
async def migration_rollback(hash_: str, request: Request, user: User = Depends(current_user),
                             s: Services = Depends(services)):
    project, _ = await _window_project(s, request, user, hash_)
    return await s.migrations.reversals.rollback(project)


@router.post("/projects/{hash_}/migration/finalize")
async def migration_finalize(hash_: str, request: Request, user: User = Depends(current_user),
                             s: Services = Depends(services)):
    project, body = await _window_project(s, request, user, hash_)
    if "dropSource" in body:
        flag(body, "dropSource")
    return await s.migrations.reversals.finalize(project, bool(body.get("dropSource")))
