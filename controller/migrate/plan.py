"""A migration's plan: its steps in order, each with an action, an undo (before cutover) and the
guarantee it leaves behind. The dry run renders this plan; the runner executes the same one.

Steps act through a `Run`, which holds the migration, its options, the outputs of the steps done
so far and the services they call (catalog, agent jobs, projects, gateways). Every action and
undo is idempotent: a restarted controller may run either again.
"""

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from ..store import Catalog, MigrationRow, Project
from ..errors import BadRequest, FluxError
from ..gateways import Gateways, service_url
from ..projects import DEDICATED, POOLED, STACK_JOB_TIMEOUT_S, Projects

log = logging.getLogger(__name__)

MESSAGES = {
    "full": "Migration complete. Project is now v1_dedicated.",
    "staged": "Staged migration complete (catalog mode unchanged; target DB populated).",
    "dump_only": "Dump complete (catalog mode unchanged; no containers were touched).",
}
ASSUMED_BYTES_PER_S = 40 * 1024 * 1024
# Phases a full migration records once the catalog says v1_dedicated, besides the steps its plan has
# after the flip: from there it only goes forward.
AFTER_CUTOVER = ("flipped", "done")


def data_timeout(total_bytes: int) -> float:
    """How long a step that moves or reads the tenant's data may take. The db agent stops a dump
    and restore past its own, shorter limit (300 s + 1 s per MiB), so its error is what the step
    reports."""
    return 600 + max(total_bytes, 0) / (512 * 1024)


def cut_over(row: MigrationRow) -> bool:
    """Whether the catalog flip of this migration has committed: its phase is the flip's own
    "flipped", or a step its plan has after the flip."""
    if row.kind != "full":
        return False
    plan = build(Options(**row.options))
    return row.phase in AFTER_CUTOVER or (row.phase in plan.names and plan.after_cutover(row.phase))


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
    # Sync by logical replication and pause writes only for the cutover; None until the run
    # decides from its preflight (older migrations recorded none: they moved under the lock).
    online: bool | None = None

    @classmethod
    def from_request(cls, body: dict) -> "Options":
        """The contract's keys; `lockWrites: false` and `noLockWrites: true` both mean don't lock."""
        lock = bool(body.get("lockWrites", True)) and not bool(body.get("noLockWrites", False))
        online = body.get("online")
        return cls(to=str(body.get("to") or DEDICATED), dry_run=bool(body.get("dryRun")),
                   dump_only=bool(body.get("dumpOnly")), staged=bool(body.get("staged")), yes=bool(body.get("yes")),
                   new_jwt_secret=bool(body.get("newJwtSecret")), lock_writes=lock,
                   drop_source_after=bool(body.get("dropSourceAfter")),
                   online=None if online is None else bool(online))

    @property
    def kind(self) -> str:
        return "dump_only" if self.dump_only else "staged" if self.staged else "full"


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
    if options.online and (options.dump_only or not options.lock_writes):
        raise BadRequest("--online syncs and then pauses writes for the cutover; it cannot be combined with "
                         "--dump-only or --no-lock-writes")
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


def online_obstacles(preflight: dict) -> list[str]:
    """Why this tenant cannot be synced by logical replication, one sentence each (none: it can)."""
    logical = preflight.get("logical")
    if not logical:
        return ["the db agent does not report logical replication facts (an older agent)"]
    problems = []
    if logical["wal_level"] != "logical":
        problems.append(f"the shared cluster runs with wal_level={logical['wal_level']}; set wal_level = logical "
                        "in its postgresql.conf and restart it")
    if logical["free_slots"] < 1:
        problems.append(f"no free replication slot on the shared cluster (max_replication_slots = "
                        f"{logical['max_slots']}, all in use)")
    if logical["free_senders"] < 1:
        problems.append(f"no free WAL sender on the shared cluster (max_wal_senders = {logical['max_senders']})")
    if logical["tables_without_key"]:
        names = ", ".join(logical["tables_without_key"])
        problems.append(f"tables without a primary key or replica identity ({names}): with them in a publication "
                        "their updates and deletes would fail on the pooled project; add a primary key, or run "
                        "ALTER TABLE ... REPLICA IDENTITY FULL on each")
    return problems


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


