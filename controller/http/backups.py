"""Backups: make, list, verify, download and restore them; a project's backup schedule."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..errors import BadRequest
from ..store import User
from .common import PREFIX, Services, current_user, flag, query_flag, read_json, services

router = APIRouter(prefix=PREFIX)


async def _started(chunks):
    """The stream once its first bytes came: a failure before them is an error answer, not a cut stream."""
    first = await anext(chunks, b"")

    async def body():
        if first:
            yield first
        async for data in chunks:
            yield data

    return body()


@router.get("/projects/{hash_}/backups")
async def project_backups(hash_: str, slug: str | None = None, user: User = Depends(current_user),
                          s: Services = Depends(services)):
    """The project's backups, newest first (the contract's backup entries), and its schedule."""
    return await s.backups.listing(await s.projects.get(user, hash_, slug))


@router.post("/projects/{hash_}/backups")
async def create_backup(hash_: str, request: Request, slug: str | None = None, user: User = Depends(current_user),
                        s: Services = Depends(services)):
    """Makes a backup now (body {"verify": true} also restores it into a scratch database)."""
    body = await read_json(request)
    unknown = set(body) - {"verify"}
    if unknown:
        raise BadRequest(f"unknown key(s) {', '.join(sorted(unknown))[:80]}; the body may hold verify (a boolean)")
    project = await s.projects.get(user, hash_, slug)
    backup = await s.backups.create(project, verify=flag(body, "verify"))
    listing = await s.backups.listing(project)
    return {"ok": backup["status"] == "complete", "backup": backup,
            **{k: v for k, v in listing.items() if k == "platformMinimumBackupFreshness"}}


@router.post("/projects/{hash_}/backups/{backup_id}/verify")
async def verify_backup(hash_: str, backup_id: str, slug: str | None = None, user: User = Depends(current_user),
                        s: Services = Depends(services)):
    """Checks the stored file, restores it into a scratch database and compares it with its manifest."""
    backup = await s.backups.verify(await s.projects.get(user, hash_, slug), backup_id)
    return {"ok": backup["restoreVerificationStatus"] == "restore_verified", "backupId": backup["id"],
            "restoreVerificationStatus": backup["restoreVerificationStatus"],
            "artifactValidationStatus": backup["artifactValidationStatus"],
            "error": backup["restoreVerificationError"], "backup": backup}


@router.get("/projects/{hash_}/backups/{backup_id}/download")
async def download_backup(hash_: str, backup_id: str, slug: str | None = None, user: User = Depends(current_user),
                          s: Services = Depends(services)):
    """The backup's pg_dump archive (custom format, for pg_restore), with its size and sha256 in headers."""
    row, archive = await s.backups.download(await s.projects.get(user, hash_, slug), backup_id)
    archive = await _started(archive)
    name = f"{row['slug']}-{row['created_at'].strftime('%Y%m%dT%H%M%SZ')}-{row['id'][:8]}.dump"
    return StreamingResponse(archive, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="{name}"', "Content-Length": str(row["archive_bytes"]),
        "X-Flux-Backup-Id": row["id"], "X-Flux-Sha256": row["archive_sha256"], "Cache-Control": "no-store"})


@router.post("/backups/{backup_id}/restore")
async def restore_backup(backup_id: str, request: Request, user: User = Depends(current_user),
                         s: Services = Depends(services)):
    """Body {} restores into the backup's own project; {"toNewProject": "name"} into a new dedicated one."""
    body = await read_json(request)
    unknown = set(body) - {"toNewProject"}
    if unknown:
        raise BadRequest(f"unknown key(s) {', '.join(sorted(unknown))[:80]}; the body may hold toNewProject")
    name = body.get("toNewProject")
    if name is not None and not isinstance(name, str):
        raise BadRequest("toNewProject must be the new project's name (a string)")
    return await s.backups.restore(user, backup_id, name)


@router.put("/projects/{hash_}/backup-schedule")
async def set_backup_schedule(hash_: str, request: Request, slug: str | None = None,
                              user: User = Depends(current_user), s: Services = Depends(services)):
    """Body {"everySeconds": N, "keepDaily": N, "keepWeekly": N}; {"everySeconds": null} stops it."""
    body = await read_json(request)
    unknown = set(body) - {"everySeconds", "keepDaily", "keepWeekly"}
    if unknown or "everySeconds" not in body:
        raise BadRequest('send {"everySeconds": 86400, "keepDaily": 7, "keepWeekly": 4}, or {"everySeconds": null}')
    values = {}
    for key, default in (("everySeconds", None), ("keepDaily", 7), ("keepWeekly", 4)):
        value = body.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise BadRequest(f"{key} must be a whole number")
        values[key] = value
    project = await s.projects.get(user, hash_, slug)
    return await s.backups.set_schedule(project, values["everySeconds"], values["keepDaily"], values["keepWeekly"])


@router.get("/projects/{hash_}/dump")
async def dump_project(hash_: str, slug: str | None = None, schemaOnly: str | None = None, dataOnly: str | None = None,
                       clean: str | None = None, publicOnly: str | None = None, user: User = Depends(current_user),
                       s: Services = Depends(services)):
    """pg_dump's plain SQL of the project now (its tenant schema; for a dedicated project its whole
    database, or with publicOnly its API schema), streamed as it is made. The last line of a whole
    dump is pg_dump's "dump complete" comment."""
    project = await s.projects.get(user, hash_, slug)
    flags = {"schema_only": query_flag(schemaOnly, "schemaOnly"), "data_only": query_flag(dataOnly, "dataOnly"),
             "clean": query_flag(clean, "clean"), "api_schema_only": query_flag(publicOnly, "publicOnly")}
    chunks = await _started(await s.backups.dump(project, flags))
    return StreamingResponse(chunks, media_type="application/sql", headers={
        "Content-Disposition": f'attachment; filename="{project.slug}-{project.hash}.sql"', "Cache-Control": "no-store"})
