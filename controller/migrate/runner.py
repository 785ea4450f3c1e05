"""`flux migrate`: a pooled project moved to its own dedicated stack, with nothing lost.

The runner executes a migration's plan (plan.py) durably: the catalog records each step as
it starts and ends, with its output. Before the cutover (the catalog flip) a failure undoes
the steps that ran, in reverse: write lock released, the pooled copy serving and untouched,
nothing left running (`rolled_back`). After it, the steps only go forward; a failure there
ends `failed_after_cutover`, with what is left and the command that finishes it. A controller
that restarts does the same for every migration it finds running: undo before cutover,
finish after it. There are never two writable copies.
"""

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import asdict, replace

import observe

from .. import metrics
from ..store import Catalog, MigrationRow, Project, StepRow
from ..errors import BadRequest, FluxError, NotFound
from ..fleet import Fleet
from ..gateways import Gateways, service_url
from ..projects import DEDICATED, JWT_SECRET_BYTES, Projects
from . import plan as plans
from .reverse import Reversals
from .plan import (ASSUMED_BYTES_PER_S, Options, Run, check, cut_over, online_obstacles, preflight_refusals,
                   target_agent)

log = logging.getLogger(__name__)

# How long a migration that could not be settled at start waits before the next try.
RECOVERY_RETRY_S = 10
# How long settling waits for the migration's agents to connect (after a controller's restart or a
# new leader, they reconnect within seconds).
RECOVERY_AGENTS_WAIT_S = 20


def step_states(row: MigrationRow, recorded: list[StepRow]) -> list[dict]:
    """Each planned step of a migration as done, current, failed, undone or left."""
    plan = plans.build(Options(**row.options))
    steps = plan.names
    if not recorded:
        return _states_from_phase(row, plan)
    by_name = {r.step: r for r in recorded}
    shown = {"done": "done", "failed": "failed", "undone": "undone", "undo_failed": "failed"}
    states = []
    for name in steps:
        found = by_name.get(name)
        if found is None:
            status = "left"
        elif found.state == "running":
            status = "current" if row.state == "running" else "failed"
        else:
            status = shown[found.state]
        states.append({"name": name, "status": status, **({"error": found.error} if found and found.error else {})})
    return states


def _done_by_phase(row: MigrationRow, plan: plans.Plan) -> set[str]:
    """Steps a migration recorded before steps had rows of their own finished: those before its phase
    (the flip too, once it committed). Empty for a migration whose steps have rows."""
    names = plan.names
    if row.phase == "done":
        return set(names)
    phase = "flip" if row.phase == "flipped" else row.phase
    if phase not in names:
        return set()
    at = names.index(phase) + (1 if row.phase == "flipped" else 0)
    return set(names[:at])


def _states_from_phase(row: MigrationRow, plan: plans.Plan) -> list[dict]:
    """Steps of a migration recorded before steps had rows of their own: known by its phase only.
    The first step not done is the one it was in."""
    done = set(plan.names) if row.state == "succeeded" else _done_by_phase(row, plan)
    at = next((i for i, name in enumerate(plan.names) if name not in done), len(plan.names))
    here = "current" if row.state == "running" else "failed"
    return [{"name": name, "status": "done" if i < at else here if i == at else "left"}
            for i, name in enumerate(plan.names)]


class MigrationFailed(FluxError):
    status = 400

    def __init__(self, phase: str, message: str, state: str = "rolled_back"):
        super().__init__(message)
        self.phase = phase
        self.state = state