class Refused(FluxError):
    """A preflight found something the migration cannot carry; nothing has changed."""

    status = 400


# the run


@dataclass
class Run:
    """One execution of a migration's plan: what its steps read and call."""

    row: MigrationRow
    options: Options
    catalog: Catalog
    jobs: object  # the agent-jobs interface: run(agent, kind, params, timeout, on_progress), connected(agent)
    projects: Projects
    gateways: Gateways
    progress: Callable[[dict], None] = lambda event: None
    outputs: dict[str, dict] = field(default_factory=dict)

    async def project(self) -> Project:
        return await self.catalog.project(self.row.project_id)

    async def migration(self) -> MigrationRow:
        return await self.catalog.migration(self.row.id)

    def tenant(self, project: Project) -> dict:
        return self.projects.tenant_params(project)

    def new_secret(self, project: Project) -> str | None:
        sealed = self.row.new_jwt_secret_sealed
        return self.projects.box.open(sealed, f"project:{project.id}").decode() if sealed else None

    def stack(self, project: Project) -> dict:
        """The stack's parameters with its secrets; a rotating run's stack carries the new JWT secret."""
        params = self.projects.stack_params(project, with_secrets=True)
        secret = self.new_secret(project)
        if secret and project.mode == POOLED:
            params["jwt_secret"] = secret
        return params


@dataclass(frozen=True)
class Step:
    name: str
    guarantee: str
    action: Callable[[Run], Awaitable[dict | None]]
    undo: Callable[[Run], Awaitable[None]] | None = None
    undo_text: str | None = None
    # The step whose commit is the cutover: its own failure restores what it changed; once it has
    # committed, the steps after it only go forward.
    cutover: bool = False


@dataclass(frozen=True)
class Plan:
    kind: str
    steps: tuple[Step, ...]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def after_cutover(self, name: str) -> bool:
        """Whether `name` comes after the cutover step (forward only)."""
        cut = next((i for i, s in enumerate(self.steps) if s.cutover), None)
        return cut is not None and self.names.index(name) > cut

    def render(self) -> list[dict]:
        return [{"name": s.name, "guarantee": s.guarantee, "undo": s.undo_text if s.undo else None,
                 "cutover": s.cutover, "afterCutover": self.after_cutover(s.name)} for s in self.steps]


# actions and undos


async def preflight(run: Run) -> dict:
    project = await run.project()
    found = await run.jobs.run(project.db_agent, "tenant.preflight", run.tenant(project), timeout=120)
    db_agent = await run.catalog.get_agent(project.db_agent)
    refusals = preflight_refusals(found, project.db_agent, db_agent.facts.get("hostname", "?"))
    if run.options.online:
        refusals += [f"cannot sync online: {problem}" for problem in online_obstacles(found)]
    if refusals:
        raise Refused("; ".join(refusals))
    return {"total_bytes": found["total_bytes"], "table_count": len(found["tables"])}


async def target_agent(run_jobs, projects: Projects, project: Project) -> str:
    """The docker host of the dedicated stack: the staged one's, or the least loaded."""
    if project.docker_agent and run_jobs.connected(project.docker_agent):
        return project.docker_agent
    return await projects.place("docker", "docker_agent")


def bulk_load(options: Options, total_bytes: int) -> bool:
    """Whether a new stack starts in bulk-load mode for this run's copy. Leaving it restarts the
    stack's Postgres (about a second): online that is before the pause, offline inside it, where
    it pays only for a tenant large enough that the copy saves more."""
    return bool(options.online) or total_bytes >= BULK_LOAD_OFFLINE_BYTES


