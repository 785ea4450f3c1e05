"""Backups of projects: made next to the data, kept on a backup host, proven by a restore.

- **Create.** The agent next to the data (a pooled tenant's db agent, a dedicated stack's docker
  agent) runs `pg_dump -Fc` of the project's schema with a manifest taken in the same snapshot,
  encrypts it under the project's backup key and sends it through the controller
  (transfers.py) to a backup agent, which writes it to its storage directory. The catalog
  records the file's size and sha256 as both ends saw them, and the manifest.
- **Verify.** The backup host checks the file's size and sha256 against the catalog (the
  artifact check), then sends it to a docker agent that restores it into a scratch container,
  compares the result with the manifest, and removes the container. The backup is
  `restore_verified`, or `failed` with the reason.
- **Restore.** Into its own project under maintenance (the gateway answers 503 meanwhile; a
  pooled tenant's schema is replaced in one transaction), or into a new dedicated project,
  whose database then holds the backup's schema and roles under its own names.
- **The gate.** A real migrate and a project delete need the project's newest backup to be
  restore-verified and newer than its last push (and, when set, younger than a maximum age).

The key is per project: made at its first backup, sealed with the master key and bound to the
project in the catalog, given to the agents that encrypt or decrypt in a job's sealed params,
never to the backup host. A download is decrypted here, as it streams.
"""

import asyncio
import base64
import datetime
import logging
import secrets
import uuid
from typing import AsyncIterator

from contract import names
from formats.sealedfile import DumpFileError, decrypt

from .errors import BadRequest, Conflict, FluxError, NotFound, Timeout, Unavailable
from .fleet import Fleet
from .secretbox import SecretBox
from .store import Catalog, Project, User
from .transfers import CONTROLLER

log = logging.getLogger(__name__)

POOLED, DEDICATED = "v2_shared", "v1_dedicated"
KEY_BYTES = 32
# Backups and restores take as long as their data does; these bound a job that hangs.
MAKE_TIMEOUT_S = 6 * 3600
CHECK_TIMEOUT_S = 600
SCHEDULE_TICK_S = 5.0
SCHEDULES_AT_ONCE = 2
MIN_EVERY_S = 60
REMEDY = "flux backup create --verify"


def key_context(project_id: str) -> str:
    return f"backup-key:{project_id}"


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value else None


def entry(row: dict) -> dict:
    """A backup as the API shows it (the contract's backup entry)."""
    return {
        "id": row["id"], "format": "custom", "status": row["status"], "kind": row["kind"],
        "madeBy": row["made_by"], "sizeBytes": row["bytes"], "checksumSha256": row["sha256"],
        "archiveSizeBytes": row["archive_bytes"], "archiveSha256": row["archive_sha256"],
        "createdAt": _iso(row["created_at"]), "completedAt": _iso(row["completed_at"]),
        "artifactValidationStatus": row["artifact_status"], "artifactValidationAt": _iso(row["artifact_at"]),
        "artifactValidationError": row["artifact_error"],
        "restoreVerificationStatus": row["restore_status"], "restoreVerificationAt": _iso(row["restore_at"]),
        "restoreVerificationError": row["restore_error"],
        "primaryArtifactRelativePath": f"{row['project_id']}/{row['id']}.fluxbackup" if row["path"] else None,
        "backupHost": row["agent"], "sourceHost": row["source_agent"], "error": row["error"],
        "tables": len((row["manifest"] or {}).get("tables", {})) if row["manifest"] else None,
        "rows": sum(t["rows"] for t in row["manifest"]["tables"].values()) if row["manifest"] else None,
    }


