"""`flux migrate`: a pooled project moved to its own dedicated stack, with nothing lost.

A migration is a durable row in the catalog whose `phase` records each finished step;
every step is idempotent. Before the cutover (the catalog flip) any failure rolls back
by itself: write lock released, the pooled copy serving and untouched. After it, the
remaining steps finish forward. A controller that restarts does the same for every
migration it finds running.

Order: lease → preflight → provision → write lock (every gateway acknowledges
maintenance, and a database guard holds writes that bypass the gateway) → dump and
restore in one stream → bootstrap → verify → probe → flip and route switch → unlock
(the source turns read-only) → optional source drop. The stack is provisioned before
the lock, so the lock covers only the data move.
"""

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import asdict, dataclass

from .catalog import Catalog, MigrationRow, Project
from .errors import BadRequest, FluxError, NotFound
from .fleet import Fleet
from .gateways import Gateways, service_url
from .projects import DEDICATED, JWT_SECRET_BYTES, POOLED, STACK_JOB_TIMEOUT_S, Projects

log = logging.getLogger(__name__)

MESSAGES = {
    "full": "Migration complete. Project is now v1_dedicated.",
    "staged": "Staged migration complete (catalog mode unchanged; target DB populated).",
    "dump_only": "Dump complete (catalog mode unchanged; no containers were touched).",
}
ASSUMED_BYTES_PER_S = 40 * 1024 * 1024


def data_timeout(total_bytes: int) -> float:
    """How long a step that moves or reads the tenant's data may take. The db agent stops a dump
    and restore past its own, shorter limit (300 s + 1 s per MiB), so its error is what the step
    reports."""
    return 600 + max(total_bytes, 0) / (512 * 1024)


@dataclass(frozen=True)
class Options:
    to: str = DEDICATED
    dry_run: bool = False
    dump_only: bool = False
    staged: bool = False
    yes: bool = False
    new_jwt_secret: bool = False
    lock_writes: bool = True
    drop_source_after: bool = False

    @classmethod
    def from_request(cls, body: dict) -> "Options":
        """The contract's keys; `lockWrites: false` and `noLockWrites: true` both mean don't lock."""
        lock = bool(body.get("lockWrites", True)) and not bool(body.get("noLockWrites", False))
        return cls(to=str(body.get("to") or DEDICATED), dry_run=bool(body.get("dryRun")),
                   dump_only=bool(body.get("dumpOnly")), staged=bool(body.get("staged")), yes=bool(body.get("yes")),
                   new_jwt_secret=bool(body.get("newJwtSecret")), lock_writes=lock,
                   drop_source_after=bool(body.get("dropSourceAfter")))

    @property
    def kind(self) -> str:
        return "dump_only" if self.dump_only else "staged" if self.staged else "full"


def plan(options: Options) -> list[str]:
    """The steps a migration runs, in order, named as the phases the runner records: the dry
    run shows this list and `flux migrate status` marks it done, current and left."""
    if options.kind == "dump_only":
        return ["preflight", "dump"]
    steps = ["preflight", "provision", *(["lock"] if options.lock_writes else []), "dump", "bootstrap", "verify",
             "probe"]
    if options.kind == "staged":
        return steps + (["unlock"] if options.lock_writes else [])
    return steps + ["flip", "unlock"] + (["drop_source"] if options.drop_source_after else [])


def step_states(row: MigrationRow) -> list[dict]:
    """Each planned step of a migration as done, current, failed or left."""
    steps = plan(Options(**row.options))
    phase = "flip" if row.phase == "flipped" else row.phase
    if row.state == "succeeded" or phase == "done":
        return [{"name": name, "status": "done"} for name in steps]
    at = steps.index(phase) if phase in steps else 0
    if row.phase == "flipped":
        at += 1  # the flip itself committed; what follows has not started
    here = {"running": "current", "failed_after_cutover": "failed", "rolled_back": "failed", "failed": "failed"}
    return [{"name": name, "status": "done" if i < at else here.get(row.state, "current") if i == at else "left"}
            for i, name in enumerate(steps)]