async def provision(run: Run) -> dict:
    project = await run.project()
    if not project.docker_agent:
        # No staged stack: this run makes one, and a rollback removes it again.
        await run.catalog.mark_created_stack(run.row.id)
    # Only a stack this run made: a staged one may serve a running sync or hold a staged copy.
    bulk = (await run.migration()).created_stack and bulk_load(run.options, run.outputs["preflight"]["total_bytes"])
    docker_agent = await target_agent(run.jobs, run.projects, project)
    await run.catalog.prepare_dedicated(
        project.id, docker_agent,
        run.projects.seal(project.id, secrets.token_urlsafe(24), "postgres"),
        run.projects.seal(project.id, secrets.token_urlsafe(24), "authenticator"))
    placed = await run.project()
    out = await run.jobs.run(docker_agent, "stack.provision", {**run.stack(placed), "bulk_load": bulk},
                             timeout=STACK_JOB_TIMEOUT_S, on_progress=run.progress)
    await run.catalog.set_stack(project.id, out["api_upstream"], out["api_port"], out["db_host"], out["db_port"])
    image = await run.jobs.run(docker_agent, "stack.image_info", {}, timeout=60)
    return {"docker_host": docker_agent, "postgres_major": image["postgres_major"], "bulk_load": bulk}


async def unprovision(run: Run) -> None:
    """The stack this run made is removed; a staged stack it rotated gets the old secret back."""
    row, project = await run.migration(), await run.project()
    if project.mode != POOLED or not project.docker_agent:
        return
    if row.created_stack:
        await run.projects.discard_staged_stack(project, during_migration=True)
    elif row.new_jwt_secret_sealed:
        await run.jobs.run(project.docker_agent, "stack.provision",
                           run.projects.stack_params(project, with_secrets=True), timeout=STACK_JOB_TIMEOUT_S)


async def lock(run: Run) -> None:
    project = await run.project()
    await run.projects.set_maintenance(project, True)
    await run.jobs.run(project.db_agent, "tenant.lock", run.tenant(project), timeout=60)


async def release(run: Run) -> None:
    """Releases the database guard and lifts maintenance: the pooled copy takes writes again."""
    project = await run.project()
    problems = []
    try:
        await run.jobs.run(project.db_agent, "tenant.unlock", {**run.tenant(project), "revoke_writes": False},
                           timeout=60)
    except FluxError as exc:
        problems.append(f"db guard: {exc.message}")
    current = await run.project()
    if current.maintenance:
        try:
            await run.projects.set_maintenance(current, False)
        except FluxError as exc:
            problems.append(f"gateway maintenance: {exc.message}")
    if problems:
        raise FluxError("; ".join(problems))


async def dump(run: Run) -> dict:
    project = await run.project()
    before = run.outputs["preflight"]
    params = {**run.tenant(project), "name": f"{project.slug}-{project.hash}-{run.row.id[:8]}",
              "expected_bytes": before["total_bytes"], "table_count": before["table_count"]}
    if run.row.kind != "dump_only":
        params.update(target_url=run.projects.admin_url(project),
                      target_major=run.outputs["provision"]["postgres_major"],
                      require_guard=run.options.lock_writes)
    # A fresh data key encrypts the file; the file, its digests and the sealed key go in the catalog.
    out = await run.projects.dump_files.dump(project, run.row.id, params, timeout=data_timeout(before["total_bytes"]),
                                             on_progress=run.progress)
    return {"host": project.db_agent, "path": out["path"], "bytes": out["bytes"], "sha256": out["sha256"],
            "seconds": out.get("seconds")}


async def copy(run: Run) -> dict:
    """A full offline run's copy under the write lock: parallel streams, no dump file on the way (the
    kept dump is written after the cutover, by `keep`, from the pooled copy frozen since the lock)."""
    project = await run.project()
    before = run.outputs["preflight"]
    out = await run.jobs.run(project.db_agent, "tenant.copy",
                             {**run.tenant(project), "target_url": run.projects.admin_url(project),
                              "expected_bytes": before["total_bytes"], "require_guard": True},
                             timeout=data_timeout(before["total_bytes"]), on_progress=run.progress)
    return {"host": project.db_agent, "tables": out["tables"], "rows": out["rows"], "bytes_copied": out["bytes"],
            "seconds": out["seconds"], "phases": out["phases"]}