class Migrations:
    def __init__(self, catalog: Catalog, fleet: Fleet, projects: Projects, gateways: Gateways):
        self.catalog = catalog
        self.fleet = fleet
        self.projects = projects
        self.gateways = gateways
        self._listeners: dict[str, list[asyncio.Queue]] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._project_of: dict[str, str] = {}
        # The last lag each syncing migration reported (flux migrate status shows it).
        self._lag: dict[str, dict] = {}
        # Hear every migration's events with the project they concern (the dashboard's live cards).
        self.watchers: list = []
        self.reversals = Reversals(catalog, fleet, projects, gateways)

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

    @staticmethod
    def resolve(options: Options, preflight: dict) -> Options:
        """Online unless asked otherwise or the cluster or the tenant cannot be synced."""
        if options.online is not None or options.dump_only or not options.lock_writes:
            return replace(options, online=bool(options.online))
        return replace(options, online=not online_obstacles(preflight))

    async def dry_run(self, project: Project, options: Options) -> dict:
        check(options, project, await self.catalog.running_migration(project.id))
        preflight = await self.fleet.run(project.db_agent, "tenant.preflight", self.projects.tenant_params(project),
                                         timeout=120)
        db_agent = await self.catalog.get_agent(project.db_agent)
        errors = preflight_refusals(preflight, project.db_agent, db_agent.facts.get("hostname", "?"))
        warnings = []
        try:
            docker_name = await target_agent(self.fleet, self.projects, project)
            docker_agent = await self.catalog.get_agent(docker_name)
            image = await self.fleet.run(docker_name, "stack.image_info", {}, timeout=60)
        except FluxError as exc:
            docker_name, docker_agent, image = None, None, {}
            errors.append(f"no docker host for the dedicated stack: {exc.message}")
        size = preflight["total_bytes"]
        if size * 2 > preflight["spool_free_bytes"]:
            errors.append(f"db agent {project.db_agent} has {preflight['spool_free_bytes']} bytes free for the "
                          f"dump; about {size * 2} are needed")
        obstacles = online_obstacles(preflight)
        options = self.resolve(options, preflight)
        if options.online and obstacles:
            errors += [f"cannot sync online: {problem}" for problem in obstacles]
        elif options.online:
            logical = preflight["logical"]
            warnings.append("online: the stack is filled from a replication slot's snapshot and kept in sync; "
                            "writes pause only for the cutover (about a second), and pushes are refused until "
                            "the migration ends")
            if logical["max_slot_wal_keep_mb"] < 0:
                warnings.append("max_slot_wal_keep_size is unlimited on the shared cluster: the sync's lag guard "
                                f"({plans.MAX_LAG_BYTES} bytes) is the only bound on the WAL its slot keeps")
            if preflight["sequences"]:
                warnings.append("sequences are not replicated: they are set on the stack inside the pause")
        elif options.kind != "dump_only" and options.lock_writes:
            warnings.append("writes are held for the whole copy (the fallback without logical replication): "
                            + "; ".join(obstacles) if obstacles else "writes are held for the whole copy (--offline)")
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
        steps = plans.build(options)
        estimate = 15 + size / ASSUMED_BYTES_PER_S
        return {
            "ok": not errors,
            "dryRun": True,
            "plan": {"kind": options.kind, "online": options.online, "steps": steps.names, "detail": steps.render(), "target": DEDICATED,
                     "docker_host": docker_name, "service_url": service_url(project, self.gateways.base_domain)},
            "preflight": {
                **{k: preflight[k] for k in ("schema", "tables", "views", "sequences", "extensions", "ledger",
                                             "policy_roles", "roles", "total_bytes", "spool_free_bytes")},
                "logicalReplication": preflight.get("logical"),
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
        if options.online is None and options.kind != "dump_only" and options.lock_writes:
            found = await self.fleet.run(project.db_agent, "tenant.preflight", self.projects.tenant_params(project),
                                         timeout=120)
            options = self.resolve(options, found)
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
        return await self._result(row)

    async def wait_status(self, migration_id: str, owner_id: int | None) -> dict:
        """The migration as it stands, without waiting; only its project's owner (or an admin, with
        `owner_id` None) sees it."""
        row, _ = await self._visible(migration_id, owner_id)
        return await self._result(row)

    async def _visible(self, migration_id: str, owner_id: int | None) -> tuple[MigrationRow, Project]:
        """The migration and its project, when `owner_id` owns it (None: an admin, who sees all)."""
        row = await self.catalog.migration(str(uuid.UUID(migration_id)))
        project = await self.catalog.project(row.project_id) if row else None
        if row is None or project is None or (owner_id is not None and project.owner_id != owner_id):
            raise NotFound(f"no migration {migration_id}")
        return row, project

    async def _result(self, row: MigrationRow) -> dict:
        recorded = await self.catalog.migration_steps(row.id)
        shared = {"migrationId": row.id, "state": row.state, "kind": row.kind,
                  "steps": step_states(row, recorded), "startedAt": row.started_at.isoformat(),
                  "finishedAt": row.finished_at.isoformat() if row.finished_at else None}
        if row.state == "succeeded":
            return {"ok": True, **shared, **(row.result or {})}
        if row.state == "running":
            lag = self._lag.get(row.id)
            return {"ok": True, **shared, "running": True, "phase": row.phase, **({"sync": lag} if lag else {})}
        return {"ok": False, **shared, "phase": row.phase, "error": row.error}

    async def latest(self, project: Project) -> dict:
        """The project's newest migration, as `wait_status` shows it."""
        rows = await self.catalog.migrations_of(project.id, limit=1)
        if not rows:
            raise NotFound(f"{project.slug} ({project.hash}) has never been migrated")
        return await self._result(rows[0])

    async def resume(self, migration_id: str, owner_id: int | None) -> MigrationRow:
        """Finishes a migration that failed after cutover (the steps left, forward only)."""
        row, project = await self._visible(migration_id, owner_id)
        if row.state != "failed_after_cutover" or not await self.catalog.resume_migration(row.id):
            raise BadRequest(f"migration {row.id} is {row.state}: only a migration that failed after cutover "
                             "can be resumed")
        self._project_of[row.id] = project.id
        self._tasks[row.id] = asyncio.create_task(self._drive(row))
        return row

    async def _drive(self, row: MigrationRow) -> dict:
        """Runs the plan to one of its end states, records it and tells the listeners."""
        observe.MIGRATION_ID.set(row.id)  # this task's log lines carry it
        try:
            result = await self._execute(row)
            await self.catalog.finish_migration(row.id, "succeeded", None, result)
            final = {"ok": True, "migrationId": row.id, "state": "succeeded", **result}
            if (result.get("confirmed") or {}).get("problems"):
                final = await self._move_back(row, result)
        except MigrationFailed as exc:
            final = {"ok": False, "migrationId": row.id, "phase": exc.phase, "state": exc.state,
                     "error": exc.message}
        except Exception as exc:  # the migration must end in a recorded state, whatever happened
            log.exception("migration %s failed unexpectedly", row.id)
            current = await self.catalog.migration(row.id) or row
            try:
                state, message = await self._settle_failure(current, current.phase, f"internal error: {exc}")
            except Exception:
                # Not even the end state could be recorded (the catalog is down?): the migration stays
                # running in the catalog, and the next controller start settles it.
                log.exception("migration %s: cannot record its end; it is settled when the controller "
                              "starts again", row.id)
                state, message = "running", f"internal error: {exc}; settled when the controller starts again"
            final = {"ok": False, "migrationId": row.id, "phase": current.phase, "state": state, "error": message}
        finally:
            self._tasks.pop(row.id, None)
            self._lag.pop(row.id, None)
            for gauge in (metrics.REPLICATION_LAG_BYTES, metrics.REPLICATION_LAG_SECONDS):
                try:
                    gauge.remove(row.project_id)
                except KeyError:
                    pass
        metrics.MIGRATIONS.labels(final["state"]).inc()
        self._emit(row.id, {"event": "result", **final})
        self._project_of.pop(row.id, None)
        return final

    async def _move_back(self, row: MigrationRow, result: dict) -> dict:
        """The check after an online cutover found the stack and the kept pooled copy differ: the
        project goes back to v2_shared at once, with the rollback's short pause; the pooled copy has
        every write acknowledged before the flip and, by the way back, every one since."""
        found = "; ".join(result["confirmed"]["problems"])
        differ = f"the stack and the pooled copy differ after the cutover (at LSN {result['confirmed']['lsn']}: {found})"
        project = await self.catalog.project(row.project_id)
        self._emit(row.id, {"event": "phase", "phase": "move_back", "at": time.time()})
        log.error("migration %s: %s; moving the project back to v2_shared", row.id, differ)
        try:
            moved = await self.reversals.rollback(project)
        except Exception as exc:  # the window sweep tries again every SWEEP_S, after a restart too
            why = exc.message if isinstance(exc, FluxError) else f"internal error: {exc}"
            if not isinstance(exc, FluxError):
                log.exception("migration %s: moving back failed", row.id)
            text = (f"confirm: {differ}. Moving it back failed: {why}. The project serves from its stack and the "
                    "pooled copy follows it; the controller tries again every 30 s (or run flux migrate rollback "
                    f"-p {project.slug} --hash {project.hash})")
            log.error("migration %s: %s", row.id, text)
            return {"ok": False, "migrationId": row.id, "phase": "confirm", "state": "succeeded", "error": text}
        text = (f"confirm: {differ}; moved back to v2_shared with every write (pause {moved['pauseSeconds']} s); "
                "the stack is kept for inspection (flux migrate discard removes it)")
        await self.catalog.finish_migration(row.id, "rolled_back", text,
                                            (await self.catalog.migration(row.id)).result)
        return {"ok": False, "migrationId": row.id, "phase": "confirm", "state": "rolled_back", "error": text}

    def _run_of(self, row: MigrationRow) -> Run:
        def forward(progress: dict) -> None:
            if "lag_bytes" in progress:
                self._lag[row.id] = {"lagBytes": progress["lag_bytes"], "lagSeconds": progress["lag_s"],
                                     "transactions": progress["done"], "at": time.time()}
                metrics.REPLICATION_LAG_BYTES.labels(row.project_id).set(progress["lag_bytes"])
                metrics.REPLICATION_LAG_SECONDS.labels(row.project_id).set(progress["lag_s"])
            self._emit(row.id, {"event": "progress", **progress})

        return Run(row, Options(**row.options), self.catalog, self.fleet, self.projects, self.gateways, forward)

    async def _execute(self, row: MigrationRow) -> dict:
        """Runs the plan's steps from the first one not done; a failure settles the migration
        (rolled back, or failed after cutover) and raises MigrationFailed."""
        run = self._run_of(row)
        plan = plans.build(run.options)
        resumed = cut_over(row)
        recorded = {r.step: r for r in await self.catalog.migration_steps(row.id)}
        for name, found in recorded.items():
            if found.state == "done" and found.output is not None:
                run.outputs[name] = found.output
        done = ({name for name, found in recorded.items() if found.state == "done"} if recorded
                else _done_by_phase(row, plan))
        if "dump" in done and "copy" in plan.names:
            # Recorded by an older plan, whose dump step copied and kept the file at once.
            done |= {"copy", "keep"}
        paused_at = None  # when this run paused writes (lock), for the pause's length at unlock
        for position, step in enumerate(plan.steps):
            if step.name in done:
                continue
            current = await self.catalog.migration(row.id)
            if cut_over(current) and not (step.cutover or plan.after_cutover(step.name)):
                # Once the flip has committed, nothing before it may run again: a dump now would
                # overwrite the dedicated database, which takes the project's writes.
                raise RuntimeError(f"step {step.name} comes before the cutover of a migration that has cut over")
            if not (step.cutover and current.phase == "flipped"):
                await self.catalog.migration_phase(row.id, step.name)
            await self.catalog.step_started(row.id, step.name, position)
            self._emit(row.id, {"event": "phase", "phase": step.name, "at": time.time()})
            log.info("migration %s: %s", row.id, step.name)
            started = time.monotonic()
            if step.name == "lock":
                paused_at = started
            try:
                output = await step.action(run) or {}
            except FluxError as exc:
                await self.catalog.step_finished(row.id, step.name, "failed", error=exc.message)
                state, message = await self._settle_failure(row, step.name, exc.message)
                raise MigrationFailed(step.name, message, state) from None
            metrics.MIGRATION_STEP_SECONDS.labels(step.name).observe(time.monotonic() - started)
            if step.name == "unlock" and paused_at is not None:
                metrics.MIGRATION_PAUSE_SECONDS.observe(time.monotonic() - paused_at)
            run.outputs[step.name] = output
            await self.catalog.step_finished(row.id, step.name, "done", output=output)
        await self.catalog.migration_phase(row.id, "done")
        self._emit(row.id, {"event": "phase", "phase": "done", "at": time.time()})
        result = plans.summary(run, await run.project(), self.gateways.base_domain)
        return {**result, **({"resumed": True} if resumed else {})}

    async def _settle_failure(self, row: MigrationRow, step: str, message: str) -> tuple[str, str]:
        """Ends a migration whose step failed: forward-only after cutover, undone before it.
        Returns the end state and its message."""
        current = await self.catalog.migration(row.id) or row
        plan = plans.build(Options(**current.options))
        if cut_over(current):
            at = plan.names.index(step) if step in plan.names else plan.names.index("flip")
            text = (f"{step} failed after cutover: {message}. The project serves from its dedicated stack and the "
                    f"pooled copy takes no writes; left to do: {', '.join(plan.names[at:])}. "
                    f"Finish with: flux migrate resume {row.id}")
            await self.catalog.finish_migration(row.id, "failed_after_cutover", text, None)
            log.warning("migration %s: %s", row.id, text)
            return "failed_after_cutover", text
        note = await self._undo(current)
        await self.catalog.finish_migration(row.id, "rolled_back", f"{step}: {message}{note}", None)
        return "rolled_back", f"{step} failed: {message}{note}"

    async def _undo(self, row: MigrationRow) -> str:
        """Undoes, in reverse, every step that ran (or started); returns a note of what could not be undone."""
        run = self._run_of(row)
        plan = plans.build(run.options)
        recorded = {r.step: r for r in await self.catalog.migration_steps(row.id)}
        if recorded:
            touched = {name for name, r in recorded.items() if r.state != "undone"}
        else:
            # Recorded before steps had rows: every step up to the phase may have run.
            phase = "flip" if row.phase == "flipped" else row.phase
            touched = set(plan.names[:plan.names.index(phase) + 1] if phase in plan.names else plan.names)
        problems = []
        for step in reversed(plan.steps):
            if step.name not in touched or step.undo is None:
                continue
            try:
                await step.undo(run)
            except Exception as exc:  # every undo is tried, whatever the one before it raised
                message = exc.message if isinstance(exc, FluxError) else f"internal error: {exc}"
                if not isinstance(exc, FluxError):
                    log.exception("migration %s: undoing %s failed", row.id, step.name)
                problems.append(f"{step.name}: {message}")
                if step.name in recorded:
                    await self.catalog.step_finished(row.id, step.name, "undo_failed", error=message)
                continue
            if step.name in recorded:
                await self.catalog.step_finished(row.id, step.name, "undone")
        return f" (rollback incomplete: {'; '.join(problems)})" if problems else ""

    async def recover(self) -> None:
        """Settles migrations a stopped controller left running: finish after the flip (or when every
        step is done), undo before it. One that cannot be settled yet is tried again later."""
        left = await self.catalog.running_migrations()
        while left:
            again = []
            for row in left:
                project = await self.catalog.project(row.project_id)
                if project is not None:
                    await self.fleet.wait_connected([a for a in (project.db_agent, project.docker_agent) if a],
                                                    RECOVERY_AGENTS_WAIT_S)
                log.info("settling migration %s, left running in phase %s", row.id, row.phase)
                try:
                    await self._settle(row)
                    log.info("settled migration %s left in phase %s", row.id, row.phase)
                except Exception as exc:
                    log.warning("cannot settle migration %s yet: %s", row.id,
                                exc.message if isinstance(exc, FluxError) else exc)
                    again.append(row)
            if again:
                await asyncio.sleep(RECOVERY_RETRY_S)
            left = [r for r in [await self.catalog.migration(r.id) for r in again] if r and r.state == "running"]

    async def _settle(self, row: MigrationRow) -> None:
        project = await self.catalog.project(row.project_id)
        if project is not None:
            self._project_of[row.id] = project.id
        plan = plans.build(Options(**row.options))
        recorded = {r.step: r.state for r in await self.catalog.migration_steps(row.id)}
        finished = row.phase == "done" or (recorded and all(recorded.get(n) == "done" for n in plan.names))
        if cut_over(row) or finished:
            task = asyncio.create_task(self._drive(row))
            self._tasks[row.id] = task
            await task
            return
        note = await self._undo(row)
        await self.catalog.finish_migration(
            row.id, "rolled_back", f"{row.phase}: the controller stopped during this step; rolled back{note}", None)
        self._project_of.pop(row.id, None)