def to_remove(rows: list[dict], keep_daily: int, keep_weekly: int) -> list[dict]:
    """The backups retention removes. Of the complete ones it keeps, for each of the last
    `keep_daily` days and `keep_weekly` ISO weeks that have one, the newest restore-verified one of
    that period (or its newest, when none is verified), and always the newest backup and the
    newest restore-verified one (the gate's). Failed backups older than the newest complete one
    go too (a failed one may have left a file)."""
    done = sorted((r for r in rows if r["status"] == "complete"), key=lambda r: r["created_at"], reverse=True)
    keep: set[str] = set()
    for span, count in ((lambda d: d, keep_daily), (lambda d: d.isocalendar()[:2], keep_weekly)):
        periods: dict = {}
        for row in done:
            period = span(row["created_at"].astimezone(datetime.timezone.utc).date())
            if period not in periods and len(periods) >= count:
                continue
            best = periods.get(period)
            if best is None or (best["restore_status"] != "restore_verified"
                                and row["restore_status"] == "restore_verified"):
                periods[period] = row
        keep |= {row["id"] for row in periods.values()}
    if done:
        keep.add(done[0]["id"])
        verified = [r for r in done if r["restore_status"] == "restore_verified"]
        if verified:
            keep.add(verified[0]["id"])
    failed = [r for r in rows if r["status"] == "failed" and done and r["created_at"] < done[0]["created_at"]]
    return [r for r in done if r["id"] not in keep] + failed