def _tenant_bytes(run: Run, project: Project) -> int:
    """The tenant's size for a step after the cutover: as the preflight found it or, for a run
    recorded without it, the kept pooled copy's."""
    return max((run.outputs.get("preflight") or {}).get("total_bytes", 0), project.kept_copy_bytes or 0)


async def keep(run: Run) -> dict:
    """After the cutover: the kept dump of the pooled copy, read-only since the flip and unchanged
    since the lock, so the file holds exactly what the stack started from."""
    project = await run.project()
    kept = await run.projects.dump_files.of_migration(project, run.row.id)
    if kept:  # made by an earlier attempt whose end was not recorded, or by an older plan's dump step
        return {"host": kept[0].agent, "path": kept[0].path, "bytes": kept[0].bytes, "sha256": kept[0].sha256}
    before = run.outputs.get("preflight") or {}
    size = _tenant_bytes(run, project)
    # A name per attempt: a file an attempt wrote but never recorded cannot block the next one.
    params = {**run.tenant(project), "name": f"{project.slug}-{project.hash}-{run.row.id[:8]}-{secrets.token_hex(3)}",
              "expected_bytes": size, "table_count": before.get("table_count", 0), "frozen_copy": True}
    out = await run.projects.dump_files.dump(project, run.row.id, params, timeout=data_timeout(size),
                                             on_progress=run.progress)
    return {"host": project.db_agent, "path": out["path"], "bytes": out["bytes"], "sha256": out["sha256"],
            "kept_seconds": out.get("seconds")}


# Offline, a new stack is filled in bulk-load mode from this size of tenant up (see bulk_load).
BULK_LOAD_OFFLINE_BYTES = 256 * 1024 * 1024
# Past this many bytes behind the shared cluster the db agent stops the sync and drops its slot.
MAX_LAG_BYTES = 1024 ** 3
# The pause begins once the target is this close; the drain inside it then takes well under a second.
CATCH_UP_BYTES = 8 * 1024 * 1024
CATCH_UP_S = 1.0
SYNC_POLL_S = 0.5
DRAIN_TIMEOUT_S = 10
# How long after an online cutover the kept pooled copy follows the stack, so a rollback loses nothing.
ROLLBACK_WINDOW_S = 24 * 3600


async def sync(run: Run) -> dict:
    """The copy from a new slot's snapshot, streamed into the stack (and kept, encrypted, in a dump
    file); from then on the db agent applies each change the tenant commits. A staged run's sync
    that still runs is taken over instead: the stack is current already."""
    project = await run.project()
    staged = await run.projects.staged_sync(project, besides=run.row.id) if run.row.kind == "full" else None
    if staged is not None:
        try:
            status = await sync_status(run, project)
        except FluxError as exc:
            await run.projects.end_staged_sync(project, f"not taken over: {exc.message}", staged)
        else:
            await run.projects.mark_staged_sync(staged, active=False, ended=f"taken over by migration {run.row.id}")
            return {"host": project.db_agent, "adopted": staged.id, "applied_lsn": status.get("applied_lsn")}
    before = run.outputs["preflight"]
    params = {**run.tenant(project), "name": f"{project.slug}-{project.hash}-{run.row.id[:8]}",
              "expected_bytes": before["total_bytes"], "table_count": before["table_count"],
              "target_url": run.projects.admin_url(project),
              "target_major": run.outputs["provision"]["postgres_major"], "sync": True,
              "max_lag_bytes": MAX_LAG_BYTES}
    out = await run.projects.dump_files.dump(project, run.row.id, params, timeout=data_timeout(before["total_bytes"]),
                                             on_progress=run.progress)
    return {"host": project.db_agent, "path": out["path"], "bytes": out["bytes"], "sha256": out["sha256"],
            "seconds": out.get("seconds"), "sync_lsn": out["sync_lsn"]}