def check(options: Options, project: Project, running: MigrationRow | None) -> None:
    """Every refusal, before anything changes."""
    if options.to != DEDICATED:
        raise BadRequest(f"cannot migrate to {options.to!r}: the only target is v1_dedicated")
    if project.mode != POOLED:
        raise BadRequest(f"{project.slug} is {project.mode}; flux migrate moves v2_shared projects only")
    if options.staged and options.new_jwt_secret:
        raise BadRequest("--staged cannot be combined with --new-jwt-secret: the catalog secret would no "
                         "longer match the new stack")
    if options.staged and options.drop_source_after:
        raise BadRequest("--drop-source-after needs a full migrate; --staged keeps the pooled copy authoritative")
    if options.dump_only and (options.staged or options.new_jwt_secret or options.drop_source_after):
        raise BadRequest("--dump-only only dumps; it cannot be combined with --staged, --new-jwt-secret "
                         "or --drop-source-after")
    if not options.dry_run and not options.yes:
        raise BadRequest("migrate changes the project; pass --yes to go ahead (or --dry-run to see the plan)")
    if running is not None and not options.dry_run:
        raise BadRequest(f"{project.slug} is already migrating (migration {running.id}, phase {running.phase}); "
                         "wait for it to finish")


def preflight_refusals(preflight: dict, db_agent: str, db_host: str) -> list[str]:
    """What in a preflight stops a migration, one clear sentence each: the dry run lists them and a
    run refuses with them, from this one place."""
    refusals = []
    if not preflight["tools"].get("pg_dump"):
        refusals.append(f"pg_dump not found on db agent {db_agent} (host {db_host}): migrate runs pg_dump there, "
                        "against the shared cluster; install the PostgreSQL client binaries on that host")
    refusal = large_object_refusal(preflight)
    if refusal:
        refusals.append(refusal)
    return refusals


def large_object_refusal(preflight: dict) -> str | None:
    """Large objects live outside every schema, so the schema dump would silently leave them behind."""
    found = preflight.get("large_objects") or {}
    count = int(found.get("count") or 0)
    if not count:
        return None
    owners = " or ".join(found.get("owners") or ["the tenant"])
    return (f"{count} large object{'s' if count != 1 else ''} owned by {owners} cannot be migrated: the dump of "
            "the tenant schema does not carry large objects, so they would be lost. Move their contents into "
            "bytea columns (or export them) and remove them with lo_unlink(), then migrate again")


class MigrationFailed(FluxError):
    status = 400

    def __init__(self, phase: str, message: str, state: str = "rolled_back"):
        super().__init__(message)
        self.phase = phase
        self.state = state


# Phases a full migration records once the catalog says v1_dedicated: from there it only goes forward.
AFTER_CUTOVER = ("flipped", "unlock", "drop_source", "done")


def cut_over(row: MigrationRow) -> bool:
    return row.kind == "full" and row.phase in AFTER_CUTOVER