class Backups:
    def __init__(self, catalog: Catalog, fleet: Fleet, box: SecretBox, projects, max_age_s: float | None = None):
        self.catalog = catalog
        self.fleet = fleet
        self.box = box
        self.projects = projects
        self.max_age = datetime.timedelta(seconds=max_age_s) if max_age_s else None
        self._locks: dict[str, asyncio.Lock] = {}
        # Schedules running now, by project id; a few at once, so one long backup holds up no other.
        self._scheduled: dict[str, asyncio.Task] = {}
        self._schedule_slots = asyncio.Semaphore(SCHEDULES_AT_ONCE)

    def _lock(self, project_id: str) -> asyncio.Lock:
        return self._locks.setdefault(project_id, asyncio.Lock())

    async def _key(self, project_id: str) -> str:
        sealed = await self.catalog.backup_key(project_id)
        if sealed is None:
            sealed = await self.catalog.insert_backup_key(
                project_id, self.box.seal(secrets.token_bytes(KEY_BYTES), key_context(project_id)))
        return base64.b64encode(self.box.open(sealed, key_context(project_id))).decode()

    async def _backup_agent(self) -> str:
        agents = sorted(a.name for a in await self.catalog.list_agents()
                        if a.revoked_at is None and "backup" in a.roles and self.fleet.connected(a.name))
        if not agents:
            raise Unavailable("no backup agent is connected: enroll one with the backup role "
                              "(flux-agent enroll --roles backup) and give it a backup.dir in its settings.json")
        return agents[0]

    def _source(self, project: Project) -> tuple[str, str, str, dict]:
        if project.mode == POOLED:
            if not project.db_agent or not self.fleet.connected(project.db_agent):
                raise Unavailable(f"db agent {project.db_agent} of {project.slug} is not connected")
            return project.db_agent, "tenant_export", "tenant.backup", self.projects.tenant_params(project)
        if not project.docker_agent or not self.fleet.connected(project.docker_agent):
            raise Unavailable(f"docker agent {project.docker_agent} of {project.slug} is not connected")
        return project.docker_agent, "project_db", "stack.backup", self.projects.stack_params(project, True)

    async def _relay(self, send: tuple[str, str, dict], receive: tuple[str, str, dict],
                     timeout: float) -> tuple[dict, dict]:
        """Runs a sending and a receiving job over one transfer; both succeed or it raises."""
        transfer = self.fleet.transfers.open(send[0], receive[0])

        async def one(agent: str, kind: str, params: dict) -> dict:
            try:
                return await self.fleet.run(agent, kind, {**params, "transfer_id": transfer.id}, timeout=timeout)
            except BaseException as exc:
                transfer.fail(f"{kind} on {agent} failed: {getattr(exc, 'message', None) or exc!r}")
                raise

        try:
            outcomes = await asyncio.gather(one(*send), one(*receive), return_exceptions=True)
        finally:
            self.fleet.transfers.close(transfer)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            # The job that failed first says why; the other one only saw its transfer end.
            first = next((f for f in failures if "transfer" not in str(getattr(f, "message", f))), failures[0])
            raise first
        return outcomes[0], outcomes[1]

    # create

    async def create(self, project: Project, made_by: str = "manual", verify: bool = False) -> dict:
        if project.lifecycle != "active":
            raise Conflict(f"{project.slug} is {project.lifecycle}; only an active project is backed up")
        source, kind, job, params = self._source(project)
        agent = await self._backup_agent()
        key = await self._key(project.id)
        backup_id = str(uuid.uuid4())
        row = await self.catalog.insert_backup(backup_id, project, kind, made_by, source, agent)
        try:
            made, stored = await self._relay(
                (source, job, {**params, "backup_key": key}),
                (agent, "backup.store", {"project_id": project.id, "backup_id": backup_id}), MAKE_TIMEOUT_S)
        except BaseException as exc:
            message = exc.message if isinstance(exc, FluxError) else f"stopped: {type(exc).__name__}"
            await asyncio.shield(self.catalog.update_backup(
                backup_id, status="failed", error=message, completed_at=datetime.datetime.now(datetime.timezone.utc)))
            await asyncio.shield(self.catalog.record_operation(project.id, "backup", "failed", message[:200]))
            raise
        now = datetime.datetime.now(datetime.timezone.utc)
        matches = stored["sha256"] == made["sha256"] and stored["bytes"] == made["bytes"]
        row = await self.catalog.update_backup(
            backup_id, status="complete" if matches else "failed", path=stored["path"], bytes=stored["bytes"],
            sha256=stored["sha256"], archive_bytes=made["archive_bytes"], archive_sha256=made["archive_sha256"],
            manifest=made["manifest"], completed_at=now, artifact_at=now,
            artifact_status="artifact_valid" if matches else "artifact_invalid",
            artifact_error=None if matches else (f"the backup host stored {stored['bytes']} bytes (sha256 "
                                                 f"{stored['sha256']}), {source} sent {made['bytes']} ({made['sha256']})"))
        await self.catalog.record_operation(project.id, "backup", "succeeded" if matches else "failed", backup_id)
        log.info("backup %s of %s (%s): %d bytes on %s", backup_id, project.slug, project.hash, stored["bytes"], agent)
        if verify and matches:
            return await self.verify(project, backup_id)
        return entry(row)

    # list

    async def listing(self, project: Project) -> dict:
        rows = await self.catalog.backups_of(project.id)
        schedule = await self.catalog.backup_schedule(project.id)
        return {"backups": [entry(r) for r in rows],
                **({"platformMinimumBackupFreshness": self.max_age.total_seconds()} if self.max_age else {}),
                "schedule": self._schedule_view(schedule)}

    async def _owned(self, project: Project, backup_id: str) -> dict:
        try:
            backup_id = str(uuid.UUID(backup_id))
        except ValueError:
            raise BadRequest(f"invalid backup id {backup_id[:60]!r}") from None
        row = await self.catalog.backup(backup_id)
        if row is None or row["project_id"] != project.id or row["status"] == "removed":
            raise NotFound(f"no backup {backup_id} of project {project.slug}; see `flux backup list`")
        return row

    async def resolve(self, project: Project, backup_id: str) -> dict:
        """The backup named by id, or by `latest` the newest complete one."""
        if backup_id == "latest":
            done = [r for r in await self.catalog.backups_of(project.id) if r["status"] == "complete"]
            if not done:
                raise NotFound(f"{project.slug} has no complete backup; run `flux backup create`")
            return done[0]
        return await self._owned(project, backup_id)

    # verify

    async def _artifact(self, row: dict) -> str | None:
        """Checks the stored file against the catalog; returns what is wrong, or None."""
        if not self.fleet.connected(row["agent"]):
            raise Unavailable(f"backup agent {row['agent']} is not connected")
        out = await self.fleet.run(row["agent"], "backup.check",
                                   {"project_id": row["project_id"], "backup_ids": [row["id"]]},
                                   timeout=CHECK_TIMEOUT_S)
        seen = out["files"][0]
        if not seen["exists"]:
            return f"the backup file is missing on backup host {row['agent']}"
        if seen["bytes"] != row["bytes"] or seen["sha256"] != row["sha256"]:
            return (f"the backup file on {row['agent']} was altered: it has {seen['bytes']} bytes with sha256 "
                    f"{seen['sha256']}, the catalog recorded {row['bytes']} bytes with sha256 {row['sha256']}")
        return None

    async def _docker_agent(self, preferred: str | None = None) -> str:
        if preferred and self.fleet.connected(preferred):
            return preferred
        agents = sorted(a.name for a in await self.catalog.list_agents()
                        if a.revoked_at is None and "docker" in a.roles and self.fleet.connected(a.name))
        if not agents:
            raise Unavailable("no docker agent is connected to restore the backup into a scratch database")
        return agents[0]

    async def verify(self, project: Project, backup_id: str) -> dict:
        row = await self.resolve(project, backup_id)
        if row["status"] != "complete":
            raise Conflict(f"backup {row['id']} is {row['status']}; only a complete backup is verified")
        async with self._lock(row["id"]):
            now = datetime.datetime.now(datetime.timezone.utc)
            problem = await self._artifact(row)
            if problem:
                row = await self.catalog.update_backup(row["id"], artifact_status="artifact_invalid", artifact_at=now,
                                                       artifact_error=problem, restore_status="failed",
                                                       restore_at=now, restore_error=problem)
                log.warning("backup %s of %s failed its check: %s", row["id"], project.slug, problem)
                return entry(row)
            row = await self.catalog.update_backup(row["id"], artifact_status="artifact_valid", artifact_at=now,
                                                   artifact_error=None)
            docker = await self._docker_agent(project.docker_agent)
            try:
                _, checked = await self._relay(
                    (row["agent"], "backup.send", {"project_id": row["project_id"], "backup_id": row["id"]}),
                    (docker, "scratch.verify", {"backup_id": row["id"], "backup_key": await self._key(row["project_id"]),
                                                "manifest": row["manifest"]}), MAKE_TIMEOUT_S)
                problems = checked["problems"]
            except FluxError as exc:
                problems = [exc.message]
            now = datetime.datetime.now(datetime.timezone.utc)
            row = await self.catalog.update_backup(
                row["id"], restore_status="failed" if problems else "restore_verified", restore_at=now,
                restore_error="; ".join(problems)[:2000] if problems else None)
        await self.catalog.record_operation(project.id, "backup verify", "failed" if problems else "succeeded",
                                            row["id"])
        return entry(row)

    # download

    async def download(self, project: Project, backup_id: str) -> tuple[dict, AsyncIterator[bytes]]:
        """The backup's pg_dump archive, decrypted here as the backup host sends it."""
        row = await self.resolve(project, backup_id)
        if row["status"] != "complete":
            raise Conflict(f"backup {row['id']} is {row['status']}; only a complete backup is downloaded")
        if not self.fleet.connected(row["agent"]):
            raise Unavailable(f"backup agent {row['agent']} is not connected")
        key = base64.b64decode(await self._key(row["project_id"]))
        stored_bytes = self._pull(row["agent"], "backup.send", {"project_id": row["project_id"], "backup_id": row["id"]})

        async def archive() -> AsyncIterator[bytes]:
            queue: asyncio.Queue = asyncio.Queue(maxsize=4)
            loop = asyncio.get_running_loop()
            failure: list[BaseException] = []

            async def stored() -> None:
                try:
                    async for data in stored_bytes:
                        await queue.put(data)
                    await queue.put(None)
                except BaseException as exc:
                    if not isinstance(exc, asyncio.CancelledError):
                        failure.append(exc)
                    # The reading thread waits for the end mark, whatever happened here.
                    while True:
                        try:
                            queue.put_nowait(None)
                            break
                        except asyncio.QueueFull:
                            queue.get_nowait()
                    raise

            pump = asyncio.create_task(stored())
            pending = bytearray()
            ended = False

            def read(size: int) -> bytes:
                nonlocal ended
                while len(pending) < size and not ended:
                    data = asyncio.run_coroutine_threadsafe(queue.get(), loop).result()
                    if data is None:
                        ended = True
                        break
                    pending.extend(data)
                out = bytes(pending[:size])
                del pending[:size]
                return out

            plain = decrypt(read, key)
            try:
                while True:
                    chunk = await asyncio.to_thread(next, plain, None)
                    if chunk is None:
                        break
                    yield chunk
                await pump
            except DumpFileError as exc:
                await asyncio.gather(pump, return_exceptions=True)
                if failure:
                    raise failure[0] from None
                raise Unavailable(f"backup {row['id']} does not decrypt: {exc.message}") from None
            finally:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
                await stored_bytes.aclose()

        return row, archive()

    def _pull(self, agent: str, kind: str, params: dict) -> AsyncIterator[bytes]:
        """Runs a job that sends its bytes to this controller; yields them as they come."""
        transfer = self.fleet.transfers.open(agent, CONTROLLER)
        job = asyncio.create_task(self.fleet.run(agent, kind, {**params, "transfer_id": transfer.id},
                                                 timeout=MAKE_TIMEOUT_S))
        job.add_done_callback(lambda t: t.cancelled() or t.exception() is None or transfer.fail(
            f"{kind} on {agent} failed: {getattr(t.exception(), 'message', t.exception())}"))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for data in transfer.chunks():
                    yield data
                await job
            finally:
                self.fleet.transfers.close(transfer)
                if not job.done():
                    job.cancel()

        return chunks()

    # a plain dump

    async def dump(self, project: Project, flags: dict) -> AsyncIterator[bytes]:
        """pg_dump's plain SQL of the project as it is now, streamed from the agent next to its data."""
        if flags["schema_only"] and flags["data_only"]:
            raise BadRequest("schemaOnly and dataOnly exclude each other")
        if project.lifecycle != "active":
            raise Conflict(f"{project.slug} is {project.lifecycle}; only an active project is dumped")
        source, _, job, params = self._source(project)
        kind = "tenant.dump_stream" if job == "tenant.backup" else "stack.dump_stream"
        return self._pull(source, kind, {**params, "flags": flags})

    # restore

    async def restore(self, user: User, backup_id: str, to_new_project: str | None = None) -> dict:
        try:
            backup_id = str(uuid.UUID(backup_id))
        except ValueError:
            raise BadRequest(f"invalid backup id {backup_id[:60]!r}") from None
        row = await self.catalog.backup(backup_id)
        if row is None or row["owner_id"] != user.id or row["status"] != "complete":
            raise NotFound(f"no complete backup {backup_id} of yours; see `flux backup list`")
        if row["restore_status"] != "restore_verified":
            raise Conflict(f"backup {backup_id} is not restore-verified ({row['restore_status'] or 'never verified'});"
                           f" run `flux backup verify {backup_id}` first")
        problem = await self._artifact(row)
        if problem:
            await self.catalog.update_backup(row["id"], artifact_status="artifact_invalid", artifact_error=problem,
                                             artifact_at=datetime.datetime.now(datetime.timezone.utc))
            raise Conflict(f"backup {backup_id} cannot be restored: {problem}")
        if to_new_project is not None:
            return await self._restore_new(user, row, to_new_project)
        project = await self.catalog.project(row["project_id"])
        if project is None or project.lifecycle != "active":
            raise NotFound(f"the project of backup {backup_id} ({row['slug']}) is gone; restore it with "
                           "--to-new-project NAME")
        return await self._restore_own(project, row)

    async def _restore_job(self, project: Project, row: dict, renames: dict | None = None) -> dict:
        key = await self._key(row["project_id"])
        if project.mode == POOLED:
            target = (project.db_agent, "tenant.restore", {**self.projects.tenant_params(project), "backup_key": key,
                                                           "manifest": row["manifest"]})
        else:
            target = (project.docker_agent, "stack.restore",
                      {**self.projects.stack_params(project, True), "backup_key": key, "manifest": row["manifest"],
                       "renames": renames or {}})
        _, restored = await self._relay(
            (row["agent"], "backup.send", {"project_id": row["project_id"], "backup_id": row["id"]}),
            target, MAKE_TIMEOUT_S)
        if project.mode == DEDICATED:
            await self.fleet.run(project.docker_agent, "stack.bootstrap", self.projects.stack_params(project, True),
                                 timeout=CHECK_TIMEOUT_S)
        return restored

    async def _restore_own(self, project: Project, row: dict) -> dict:
        if row["kind"] != ("tenant_export" if project.mode == POOLED else "project_db"):
            raise Conflict(f"backup {row['id']} was made while {project.slug} was on the other engine; restore it "
                           "with --to-new-project NAME")
        await self.projects.not_migrating(project)
        async with self._lock(project.id):
            was = project.maintenance
            await self.projects.set_maintenance(project, True)
            try:
                restored = await self._restore_job(project, row)
            except Timeout as exc:
                # The agent did not answer: its transaction may still commit. Writes stay held.
                await self.catalog.record_operation(project.id, "restore", "failed", exc.message[:200])
                raise Timeout(f"{exc.message}; {project.slug} stays in maintenance (writes get 503) until its data "
                              "is checked: `flux backup restore` again, or lift it with POST "
                              f"projects/{project.hash}/maintenance") from None
            except FluxError as exc:
                # The restore is one transaction that did not commit: the project is as it was.
                await self.catalog.record_operation(project.id, "restore", "failed", exc.message[:200])
                if not was:
                    await self.projects.set_maintenance(await self.catalog.project(project.id), False)
                raise
            if not was and not restored["problems"]:
                await self.projects.set_maintenance(await self.catalog.project(project.id), False)
        outcome = "failed" if restored["problems"] else "succeeded"
        await self.catalog.record_operation(project.id, "restore", outcome, row["id"])
        return {"ok": not restored["problems"], "backupId": row["id"], "project": project.slug, "hash": project.hash,
                "tables": restored["tables"], "rows": restored["rows"], "problems": restored["problems"],
                **({"maintenance": "kept on: the restored data differs from the backup's manifest"}
                   if restored["problems"] and not was else {})}

    async def _restore_new(self, user: User, row: dict, name: str) -> dict:
        source_schema = row["manifest"]["schema"]
        project, _ = await self.projects.create(user, name, DEDICATED, tenant_names=source_schema != "api")
        renames = {}
        if source_schema != "api":
            old, new = row["manifest"]["schema"], project.api_schema
            old_short = old.removeprefix("t_").removesuffix("_api")
            renames = {old: new, names.owner_role(old_short): names.owner_role(project.short_id),
                       names.runtime_role(old_short): names.runtime_role(project.short_id)}
        try:
            restored = await self._restore_job(project, row, renames)
        except FluxError as exc:
            log.warning("restore of backup %s into new project %s failed, removing it: %s", row["id"], project.slug,
                        exc.message)
            try:
                await self.projects.delete(project)
            except FluxError as undo:
                log.error("new project %s (%s) could not be removed: %s", project.slug, project.hash, undo.message)
            raise
        await self.catalog.record_operation(project.id, "restore", "failed" if restored["problems"] else "succeeded",
                                            f"from backup {row['id']} of {row['slug']}")
        return {"ok": not restored["problems"], "backupId": row["id"], "project": project.slug, "hash": project.hash,
                "mode": project.mode, "created": True, "tables": restored["tables"], "rows": restored["rows"],
                "problems": restored["problems"]}

    # the gate

    async def gate(self, project: Project, action: str) -> None:
        """Raises unless the newest complete backup is restore-verified and new enough for `action`."""
        done = [r for r in await self.catalog.backups_of(project.id) if r["status"] == "complete"]
        where = f"-p {project.slug} --hash {project.hash}"
        remedy = f"run `{REMEDY} {where}` (or `flux backup verify latest {where}`), or pass --skip-backup-check"
        if not done:
            raise BadRequest(f"{action} of {project.slug} needs a restore-verified backup and it has none: {remedy}")
        newest = done[0]
        if newest["restore_status"] != "restore_verified" or newest["artifact_status"] != "artifact_valid":
            raise BadRequest(f"{action} of {project.slug} needs a restore-verified backup: its newest, {newest['id']},"
                             f" is {newest['restore_status'] or 'not verified'}: {remedy}")
        pushed = await self.catalog.last_push_at(project.id)
        if pushed is not None and newest["created_at"] < pushed:
            raise BadRequest(f"{action} of {project.slug} needs a backup newer than its last push "
                             f"({pushed.isoformat()}); its newest is from {newest['created_at'].isoformat()}: {remedy}")
        if self.max_age is not None:
            age = datetime.datetime.now(datetime.timezone.utc) - newest["created_at"]
            if age > self.max_age:
                raise BadRequest(f"{action} of {project.slug} needs a backup younger than "
                                 f"{self.max_age.total_seconds():.0f}s; its newest is {age.total_seconds():.0f}s old:"
                                 f" {remedy}")

    # schedules and retention

    @staticmethod
    def _schedule_view(row: dict | None) -> dict | None:
        if row is None:
            return None
        return {"everySeconds": row["every_seconds"], "keepDaily": row["keep_daily"], "keepWeekly": row["keep_weekly"],
                "nextAt": _iso(row["next_at"]), "lastError": row["last_error"]}

    async def set_schedule(self, project: Project, every_s: int | None, keep_daily: int, keep_weekly: int) -> dict:
        if every_s is None:
            removed = await self.catalog.remove_backup_schedule(project.id)
            return {"ok": True, "schedule": None, "removed": removed}
        if every_s < MIN_EVERY_S:
            raise BadRequest(f"a backup schedule runs at most every {MIN_EVERY_S}s; got {every_s}s")
        if keep_daily < 0 or keep_weekly < 0 or keep_daily + keep_weekly == 0:
            raise BadRequest("retention keeps at least one backup: --keep-daily and --keep-weekly are 0 or more, "
                             "not both 0")
        next_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=every_s)
        row = await self.catalog.set_backup_schedule(project.id, every_s, keep_daily, keep_weekly, next_at)
        return {"ok": True, "schedule": self._schedule_view(row)}

    async def prune(self, project_id: str, keep_daily: int, keep_weekly: int) -> list[str]:
        """Removes the backups retention does not keep, from their host and then from the list."""
        rows = await self.catalog.backups_of(project_id)
        removed = []
        for row in to_remove(rows, keep_daily, keep_weekly):
            if not self.fleet.connected(row["agent"]):
                continue  # its host is away: removed by a later run
            await self.fleet.run(row["agent"], "backup.remove", {"project_id": project_id, "backup_ids": [row["id"]]},
                                 timeout=CHECK_TIMEOUT_S)
            await self.catalog.update_backup(row["id"], status="removed", removed_why="retention",
                                             removed_at=datetime.datetime.now(datetime.timezone.utc))
            removed.append(row["id"])
        return removed

    async def run_due(self) -> int:
        """Starts every due schedule that is not running yet, at most SCHEDULES_AT_ONCE at a time."""
        started = 0
        for schedule in await self.catalog.due_backup_schedules():
            project_id = str(schedule["project_id"])
            if project_id in self._scheduled:
                continue
            task = asyncio.create_task(self._run_schedule(schedule))
            self._scheduled[project_id] = task
            task.add_done_callback(lambda _t, key=project_id: self._scheduled.pop(key, None))
            started += 1
        return started

    async def _run_schedule(self, schedule: dict) -> None:
        project_id = str(schedule["project_id"])
        error = None
        async with self._schedule_slots:
            project = await self.catalog.project(project_id)
            try:
                if project is not None and project.lifecycle == "active":
                    await self.create(project, "schedule", verify=True)
                    await self.prune(project.id, schedule["keep_daily"], schedule["keep_weekly"])
            except Exception as exc:  # noqa: BLE001 - said in the schedule and the log; the next run tries again
                error = exc.message if isinstance(exc, FluxError) else f"{type(exc).__name__}: {exc}"
                log.warning("scheduled backup of %s failed: %s", project.slug if project else project_id, error)
            finally:
                next_at = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(
                    seconds=schedule["every_seconds"])
                await asyncio.shield(self.catalog.schedule_ran(project_id, next_at, error))

    async def keep_schedules(self) -> None:
        try:
            while True:
                try:
                    await self.run_due()
                except Exception:  # the next tick tries again
                    log.exception("backup schedules failed")
                await asyncio.sleep(SCHEDULE_TICK_S)
        finally:
            for task in list(self._scheduled.values()):
                task.cancel()