async def end_sync(run: Run) -> dict:
    """Stops the sync and drops its slot and publication on the shared cluster."""
    project = await run.project()
    target = run.projects.admin_url(project) if project.docker_agent and project.db_port else None
    out = await run.jobs.run(project.db_agent, "tenant.sync_stop", {**run.tenant(project), "target_url": target},
                             timeout=60)
    return {"slot_dropped": out["slot_dropped"]}


async def unsync(run: Run) -> None:
    await end_sync(run)


async def sync_status(run: Run, project: Project) -> dict:
    """The sync as the db agent sees it (resumed there if the agent restarted); a sync that stopped
    on its own fails the step with its reason."""
    status = await run.jobs.run(project.db_agent, "tenant.sync_status",
                                {**run.tenant(project), "target_url": run.projects.admin_url(project),
                                 "max_lag_bytes": MAX_LAG_BYTES}, timeout=30)
    if status.get("error"):
        raise FluxError(f"the sync stopped: {status['error']}")
    if not status["slot"]:
        raise FluxError("the sync's replication slot is gone from the shared cluster")
    run.progress({"phase": "sync", "done": status.get("transactions", 0), "total": 0, "unit": "transactions",
                  "message": f"lag {status.get('lag_bytes') or 0} bytes, {status.get('lag_s') or 0:.1f}s",
                  "lag_bytes": status.get("lag_bytes") or 0, "lag_s": status.get("lag_s") or 0.0})
    return status


async def catch_up(run: Run) -> dict:
    """Every table compared at one LSN while the sync runs; then waits until the stack trails the
    pooled copy by less than a second (and a few MiB of WAL)."""
    project = await run.project()
    budget = data_timeout(run.outputs["preflight"]["total_bytes"])
    checked = await run.jobs.run(project.db_agent, "tenant.sync_check",
                                 {**run.tenant(project), "timeout_s": min(budget, 3600)}, timeout=budget * 2)
    deadline = asyncio.get_running_loop().time() + budget
    while True:
        status = await sync_status(run, project)
        if (status.get("lag_bytes") or 0) <= CATCH_UP_BYTES and (status.get("lag_s") or 0) <= CATCH_UP_S:
            return {"lag_bytes": status.get("lag_bytes") or 0, "lag_s": status.get("lag_s") or 0.0,
                    "applied_lsn": status.get("applied_lsn"), "transactions": status.get("transactions", 0),
                    "checked_lsn": checked["lsn"], "checked_tables": checked["tables"],
                    "check_seconds": checked["seconds"]}
        if asyncio.get_running_loop().time() > deadline:
            raise FluxError(f"the sync did not catch up: {status.get('lag_bytes')} bytes behind")
        await asyncio.sleep(SYNC_POLL_S)


async def drain(run: Run) -> dict:
    """Inside the pause: the lag as it stood, then every acknowledged write applied, then the sequences."""
    project = await run.project()
    lag = await sync_status(run, project)
    out = await run.jobs.run(project.db_agent, "tenant.sync_drain",
                             {**run.tenant(project), "target_url": run.projects.admin_url(project),
                              "timeout_s": DRAIN_TIMEOUT_S, "reverse": run.row.kind == "full"},
                             timeout=DRAIN_TIMEOUT_S + 20)
    return {**out, "lag_bytes_at_pause": lag.get("lag_bytes") or 0, "lag_s_at_pause": lag.get("lag_s") or 0.0}


async def drop_back(run: Run) -> None:
    """Undoes a drain's slot on the stack (before cutover, nothing may follow the stack back)."""
    project = await run.project()
    if project.docker_agent and project.db_port:
        await run.jobs.run(project.db_agent, "tenant.sync_stop",
                           {**run.tenant(project), "direction": "back",
                            "target_url": run.projects.admin_url(project)}, timeout=60)