class Migrations:
    def __init__(self, catalog: Catalog, fleet: Fleet, projects: Projects, gateways: Gateways):
        self.catalog = catalog
        self.fleet = fleet
        self.projects = projects
        self.gateways = gateways
        self._listeners: dict[str, list[asyncio.Queue]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._project_of: dict[str, str] = {}
        # Hear every migration's events with the project they concern (the dashboard's live cards).
        self.watchers: list = []

    # events

    def subscribe(self, migration_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners.setdefault(migration_id, []).append(queue)
        return queue

    def unsubscribe(self, migration_id: str, queue: asyncio.Queue) -> None:
        listeners = self._listeners.get(migration_id, [])
        if queue in listeners:
            listeners.remove(queue)

    def _emit(self, migration_id: str, event: dict) -> None:
        for queue in self._listeners.get(migration_id, []):
            queue.put_nowait(event)
        project_id = self._project_of.get(migration_id)
        for watcher in list(self.watchers):
            watcher(project_id, event)

    # plan and preflight

    async def _target_agent(self, project: Project) -> str:
        if project.docker_agent and self.fleet.connected(project.docker_agent):
            return project.docker_agent
        return await self.projects.place("docker", "docker_agent")

    async def dry_run(self, project: Project, options: Options) -> dict:
        check(options, project, await self.catalog.running_migration(project.id))
        preflight = await self.fleet.run(project.db_agent, "tenant.preflight", self.projects.tenant_params(project),
                                         timeout=120)
        db_agent = await self.catalog.get_agent(project.db_agent)
        errors = preflight_refusals(preflight, project.db_agent, db_agent.facts.get("hostname", "?"))
        warnings = []
        try:
            docker_name = await self._target_agent(project)
            docker_agent = await self.catalog.get_agent(docker_name)
            image = await self.fleet.run(docker_name, "stack.image_info", {}, timeout=60)
        except FluxError as exc:
            docker_name, docker_agent, image = None, None, {}
            errors.append(f"no docker host for the dedicated stack: {exc.message}")
        size = preflight["total_bytes"]
        if size * 2 > preflight["spool_free_bytes"]:
            errors.append(f"db agent {project.db_agent} has {preflight['spool_free_bytes']} bytes free for the "
                          f"dump; about {size * 2} are needed")
        if not options.lock_writes:
            warnings.append("--no-lock-writes: writes during the move are not held back; any that land on the "
                            "pooled copy after the dump starts are lost at cutover")
        if options.new_jwt_secret:
            warnings.append("--new-jwt-secret: tokens signed with the current secret stop working at cutover; "
                            "update every client that mints JWTs")
        without_rls = [t["name"] for t in preflight["tables"] if not t["rls"]]
        if without_rls:
            warnings.append("tables without row-level security (" + ", ".join(without_rls) + "): after cutover "
                            "the service-role key reads and writes them in full, as on any dedicated project")
        warnings.append("the runtime role's connection limit and statement timeout on the shared cluster do not "
                        "carry over; the dedicated stack's limits apply")
        extensions = [e for e in preflight["extensions"] if e not in ("plpgsql",)]
        if extensions:
            warnings.append("extensions in use must exist in the dedicated image: " + ", ".join(extensions))
        steps = plan(options)
        estimate = 15 + size / ASSUMED_BYTES_PER_S
        return {
            "ok": not errors,
            "dryRun": True,
            "plan": {"kind": options.kind, "steps": steps, "target": DEDICATED,
                     "docker_host": docker_name, "service_url": service_url(project, self.gateways.base_domain)},
            "preflight": {
                **{k: preflight[k] for k in ("schema", "tables", "views", "sequences", "extensions", "ledger",
                                             "policy_roles", "roles", "total_bytes", "spool_free_bytes")},
                "large_objects": preflight.get("large_objects"),
                "db_host": project.db_agent,
                "tools": {project.db_agent: preflight["tools"],
                          **({docker_name: {"docker": docker_agent.facts.get("tools", {}).get("docker")}}
                             if docker_agent else {})},
                "target_postgres_major": image.get("postgres_major"),
                "target_images": {k: image[k] for k in ("postgres_image", "postgrest_image") if k in image},
                "estimated_seconds": round(estimate, 1),
                "errors": errors,
                "warnings": warnings,
            },
        }

    # run

    async def start(self, project: Project, options: Options) -> MigrationRow:
        check(options, project, await self.catalog.running_migration(project.id))
        sealed = None
        if options.new_jwt_secret:
            sealed = self.projects.box.seal(secrets.token_urlsafe(JWT_SECRET_BYTES).encode(), f"project:{project.id}")
        row = await self.catalog.insert_migration(str(uuid.uuid4()), project.id, options.kind, asdict(options), sealed)
        self._project_of[row.id] = project.id
        self._tasks[row.id] = asyncio.create_task(self._drive(row))
        return row

    async def wait(self, migration_id: str) -> dict:
        task = self._tasks.get(migration_id)
        if task is not None:
            return await asyncio.shield(task)
        row = await self.catalog.migration(migration_id)
        if row is None:
            raise NotFound(f"no migration {migration_id}")
        return self._result(row)

    async def wait_status(self, migration_id: str, owner_id: int | None) -> dict:
        """The migration as it stands, without waiting; only its project's owner (or an admin, with
        `owner_id` None) sees it."""
        row, _ = await self._visible(migration_id, owner_id)
        return self._result(row)

    async def _visible(self, migration_id: str, owner_id: int | None) -> tuple[MigrationRow, Project]:
        """The migration and its project, when `owner_id` owns it (None: an admin, who sees all)."""
        row = await self.catalog.migration(str(uuid.UUID(migration_id)))
        project = await self.catalog.project(row.project_id) if row else None
        if row is None or project is None or (owner_id is not None and project.owner_id != owner_id):
            raise NotFound(f"no migration {migration_id}")
        return row, project

    def _result(self, row: MigrationRow) -> dict:
        shared = {"migrationId": row.id, "state": row.state, "kind": row.kind, "steps": step_states(row),
                  "startedAt": row.started_at.isoformat(),
                  "finishedAt": row.finished_at.isoformat() if row.finished_at else None}
        if row.state == "succeeded":
            return {"ok": True, **shared, **(row.result or {})}
        if row.state == "running":
            return {"ok": True, **shared, "running": True, "phase": row.phase}
        return {"ok": False, **shared, "phase": row.phase, "error": row.error}

    async def latest(self, project: Project) -> dict:
        """The project's newest migration, as `wait_status` shows it."""
        rows = await self.catalog.migrations_of(project.id, limit=1)
        if not rows:
            raise NotFound(f"{project.slug} ({project.hash}) has never been migrated")
        return self._result(rows[0])

    async def resume(self, migration_id: str, owner_id: int | None) -> MigrationRow:
        """Finishes a migration that failed after cutover (the steps left, forward only)."""
        row, project = await self._visible(migration_id, owner_id)
        if row.state != "failed_after_cutover" or not await self.catalog.resume_migration(row.id):
            raise BadRequest(f"migration {row.id} is {row.state}: only a migration that failed after cutover "
                             "can be resumed")
        self._project_of[row.id] = project.id
        self._tasks[row.id] = asyncio.create_task(self._drive(row, self._finish_after_flip))
        return row

    async def _finish_after_flip(self, row: MigrationRow) -> dict:
        """The steps after cutover, from where a stopped controller or a failure left them."""
        project = await self.catalog.project(row.project_id)
        try:
            await self.gateways.sync()
        except FluxError as exc:
            steps = plan(Options(**row.options))
            left = ["route switch", *steps[steps.index("flip") + 1:]]
            message = await self._failed_after_cutover(row, "flipped", f"route switch: {exc.message}", left)
            raise MigrationFailed("flipped", message, state="failed_after_cutover") from None
        return await self._after_flip(row, {"serviceUrl": service_url(project, self.gateways.base_domain),
                                            "resumed": True})

    async def _drive(self, row: MigrationRow, work=None) -> dict:
        try:
            result = await (work or self._run)(row)
            await self.catalog.finish_migration(row.id, "succeeded", None, result)
            final = {"ok": True, "migrationId": row.id, "state": "succeeded", **result}
        except MigrationFailed as exc:
            final = {"ok": False, "migrationId": row.id, "phase": exc.phase, "state": exc.state,
                     "error": exc.message}
        except Exception as exc:  # the migration must end in a recorded state, whatever happened
            log.exception("migration %s failed unexpectedly", row.id)
            current = await self.catalog.migration(row.id) or row
            if cut_over(current):
                state, message = "failed_after_cutover", await self._failed_after_cutover(
                    current, current.phase, f"internal error: {exc}", [current.phase])
            else:
                await self._fail(current, current.phase, f"internal error: {exc}")
                state, message = "rolled_back", f"internal error: {exc}"
            final = {"ok": False, "migrationId": row.id, "phase": current.phase, "state": state, "error": message}
        finally:
            self._tasks.pop(row.id, None)
        self._emit(row.id, {"event": "result", **final})
        self._project_of.pop(row.id, None)
        return final

    async def _phase(self, row: MigrationRow, phase: str) -> None:
        await self.catalog.migration_phase(row.id, phase)
        self._emit(row.id, {"event": "phase", "phase": phase, "at": time.time()})
        log.info("migration %s: %s", row.id, phase)

    def _progress(self, row: MigrationRow):
        def forward(progress: dict) -> None:
            self._emit(row.id, {"event": "progress", **progress})
        return forward

    async def _step(self, row: MigrationRow, phase: str, work):
        """Runs one step before the flip; a failure rolls the migration back and raises."""
        await self._phase(row, phase)
        try:
            return await work()
        except FluxError as exc:
            await self._fail(row, phase, exc.message)
            raise MigrationFailed(phase, f"{phase} failed: {exc.message}") from None

    async def _run(self, row: MigrationRow) -> dict:
        project = await self.catalog.project(row.project_id)
        options = Options(**row.options)
        tenant = self.projects.tenant_params(project)
        preflight = await self._step(row, "preflight", lambda: self.fleet.run(
            project.db_agent, "tenant.preflight", tenant, timeout=120))
        db_agent = await self.catalog.get_agent(project.db_agent)
        refusals = preflight_refusals(preflight, project.db_agent, db_agent.facts.get("hostname", "?"))
        if refusals:
            await self._fail(row, "preflight", "; ".join(refusals))
            raise MigrationFailed("preflight", "; ".join(refusals))
        dump_params = {**tenant, "name": f"{project.slug}-{project.hash}-{row.id[:8]}",
                       "expected_bytes": preflight["total_bytes"], "table_count": len(preflight["tables"])}

        if row.kind == "dump_only":
            dumped = await self._step(row, "dump", lambda: self.fleet.run(
                project.db_agent, "tenant.dump", dump_params, timeout=data_timeout(preflight["total_bytes"]),
                on_progress=self._progress(row)))
            await self._phase(row, "done")
            return {"message": MESSAGES["dump_only"],
                    "dump": {"host": project.db_agent, "path": dumped["path"], "bytes": dumped["bytes"],
                             "sha256": dumped["sha256"]}}

        new_secret = (self.projects.box.open(row.new_jwt_secret_sealed, f"project:{project.id}").decode()
                      if row.new_jwt_secret_sealed else None)

        async def provision():
            if not project.docker_agent:
                # No staged stack: this run makes one, and a rollback removes it again.
                await self.catalog.mark_created_stack(row.id)
            docker_agent = await self._target_agent(project)
            await self.catalog.prepare_dedicated(
                project.id, docker_agent,
                self.projects.seal(project.id, secrets.token_urlsafe(24), "postgres"),
                self.projects.seal(project.id, secrets.token_urlsafe(24), "authenticator"))
            placed = await self.catalog.project(project.id)
            params = self.projects.stack_params(placed, with_secrets=True)
            if new_secret:
                params["jwt_secret"] = new_secret
            out = await self.fleet.run(docker_agent, "stack.provision", params, timeout=STACK_JOB_TIMEOUT_S,
                                       on_progress=self._progress(row))
            await self.catalog.set_stack(project.id, out["api_upstream"], out["api_port"], out["db_host"],
                                         out["db_port"])
            image = await self.fleet.run(docker_agent, "stack.image_info", {}, timeout=60)
            return await self.catalog.project(project.id), image

        project, image = await self._step(row, "provision", provision)
        stack = self.projects.stack_params(project, with_secrets=True)
        if new_secret:
            stack["jwt_secret"] = new_secret
        target_url = self.projects.admin_url(project)

        if options.lock_writes:
            async def lock():
                await self.projects.set_maintenance(project, True)
                return await self.fleet.run(project.db_agent, "tenant.lock", tenant, timeout=60)
            await self._step(row, "lock", lock)
        else:
            log.warning("migration %s runs without a write lock (--no-lock-writes)", row.id)

        dumped = await self._step(row, "dump", lambda: self.fleet.run(
            project.db_agent, "tenant.dump",
            {**dump_params, "target_url": target_url, "target_major": image["postgres_major"],
             "require_guard": options.lock_writes},
            timeout=data_timeout(preflight["total_bytes"]), on_progress=self._progress(row)))
        await self._step(row, "bootstrap", lambda: self.fleet.run(
            project.docker_agent, "stack.bootstrap", stack, timeout=STACK_JOB_TIMEOUT_S))
        verified = await self._step(row, "verify", lambda: self.fleet.run(
            project.db_agent, "tenant.verify", {**tenant, "target_url": target_url},
            timeout=data_timeout(preflight["total_bytes"])))
        await self._step(row, "probe", lambda: self.fleet.run(
            project.docker_agent, "stack.probe", stack, timeout=STACK_JOB_TIMEOUT_S))
        summary = {"dump": {"host": project.db_agent, "path": dumped["path"], "bytes": dumped["bytes"],
                            "sha256": dumped["sha256"], "seconds": dumped["seconds"]},
                   "verified": verified, "dockerHost": project.docker_agent,
                   "serviceUrl": service_url(project, self.gateways.base_domain)}
        if row.kind == "staged":
            if options.lock_writes:
                await self._phase(row, "unlock")
            await self._unlock(row, project, options, after_flip=False)
            await self._phase(row, "done")
            return {"message": MESSAGES["staged"], **summary}

        await self._phase(row, "flip")
        await self.catalog.flip(project.id, row.id, row.new_jwt_secret_sealed)
        try:
            await self.gateways.sync()
        except FluxError as exc:
            await self.catalog.unflip(project.id, project.jwt_secret_sealed)
            await self._fail(row, "flip", exc.message)
            raise MigrationFailed("flip", f"route switch failed, cutover undone: {exc.message}") from None
        return await self._after_flip(row, summary)

    async def _after_flip(self, row: MigrationRow, summary: dict) -> dict:
        """Steps after cutover: they finish forward, never roll back. A failure ends the migration
        as failed_after_cutover, with what is left and the command that finishes it."""
        project = await self.catalog.project(row.project_id)
        options = Options(**row.options)
        steps = [("unlock", lambda: self._unlock(row, project, options, after_flip=True))]
        async def drop_source():
            await self.fleet.run(project.db_agent, "tenant.drop", self.projects.tenant_params(project), timeout=120)
            await self.catalog.set_kept_copy(project.id, None)

        if options.drop_source_after:
            steps.append(("drop_source", drop_source))
        for index, (phase, work) in enumerate(steps):
            await self._phase(row, phase)
            try:
                await work()
            except FluxError as exc:
                message = await self._failed_after_cutover(row, phase, exc.message, [p for p, _ in steps[index:]])
                raise MigrationFailed(phase, message, state="failed_after_cutover") from None
        if options.drop_source_after:
            summary["sourceDropped"] = True
        await self._phase(row, "done")
        return {"message": MESSAGES["full"], **summary}

    async def _failed_after_cutover(self, row: MigrationRow, phase: str, message: str, left: list[str]) -> str:
        text = (f"{phase} failed after cutover: {message}. The project serves from its dedicated stack and the "
                f"pooled copy takes no writes; left to do: {', '.join(left)}. "
                f"Finish with: flux migrate resume {row.id}")
        await self.catalog.finish_migration(row.id, "failed_after_cutover", text, None)
        log.warning("migration %s: %s", row.id, text)
        return text

    async def _unlock(self, row: MigrationRow, project: Project, options: Options, after_flip: bool) -> None:
        if not options.lock_writes and not after_flip:
            return
        current = await self.catalog.project(project.id)
        if current.maintenance:
            await self.projects.set_maintenance(current, False)
        # After cutover the pooled copy must never take another write; it is kept, read-only, until dropped.
        out = await self.fleet.run(project.db_agent, "tenant.unlock",
                                   {**self.projects.tenant_params(project), "revoke_writes": after_flip}, timeout=60)
        if after_flip:
            await self.catalog.set_kept_copy(project.id, out.get("bytes", 0))

    async def _fail(self, row: MigrationRow, phase: str, message: str) -> None:
        """Rolls back a migration that has not flipped: lock released, pooled copy serving."""
        project = await self.catalog.project(row.project_id)
        problems = []
        try:
            await self.fleet.run(project.db_agent, "tenant.unlock", {**self.projects.tenant_params(project),
                                                                    "revoke_writes": False}, timeout=60)
        except FluxError as exc:
            problems.append(f"db guard: {exc.message}")
        current = await self.catalog.project(row.project_id)
        if current.maintenance:
            try:
                await self.projects.set_maintenance(current, False)
            except FluxError as exc:
                problems.append(f"gateway maintenance: {exc.message}")
        row = await self.catalog.migration(row.id) or row
        if row.created_stack and current.docker_agent and current.mode == POOLED:
            # The stack this run made goes with it: nothing is left running for a migration that did not happen.
            try:
                await self.projects.discard_staged_stack(current, during_migration=True)
            except FluxError as exc:
                problems.append(f"stack removal: {exc.message}")
        elif row.new_jwt_secret_sealed and current.docker_agent and current.mode == POOLED:
            # A rotating run may have given a staged stack the new secret: the old one stays in force everywhere.
            try:
                await self.fleet.run(current.docker_agent, "stack.provision",
                                     self.projects.stack_params(current, with_secrets=True),
                                     timeout=STACK_JOB_TIMEOUT_S)
            except FluxError as exc:
                problems.append(f"stack secret: {exc.message}")
        note = f" (rollback incomplete: {'; '.join(problems)})" if problems else ""
        await self.catalog.finish_migration(row.id, "rolled_back", f"{phase}: {message}{note}", None)

    async def recover(self) -> None:
        """Settles migrations a stopped controller left running: finish after the flip, roll back before."""
        for row in await self.catalog.running_migrations():
            try:
                if cut_over(row):
                    result = await self._finish_after_flip(row)
                    await self.catalog.finish_migration(row.id, "succeeded", None, result)
                else:
                    await self._fail(row, row.phase, "the controller stopped during this phase; rolled back")
                log.info("settled migration %s left in phase %s", row.id, row.phase)
            except FluxError as exc:
                log.warning("cannot settle migration %s yet: %s", row.id, exc.message)