async def follow_back(run: Run) -> dict:
    """After the cutover: the db agent applies the stack's changes to the kept (read-only) pooled
    copy, so `flux migrate rollback` can move the project back with nothing lost."""
    drained = run.outputs.get("drain") or {}
    if not drained.get("reverse"):
        return {"reverse": False, "reason": drained.get("reverse_error") or "no slot on the stack"}
    project = await run.project()
    status = await run.jobs.run(project.db_agent, "tenant.sync_status",
                                {**run.tenant(project), "direction": "back",
                                 "target_url": run.projects.admin_url(project), "max_lag_bytes": MAX_LAG_BYTES},
                                timeout=30)
    if not status["slot"] or status.get("error"):
        return {"reverse": False, "reason": status.get("error") or "the slot on the stack is gone"}
    return {"reverse": True, "until": time.time() + ROLLBACK_WINDOW_S}


async def confirm(run: Run) -> dict:
    """After an online cutover, off the pause: every table of the stack compared with the kept pooled
    copy at one LSN of the stack, the way back having applied everything before it. The pooled copy
    was frozen at the flip and has since only taken the stack's changes, so any difference is one
    the cutover made; the runner then moves the project back (Reversals.rollback), the pooled copy
    holding every acknowledged write."""
    back = run.outputs.get("follow_back") or {}
    if not back.get("reverse"):
        return {"checked": False, "reason": back.get("reason") or "the pooled copy does not follow the stack"}
    project = await run.project()
    budget = data_timeout(_tenant_bytes(run, project))
    back = {**run.tenant(project), "direction": "back", "target_url": run.projects.admin_url(project)}
    try:
        # Resumed first where the db agent restarted since follow_back.
        status = await run.jobs.run(project.db_agent, "tenant.sync_status", {**back, "max_lag_bytes": MAX_LAG_BYTES},
                                    timeout=30)
        if not status["slot"] or status.get("error"):
            raise FluxError(status.get("error") or "the slot on the stack is gone")
        out = await run.jobs.run(project.db_agent, "tenant.sync_check", {**back, "timeout_s": min(budget, 3600)},
                                 timeout=budget * 2)
    except FluxError as exc:
        # The project serves from its stack either way: a check that cannot run is reported, and
        # leaves the cutover (and its rollback window) as it is rather than stuck half-way.
        return {"checked": False, "reason": f"the check could not run: {exc.message}"}
    return {"checked": True, "lsn": out["lsn"], "tables": out["tables"], "seconds": out["seconds"],
            "problems": out.get("problems") or []}


async def bootstrap(run: Run) -> dict:
    """Roles and grants on the stack, after it has left bulk-load mode; online, the sync (which
    waits for that before it applies changes) then runs."""
    project = await run.project()
    out = await run.jobs.run(project.docker_agent, "stack.bootstrap", run.stack(project), timeout=STACK_JOB_TIMEOUT_S)
    if run.options.online:
        await sync_status(run, project)
    return {"restarted_s": out.get("restarted_s")}


async def verify(run: Run) -> dict:
    project = await run.project()
    return await run.jobs.run(project.db_agent, "tenant.verify",
                              {**run.tenant(project), "target_url": run.projects.admin_url(project)},
                              timeout=data_timeout(run.outputs["preflight"]["total_bytes"]))


async def probe(run: Run) -> None:
    project = await run.project()
    await run.jobs.run(project.docker_agent, "stack.probe", run.stack(project), timeout=STACK_JOB_TIMEOUT_S)


async def flip(run: Run) -> None:
    """The cutover: the catalog says v1_dedicated, then every gateway routes to the stack. When no
    gateway takes the new routes, the catalog flip is undone and the migration is before cutover
    again; once the flip has committed in an earlier attempt, only the route switch is retried."""
    project, row = await run.project(), await run.migration()
    committed = row.phase == "flipped"
    if not committed:
        await run.catalog.flip(project.id, row.id, row.new_jwt_secret_sealed)
    try:
        await run.gateways.sync()
    except FluxError as exc:
        if committed:
            raise FluxError(f"route switch: {exc.message}") from None
        await run.catalog.unflip(project.id, row.id, project.jwt_secret_sealed)
        raise FluxError(f"route switch failed, cutover undone: {exc.message}") from None


async def unlock_after_cutover(run: Run) -> None:
    """The pooled copy turns read-only for every tenant role (in the guard's own transaction when the
    guard is held), and only then do writes resume on the dedicated stack: if the freeze fails, the
    project stays in maintenance rather than having two copies that take writes."""
    project = await run.project()
    out = await run.jobs.run(project.db_agent, "tenant.unlock", {**run.tenant(project), "revoke_writes": True},
                             timeout=60)
    await run.catalog.set_kept_copy(project.id, out.get("bytes", 0))
    current = await run.project()
    if current.maintenance:
        await run.projects.set_maintenance(current, False)


async def drop_source(run: Run) -> None:
    project = await run.project()
    await run.projects.drop_tenant(project, timeout=120)
    await run.catalog.set_kept_copy(project.id, None)


PREFLIGHT = Step("preflight", "the tenant can be carried: pg_dump is on the db host and nothing would be left "
                 "behind", preflight)
PROVISION = Step("provision", "the dedicated stack runs on its docker host with the secret the project will "
                 "use", provision, unprovision, "remove the stack this run made (a staged stack gets its old "
                 "secret back)")
LOCK = Step("lock", "writes are paused at every serving gateway and held by a guard on the pooled copy", lock,
            release, "release the guard and lift maintenance")
BOOTSTRAP = Step("bootstrap", "the stack's roles and grants match the pooled project's", bootstrap)
VERIFY = Step("verify", "every table's rows match the pooled copy", verify)
PROBE = Step("probe", "the dedicated API answers with the project's secret", probe)
FLIP = Step("flip", "the catalog says v1_dedicated and every serving gateway routes to the stack (writes still "
            "paused)", flip, cutover=True)
UNLOCK_AFTER = Step("unlock", "the pooled copy refuses writes from every tenant role; then writes resume on the "
                    "dedicated stack", unlock_after_cutover)
COPY = Step("copy", "the stack holds the tenant's schema and rows as of the lock (parallel streams; the dump file "
            "is kept after the cutover)", copy)
KEEP = Step("keep", "a dump file of the pooled copy, unchanged since the lock, is kept encrypted on the db host",
            keep)
DROP_SOURCE = Step("drop_source", "the pooled copy is gone", drop_source)
SYNC = Step("sync", "the stack holds the tenant as of a replication slot's snapshot, and the db agent applies "
            "every change committed since", sync, unsync, "stop the sync and drop its slot and publication")
CATCH_UP = Step("catch_up", "every table's rows matched the pooled copy's at one LSN, and the stack trails the "
                "pooled copy by under a second", catch_up)
PAUSE = Step("lock", "writes are paused at every serving gateway and held by a guard on the pooled copy (the "
             "pause begins)", lock, release, "release the guard and lift maintenance")
DRAIN = Step("drain", "the stack has every write the pooled copy acknowledged, and its sequences; a slot on the "
             "stack records its changes for the way back", drain, drop_back, "drop the slot on the stack")
SYNC_END = Step("sync_end", "no slot or publication of the tenant is left on the shared cluster", end_sync)
CONFIRM = Step("confirm", "every table of the stack matched the kept pooled copy at one LSN after the cutover; "
               "a difference moves the project back to v2_shared", confirm)
FOLLOW_BACK = Step("follow_back", "the kept pooled copy follows the stack's changes for the rollback window "
                   "(flux migrate rollback; flux migrate finalize ends it)", follow_back)


def build(options: Options) -> Plan:
    """The plan of a migration with these options."""
    if options.kind == "dump_only":
        return Plan("dump_only", (PREFLIGHT, Step("dump", "a dump of the tenant schema is in the db agent's "
                                                         "spool", dump)))
    if options.online:
        return build_online(options)
    if options.kind == "full" and options.lock_writes:
        # The pooled copy stays as it was at the lock from then on: the dump file waits for the cutover.
        steps = [PREFLIGHT, PROVISION, LOCK, COPY, BOOTSTRAP, VERIFY, PROBE, FLIP, UNLOCK_AFTER, KEEP]
        return Plan("full", tuple(steps + ([DROP_SOURCE] if options.drop_source_after else [])))
    steps = [PREFLIGHT, PROVISION, *([LOCK] if options.lock_writes else []),
             Step("dump", "the stack holds the tenant's schema and rows as of the lock, and a dump file of them is "
                  "kept" if options.lock_writes else "the stack holds the tenant's schema and rows as of the dump, "
                  "and a dump file of them is kept", dump),
             BOOTSTRAP, VERIFY, PROBE]
    if options.kind == "staged":
        if options.lock_writes:
            steps.append(Step("unlock", "the pooled project takes writes again; the stack is kept, staged", release))
        return Plan("staged", tuple(steps))
    steps += [FLIP, UNLOCK_AFTER] + ([DROP_SOURCE] if options.drop_source_after else [])
    return Plan("full", tuple(steps))


def build_online(options: Options) -> Plan:
    """Sync first, pause writes only for the cutover."""
    steps = [PREFLIGHT, PROVISION, SYNC, BOOTSTRAP, CATCH_UP, PROBE]
    if options.kind == "staged":
        # The sync goes on after the run: the cutover takes it over, and discard ends it.
        return Plan("staged", tuple(steps))
    steps += [PAUSE, DRAIN, FLIP, UNLOCK_AFTER, SYNC_END]
    steps += [DROP_SOURCE] if options.drop_source_after else [FOLLOW_BACK, CONFIRM]
    return Plan("full", tuple(steps))


def summary(run: Run, project: Project, base_domain: str) -> dict:
    """What a finished migration reports, from the outputs its steps recorded."""
    if run.row.kind == "dump_only":
        dumped = run.outputs.get("dump") or {}
        return {"message": MESSAGES["dump_only"], "dump": {k: dumped.get(k) for k in ("host", "path", "bytes",
                                                                                       "sha256")}}
    result = {"message": MESSAGES[run.row.kind], "dockerHost": project.docker_agent,
              "serviceUrl": service_url(project, base_domain)}
    if "dump" in run.outputs:
        result["dump"] = run.outputs["dump"]
    if "copy" in run.outputs:
        copied = run.outputs["copy"]
        result["dump"] = {"host": copied["host"], "seconds": copied["seconds"], **run.outputs.get("keep", {})}
    synced = run.outputs.get("sync")
    if synced and "adopted" in synced:
        result["syncTakenOver"] = synced["adopted"]
    elif synced:
        result["dump"] = {k: v for k, v in synced.items() if k != "sync_lsn"}
    if synced and run.row.kind == "staged":
        result["stagedSync"] = {"active": True, "note": "the stack follows the pooled project: `flux migrate "
                                "--to v1_dedicated --yes` cuts over with a short pause, `flux migrate discard` "
                                "ends the sync and removes the stack"}
    restarted = (run.outputs.get("bootstrap") or {}).get("restarted_s")
    if restarted is not None and "dump" in result:
        result["dump"] = {**result["dump"], "bulkLoadRestartSeconds": restarted}
    if "drain" in run.outputs:
        drained = run.outputs["drain"]
        result["sync"] = {"pauseLsn": drained["lsn"], "lagBytesAtPause": drained["lag_bytes_at_pause"],
                          "lagSecondsAtPause": drained["lag_s_at_pause"], "drainSeconds": drained["waited_s"]}
    back = run.outputs.get("follow_back")
    if back:
        result["rollback"] = ({"until": back["until"], "command": f"flux migrate rollback -p {project.slug} --hash "
                               f"{project.hash}"} if back["reverse"] else {"unavailable": back["reason"]})
    if "verify" in run.outputs:
        result["verified"] = run.outputs["verify"]
    confirmed = run.outputs.get("confirm")
    if confirmed and confirmed["checked"]:
        result["confirmed"] = {"lsn": confirmed["lsn"], "tables": confirmed["tables"],
                               "seconds": confirmed["seconds"], "problems": confirmed["problems"]}
    elif confirmed:
        result["confirmed"] = {"unavailable": confirmed["reason"]}
    if run.options.drop_source_after and run.row.kind == "full":
        result["sourceDropped"] = True
    return result
