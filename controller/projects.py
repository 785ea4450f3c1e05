"""Projects on both engines: create, list, credentials, lifecycle, repair, delete, push, maintenance.

Create is a short step machine whose state is the project's lifecycle in the catalog:
a row in `provisioning` is undone (tenant or stack removed, route dropped, row deleted)
when a step fails, and by `recover()` when the controller restarts with one left over.
"""

import asyncio
import dataclasses
import hashlib
import logging
import re
import secrets
import time
import urllib.parse
import uuid

import jwt

from contract import names
from contract.stacks import MANAGED_API_ENV, MAX_LOG_LINES, api_setting

from .dumpfiles import DumpFiles
from .store import Catalog, HashTaken, Project, User
from .errors import BadRequest, Conflict, FluxError, Forbidden, NotFound, Unavailable
from .fleet import Fleet, ForeignObjects
from .gateways import Gateways, legacy_host, service_host, service_url
from .secretbox import SecretBox

log = logging.getLogger(__name__)

POOLED, DEDICATED = "v2_shared", "v1_dedicated"
MODES = (POOLED, DEDICATED)
HASH = re.compile(r"^[0-9a-f]{7}$")
MAX_NAME = 63
JWT_SECRET_BYTES = 48
TENANT_JOB_TIMEOUT_S = 60
STACK_JOB_TIMEOUT_S = 300
OBSERVE_TIMEOUT_S = 10
PUSH_TIMEOUT_S = 300
# Operations a project's activity lists at most, and the length of one's detail.
MAX_ACTIVITY = 200
MAX_DETAIL = 500
MAX_API_ENV_KEYS = 32
MAX_API_ENV_VALUE = 4096
LOGS_TIMEOUT_S = 30
# What an owner may record about a project (GET / PATCH projects/:hash/metadata).
METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_METADATA_KEYS = 64
MAX_METADATA_VALUE = 1024
# The anon and service-role keys: a key is reissued every KEY_PERIOD_S and lives KEY_LIFETIME_S,
# so the one shown has at least two months left and stays within the gateways' default
# maximum token lifetime (agent/settings.py).
KEY_PERIOD_S = 30 * 24 * 3600
KEY_LIFETIME_S = 90 * 24 * 3600
POOLED_NOTE = "Pooled project: the database lives in a tenant schema of the shared cluster."
# What the docker agent observes, in the words existing clients accept.
STATUS = {"Running": "running", "Stopped": "stopped", "Partial": "partial", "Missing": "missing",
          "Drift": "corrupted"}


def slugify(name: str) -> str:
    """Lower-cased, each run of characters outside [a-z0-9] becomes '-', trimmed."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def new_hash() -> str:
    """7 random lower-case hex characters; the catalog refuses one any project already has."""
    return secrets.token_hex(4)[:7]


def check_hash(value: str) -> str:
    if not HASH.match(value or ""):
        raise BadRequest(f"invalid project hash {value!r}: expected 7 lower-case hex characters")
    return value


def list_item(project: Project, base_domain: str) -> dict:
    status = "running" if project.mode == POOLED else (project.observed_status or "missing")
    reported = project.status_reported_at
    return {
        "slug": project.slug,
        "hash": project.hash,
        "name": project.name,
        "mode": project.mode,
        "status": status,
        **({"statusReportedAt": reported.isoformat()} if reported else {}),
        "lifecycleState": project.lifecycle,
        "apiUrl": service_url(project, base_domain),
        **({"pooledCopy": kept_copy(project)} if project.kept_copy_bytes is not None else {}),
    }


def kept_copy(project: Project) -> dict:
    """A migrated project's pooled copy, kept read-only after cutover until `flux migrate cleanup`."""
    return {"readOnly": True, "bytes": project.kept_copy_bytes, "dbHost": project.db_agent,
            "schema": project.api_schema}


# The phases of an online migration in which the db agent applies the tenant's changes to the stack.
SYNCING_PHASES = ("sync", "bootstrap", "catch_up", "probe", "lock", "drain")


class Projects:
    def __init__(self, catalog: Catalog, fleet: Fleet, box: SecretBox, gateways: Gateways,
                 dump_files: DumpFiles | None = None, hashes=new_hash):
        self.catalog = catalog
        self.fleet = fleet
        self.box = box
        self.gateways = gateways
        self.dump_files = dump_files or DumpFiles(catalog, fleet, box)
        self.hashes = hashes
        # One change of a project's API settings at a time (each reads the settings the last one left).
        self._api_env_locks: dict[str, asyncio.Lock] = {}
        # The engine error each docker agent last reported ("" when none), to log changes once.
        self._engine_errors: dict[str, str] = {}
        if fleet is not None:
            fleet.report_listeners.append(self.on_stack_report)

    @property
    def base_domain(self) -> str:
        return self.gateways.base_domain

    def unseal(self, project: Project, sealed: str | None, what: str) -> str:
        return self.box.open(sealed, f"project:{project.id}:{what}").decode()

    def seal(self, project_id: str, value: str, what: str) -> str:
        return self.box.seal(value.encode(), f"project:{project_id}:{what}")

    # lookups

    async def get(self, user: User, hash_: str, slug: str | None = None) -> Project:
        project = await self.catalog.project_by_hash(user.id, check_hash(hash_))
        if project is None or project.lifecycle in ("provisioning", "deleting"):
            raise NotFound("Project not found for this hash.")
        if slug is not None and slug != project.slug:
            raise BadRequest(f"slug {slug!r} does not match the project with hash {hash_} "
                             f"(its slug is {project.slug!r}); check -p/--hash or flux.json")
        return project

    async def observed(self, projects: list[Project]) -> list[Project]:
        """The projects with the status their docker agents last reported, and when; no agent is
        asked. `unknown` when the agent is away, has not reported since it connected, or cannot
        reach its Docker engine: nobody can say whether the stack runs."""
        reports = await self.catalog.stack_reports()
        leading = self.fleet.leading()
        seen = []
        for p in projects:
            if p.mode == DEDICATED and p.lifecycle == "active":
                at, engine_error, connected_to = reports.get(p.docker_agent, (None, "", None))
                # A follower knows agents' streams from the catalog: open to the leader, or not current.
                connected = (self.fleet.connected(p.docker_agent) if leading
                             else connected_to is not None and connected_to == self.fleet.leadership.leader_id)
                known = at is not None and not engine_error and connected
                p = dataclasses.replace(p, observed_status=p.observed_status if known else "unknown",
                                        status_reported_at=at)
            seen.append(p)
        return seen

    async def on_stack_report(self, agent: str, report) -> None:
        """A docker agent's report of its stacks (on change, on connect, and periodically)."""
        statuses = {project_id: STATUS.get(state, "corrupted") for project_id, state in report.stacks.items()}
        changed = await self.catalog.stacks_reported(agent, statuses, report.engine_error)
        if report.engine_error != self._engine_errors.get(agent, ""):
            if report.engine_error:
                log.warning("agent %s cannot reach its Docker engine (%s); its projects are listed unknown",
                            agent, report.engine_error)
            else:
                log.info("agent %s reaches its Docker engine again", agent)
        self._engine_errors[agent] = report.engine_error
        if changed:
            log.info("agent %s reports a new status for %d project(s)", agent, len(changed))

    async def listing(self, user: User) -> list[dict]:
        projects = [p for p in await self.catalog.projects_of(user.id)
                    if p.lifecycle not in ("provisioning", "deleting")]
        return [list_item(p, self.base_domain) for p in await self.observed(projects)]

    async def observe(self, project: Project) -> str:
        """The dedicated stack's status as its docker agent sees it now: `unknown` when that agent is
        not connected or cannot reach its Docker engine (nobody can say whether it runs); the last
        known one after any other failure."""
        if not self.fleet.connected(project.docker_agent):
            return "unknown"
        try:
            seen = await self.fleet.run(project.docker_agent, "stack.observe", self.stack_params(project),
                                        timeout=OBSERVE_TIMEOUT_S)
        except Unavailable as exc:
            log.warning("cannot observe %s now: %s", project.slug, exc.message)
            return "unknown"
        except FluxError as exc:
            log.info("cannot observe %s now: %s", project.slug, exc.message)
            return project.observed_status or "missing"
        status = STATUS.get(seen.get("state"), "corrupted")
        if status != project.observed_status:
            await self.catalog.set_observed_status(project.id, status)
        return status

    def jwt_secret(self, project: Project) -> str:
        return self.gateways.jwt_secret(project)

    def api_key(self, project: Project, role: str, now: float | None = None) -> str:
        now = time.time() if now is None else now
        issued = max(int(project.created_at.timestamp()), int(now) // KEY_PERIOD_S * KEY_PERIOD_S)
        return jwt.encode({"role": role, "iss": "flux", "ref": project.slug, "iat": issued,
                           "exp": issued + KEY_LIFETIME_S}, self.jwt_secret(project), algorithm="HS256")

    def postgres_password(self, project: Project) -> str:
        return self.unseal(project, project.postgres_password_sealed, "postgres")

    def credentials(self, project: Project) -> dict:
        base = {"mode": project.mode, "slug": project.slug, "hash": project.hash,
                "projectJwtSecret": self.jwt_secret(project), "serviceUrl": service_url(project, self.base_domain)}
        if project.mode == POOLED:
            staged = {"stagedStack": {"dockerHost": project.docker_agent,
                                      "postgresConnectionString": self.admin_url(project),
                                      "note": "A staged migration's dedicated stack: not serving until cutover; "
                                              "`flux migrate discard` removes it."}} if project.api_upstream else {}
            return {**base, "note": POOLED_NOTE, **staged}
        return {**base,
                "postgresConnectionString": self.admin_url(project),
                "anonKey": self.api_key(project, "anon"),
                "serviceRoleKey": self.api_key(project, "service_role")}

    # placement

    async def place(self, role: str, column: str, requested: str | None = None) -> str:
        agents = {a.name: a for a in await self.catalog.list_agents() if a.revoked_at is None}
        if requested is not None:
            agent = agents.get(requested)
            if agent is None or role not in agent.roles:
                raise BadRequest(f"unknown {role} host {requested!r}; see `flux agents list`")
            if not self.fleet.connected(requested):
                raise Unavailable(f"{role} host {requested} is not connected")
            return requested
        counts = await self.catalog.projects_per_agent(column)
        candidates = [n for n, a in agents.items() if role in a.roles and self.fleet.connected(n)]
        if not candidates:
            raise Unavailable(f"no connected {role} agent can host this project")
        return min(candidates, key=lambda name: (counts.get(name, 0), name))

    # create

    async def create(self, user: User, name: str, mode: str = POOLED, host: str | None = None,
                     tenant_names: bool = False) -> tuple[Project, str]:
        """A new project; with `tenant_names` a dedicated one names its schema and roles as a migrated
        project does (a restore of a pooled tenant's backup brings them)."""
        name = (name or "").strip()
        if not name or len(name) > MAX_NAME:
            raise BadRequest(f"project name must be 1-{MAX_NAME} characters")
        slug = slugify(name)
        if not slug:
            raise BadRequest(f"project name {name!r} has no letters or digits to make a slug from")
        if mode not in MODES:
            raise BadRequest(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if mode == POOLED and host is not None:
            raise BadRequest("--host places dedicated projects; pooled ones live on the shared cluster")
        if mode == POOLED:
            db_agent, docker_agent = await self.place("db", "db_agent"), None
        else:
            db_agent, docker_agent = None, await self.place("docker", "docker_agent", host)
        secret = secrets.token_urlsafe(JWT_SECRET_BYTES)
        project = None
        for _ in range(5):
            project_id = str(uuid.uuid4())
            short_id = names.short_id(project_id)
            dedicated = {}
            if mode == DEDICATED:
                dedicated = {
                    "docker_agent": docker_agent,
                    "postgres_password_sealed": self.seal(project_id, secrets.token_urlsafe(24), "postgres"),
                    "authenticator_password_sealed": self.seal(project_id, secrets.token_urlsafe(24),
                                                                "authenticator"),
                }
            try:
                project = await self.catalog.insert_project(
                    project_id, user.id, name, slug, self.hashes(), mode,
                    names.tenant_schema(short_id) if mode == POOLED or tenant_names else "api",
                    self.box.seal(secret.encode(), f"project:{project_id}"), db_agent, **dedicated)
                break
            except HashTaken:
                continue
        if project is None:
            raise FluxError("could not find a free project hash; try again")
        try:
            if mode == POOLED:
                await self.fleet.run(db_agent, "tenant.create", self.tenant_params(project), timeout=TENANT_JOB_TIMEOUT_S)
            else:
                await self._provision(project)
            await self.catalog.set_lifecycle(project.id, "active")
            await self.gateways.sync()
        except FluxError as exc:
            log.warning("create %s failed, undoing: %s", project.slug, exc.message)
            await self._undo(project)
            raise
        await self.catalog.record_operation(project.id, "create", "succeeded", mode)
        return await self.catalog.project(project.id), secret

    @staticmethod
    def tenant_params(project: Project) -> dict:
        return {"project_id": project.id, "short_id": project.short_id}

    @staticmethod
    def migrated(project: Project) -> bool:
        """A project that came from the pooled engine keeps its tenant schema and runtime role."""
        return project.api_schema != "api"

    def admin_url(self, project: Project) -> str:
        password = urllib.parse.quote(self.postgres_password(project), safe="")
        return f"postgresql://postgres:{password}@{project.db_host}:{project.db_port}/postgres"

    def stack_params(self, project: Project, with_secrets: bool = False) -> dict:
        params = {"project_id": project.id, "slug": project.slug, "hash": project.hash,
                  "api_schema": project.api_schema,
                  "app_role": names.runtime_role(project.short_id) if self.migrated(project) else None}
        if with_secrets:
            params.update(
                jwt_secret=self.jwt_secret(project),
                postgres_password=self.unseal(project, project.postgres_password_sealed, "postgres"),
                authenticator_password=self.unseal(project, project.authenticator_password_sealed, "authenticator"),
                api_port=project.api_port, db_port=project.db_port, api_env=project.api_env)
        return params

    async def _provision(self, project: Project) -> dict:
        """Converges the dedicated stack; keeps its ports, volume, secret and API schema."""
        out = await self.fleet.run(project.docker_agent, "stack.provision", self.stack_params(project, True),
                                   timeout=STACK_JOB_TIMEOUT_S)
        await self.catalog.set_stack(project.id, out["api_upstream"], out["api_port"], out["db_host"], out["db_port"])
        await self.catalog.set_observed_status(project.id, "running")
        return out

    async def _undo(self, project: Project) -> str | None:
        """Removes every trace of a project; raises if a part could not be removed.

        Returns what was left alone: objects under the project's names that belong to another
        project are not its traces, so the agent keeps them and the undo still completes.
        """
        await self.catalog.set_lifecycle(project.id, "deleting")
        untouched = None
        # A migrated project may have both: its stack and what is left of its pooled copy, and
        # its dump files (wherever the catalog lists them) in either case.
        await self.dump_files.remove_all(project, "project_deleted")
        if project.db_agent:
            await self.fleet.run(project.db_agent, "tenant.drop", self.tenant_params(project), timeout=TENANT_JOB_TIMEOUT_S)
        if project.docker_agent:
            try:
                await self.fleet.run(project.docker_agent, "stack.remove", self.stack_params(project),
                                     timeout=STACK_JOB_TIMEOUT_S)
            except ForeignObjects as exc:
                log.warning("removed %s (%s) but left alone what is not its own: %s",
                            project.slug, project.hash, exc.message)
                untouched = exc.message
        await self.catalog.delete_project(project.id)
        try:
            await self.gateways.sync()
        except Unavailable as exc:
            # The row is gone, so the next successful sync drops the route everywhere.
            log.warning("route of %s not yet removed from every gateway: %s", project.slug, exc.message)
        return untouched

    async def recover(self) -> None:
        """Finishes creates and deletes that a stopped controller left half-done; retries until done."""
        while True:
            leftovers = await self.catalog.projects_in("provisioning", "deleting")
            if not leftovers:
                return
            for project in leftovers:
                try:
                    await self._undo(project)
                    log.info("removed half-created or half-deleted project %s (%s)", project.slug, project.hash)
                except FluxError as exc:
                    log.warning("cannot remove project %s yet: %s", project.slug, exc.message)
            await asyncio.sleep(10)

    # lifecycle of dedicated stacks

    def _dedicated(self, project: Project, action: str) -> None:
        if project.mode != DEDICATED:
            raise BadRequest(f"{project.slug} is {project.mode}: {action} applies to v1_dedicated projects")

    async def _recorded(self, project: Project, kind: str, work):
        """Runs an operation and records its outcome for the project's history."""
        try:
            result = await work()
        except FluxError as exc:
            await self.catalog.record_operation(project.id, kind, "failed", exc.message)
            raise
        await self.catalog.record_operation(project.id, kind, "succeeded", None)
        return result

    async def lifecycle(self, project: Project, action: str) -> dict:
        if action not in ("start", "stop"):
            raise BadRequest("action must be start or stop")
        self._dedicated(project, action)
        await self.not_migrating(project)

        async def work():
            if action == "stop":
                await self.fleet.run(project.docker_agent, "stack.stop", self.stack_params(project),
                                     timeout=STACK_JOB_TIMEOUT_S)
            else:
                await self.fleet.run(project.docker_agent, "stack.start", self.stack_params(project, True),
                                     timeout=STACK_JOB_TIMEOUT_S)
            return await self.observe(await self.catalog.project(project.id))

        status = await self._recorded(project, action, work)
        return {"ok": True, "action": action, "status": status}

    async def probe(self, project: Project) -> dict:
        """A service_role request to the project's PostgREST: ok, or PostgREST's exact complaint."""
        self._dedicated(project, "probe")
        out = await self.fleet.run(project.docker_agent, "stack.probe", self.stack_params(project, True),
                                   timeout=STACK_JOB_TIMEOUT_S)
        return {"ok": True, **out}

    async def repair(self, project: Project) -> dict:
        self._dedicated(project, "repair")

        async def work():
            out = await self._provision(project)
            await self.gateways.sync()
            return out

        out = await self._recorded(project, "repair", work)
        return {"ok": True, "steps": out["steps"], "changed": out["changed"],
                "status": await self.observe(await self.catalog.project(project.id))}

    async def delete(self, project: Project) -> dict:
        await self.not_migrating(project, staged_sync_ends=True)
        await self.end_staged_sync(project, "the project was deleted")
        untouched = await self._undo(project)
        return {"ok": True, "mode": "catalog", "deleted": project.slug, "hash": project.hash,
                **({"untouched": untouched} if untouched else {})}

    async def nuke(self, user: User, hash_: str, slug: str | None, force: bool) -> dict:
        """DELETE projects/:hash as existing clients send it: the user's project in the catalog is
        deleted (mode `catalog`); with `force`, an admin removes what the docker hosts still hold
        under a hash that no project in the catalog has any more (mode `orphan`)."""
        hash_ = check_hash(hash_)
        project = await self.catalog.project_by_hash(user.id, hash_)
        if project is not None and project.lifecycle not in ("provisioning", "deleting"):
            return await self.delete(await self.get(user, hash_, slug))
        if not force:
            raise NotFound("Project not found for this hash. With force (an admin only), what the docker hosts "
                           "still hold under it is removed.")
        if user.cli_role != "admin":
            raise Forbidden("removing orphaned Docker objects (force, with no project of yours under the hash) "
                            "needs an admin")
        removed, kept, problems = [], [], []
        agents = [a.name for a in await self.catalog.list_agents()
                  if a.revoked_at is None and "docker" in a.roles and self.fleet.connected(a.name)]
        for agent in agents:
            try:
                found = await self.fleet.run(agent, "stack.find", {"hash": hash_}, timeout=STACK_JOB_TIMEOUT_S)
            except FluxError as exc:
                problems.append(f"{agent}: {exc.message}")
                continue
            for stack in found["stacks"]:
                if slug is not None and stack["slug"] != slug:
                    continue
                owner = await self._catalog_project(stack["project_id"])
                if owner is not None:  # a project in the catalog, of another owner: never an orphan
                    kept.append(f"{agent}: {', '.join(stack['objects'])}")
                    continue
                ref = {"project_id": stack["project_id"], "slug": stack["slug"], "hash": hash_,
                       "api_schema": "api", "app_role": None}
                try:
                    out = await self.fleet.run(agent, "stack.remove", ref, timeout=STACK_JOB_TIMEOUT_S)
                except FluxError as exc:
                    problems.append(f"{agent}: {exc.message}")
                    continue
                removed += [f"{agent}: {name}" for name in out["removed"]]
        if problems and not removed:
            raise Unavailable(f"orphaned objects under hash {hash_} could not be removed: {'; '.join(problems)}")
        if not removed:
            raise NotFound(f"nothing orphaned under hash {hash_} on the connected docker hosts"
                           + (" (what is there belongs to a project in the catalog)" if kept else ""))
        log.warning("removed orphaned Docker objects under hash %s: %s", hash_, "; ".join(removed))
        return {"ok": True, "mode": "orphan", "hash": hash_, "removed": removed,
                **({"problems": problems} if problems else {})}

    async def _catalog_project(self, project_id: str) -> Project | None:
        try:
            return await self.catalog.project(str(uuid.UUID(project_id)))
        except ValueError:
            return None  # a label that is no project id: nothing in the catalog has it

    # push, ledger, maintenance

    async def staged_sync(self, project: Project, besides: str | None = None):
        """The project's latest migration (`besides` that one) when it is a staged one whose sync
        still runs."""
        rows = [r for r in await self.catalog.migrations_of(project.id, limit=2) if r.id != besides][:1]
        if rows and rows[0].state == "succeeded" and ((rows[0].result or {}).get("stagedSync") or {}).get("active"):
            return rows[0]
        return None

    async def end_staged_sync(self, project: Project, why: str, row=None) -> bool:
        """Stops a staged migration's sync and drops its slot; records why it ended."""
        row = row or await self.staged_sync(project)
        if row is None:
            return False
        target = self.admin_url(project) if project.docker_agent and project.db_port else None
        await self.fleet.run(project.db_agent, "tenant.sync_stop", {**self.tenant_params(project), "target_url": target},
                             timeout=TENANT_JOB_TIMEOUT_S)
        await self.mark_staged_sync(row, active=False, ended=why)
        return True

    async def mark_staged_sync(self, row, **fields) -> None:
        result = dict(row.result or {})
        result["stagedSync"] = {**(result.get("stagedSync") or {}), **fields}
        await self.catalog.set_migration_result(row.id, result)

    async def not_migrating(self, project: Project, staged_sync_ends: bool = False) -> None:
        """Refuses while a migration runs, or while a staged one keeps the stack in sync (unless what
        asks ends that sync itself)."""
        if not staged_sync_ends and await self.staged_sync(project) is not None:
            raise Conflict(f"{project.slug} has a staged stack kept in sync with it: a schema change would stop "
                           "the sync. Cut over (flux migrate --to v1_dedicated --yes) or end it (flux migrate "
                           "discard) first")
        running = await self.catalog.running_migration(project.id)
        if running is not None and running.options.get("online") and running.phase in SYNCING_PHASES:
            raise Conflict(f"{project.slug} is migrating online (phase {running.phase}): its changes are being "
                           "synced to the dedicated stack, and a schema change would stop the sync; push again "
                           "when the migration is done")
        if running is not None:
            raise Conflict(f"{project.slug} is migrating (phase {running.phase}); try again when it is done")

    async def push(self, project: Project, files: list[dict], dry_run: bool) -> dict:
        await self.not_migrating(project)
        for item in files:
            item.setdefault("checksum", hashlib.sha256(item.get("sql", "").encode()).hexdigest())
        try:
            if project.mode == POOLED:
                output = await self.fleet.run(project.db_agent, "tenant.push",
                                              {**self.tenant_params(project), "files": files, "dry_run": dry_run},
                                              timeout=PUSH_TIMEOUT_S)
            else:
                output = await self.fleet.run(project.docker_agent, "stack.push",
                                              {**self.stack_params(project, True), "files": files,
                                               "dry_run": dry_run}, timeout=PUSH_TIMEOUT_S)
        except FluxError as exc:
            if not dry_run:
                await self.catalog.record_operation(project.id, "push", "failed", exc.message[:MAX_DETAIL])
            raise
        if not dry_run:
            applied = output["applied"]
            await self.catalog.record_operation(
                project.id, "push", "succeeded",
                (f"applied {', '.join(applied)}" if applied else "nothing new")[:MAX_DETAIL]
                + (f"; {len(output['skipped'])} already applied" if output["skipped"] else ""))
        return {"ok": True, **output}

    async def metadata(self, project: Project) -> dict:
        """The project as the catalog knows it, and what its owner recorded about it."""
        row = await self.catalog.project_metadata(project.id)
        return {"slug": project.slug, "hash": project.hash, "name": project.name, "mode": project.mode,
                "lifecycle": project.lifecycle, "createdAt": project.created_at.isoformat(),
                "metadata": row["metadata"] if row else {},
                "updatedAt": row["updated_at"].isoformat() if row else None}

    async def change_metadata(self, project: Project, changes) -> dict:
        """Sets each key of `changes` to its string value, or removes it where the value is null."""
        if not isinstance(changes, dict) or not changes:
            raise BadRequest("metadata must be a non-empty object of keys to set (string values) or remove (null)")
        for key, value in changes.items():
            if not METADATA_KEY.fullmatch(key):
                raise BadRequest(f"metadata key {key[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
            if value is not None and (not isinstance(value, str) or len(value) > MAX_METADATA_VALUE):
                raise BadRequest(f"metadata key {key!r}: the value must be a string of at most "
                                 f"{MAX_METADATA_VALUE} characters, or null to remove the key")
        row = await self.catalog.project_metadata(project.id)
        merged = {**(row["metadata"] if row else {}), **changes}
        merged = {k: v for k, v in merged.items() if v is not None}
        if len(merged) > MAX_METADATA_KEYS:
            raise BadRequest(f"metadata holds at most {MAX_METADATA_KEYS} keys; this change would make {len(merged)}")
        await self.catalog.set_project_metadata(project.id, merged)
        return await self.metadata(project)

    async def logs(self, project: Project, service: str, tail: int, since: str | None = None) -> dict:
        """Lines of the project's own api or db container (a dedicated project's, or a pooled one's
        staged stack): the last `tail`, or those after `since`. A pooled project's api lines are the
        requests the gateways served for it."""
        if service not in ("api", "db"):
            raise BadRequest(f"service must be api or db, got {service[:40]!r}")
        if not 1 <= tail <= MAX_LOG_LINES:
            raise BadRequest(f"tail must be between 1 and {MAX_LOG_LINES} (got {tail})")
        if not project.docker_agent:
            if service == "db":
                raise BadRequest(f"{project.slug} is a pooled project: its database is the shared cluster, whose "
                                 "lines are not any one project's; service=api shows the requests it served")
            return await self._gateway_lines(project, tail, since)
        return await self.fleet.run(project.docker_agent, "stack.logs",
                                    {**self.stack_params(project), "service": service, "tail": tail, "since": since},
                                    timeout=LOGS_TIMEOUT_S)

    async def _gateway_lines(self, project: Project, tail: int, since: str | None) -> dict:
        """The requests every connected gateway logged for the project's hosts, merged by time. The
        cursor (`until`, given back as `since`) holds each gateway's own place."""
        cursor = dict(part.split("=", 1) for part in (since or "").split(";") if "=" in part)
        hosts = [service_host(project, self.base_domain), legacy_host(project, self.base_domain)]
        agents = sorted(a.name for a in await self.catalog.list_agents()
                        if a.revoked_at is None and "gateway" in a.roles and self.fleet.connected(a.name))
        if not agents:
            raise Unavailable("no gateway agent is connected to say which requests the project served")
        lines, until = [], {}
        for agent in agents:
            out = await self.fleet.run(agent, "gateway.logs",
                                       {"hosts": hosts, "tail": tail, "since": cursor.get(agent) or None},
                                       timeout=LOGS_TIMEOUT_S)
            lines += out["lines"]
            until[agent] = out["until"]
        lines.sort(key=lambda line: line["at"])
        return {"lines": lines[-tail:] if since is None else lines, "running": True,
                "until": ";".join(f"{agent}={at}" for agent, at in until.items())}

    def api_env(self, project: Project) -> dict:
        """The environment of a dedicated project's PostgREST: what Flux sets (secrets hidden) and
        what its owner chose."""
        self._dedicated(project, "api-env")
        managed = {"PGRST_DB_URI": "postgres://authenticator:(hidden)@db:5432/postgres",
                   "PGRST_DB_SCHEMAS": project.api_schema, "PGRST_DB_ANON_ROLE": "anon",
                   "PGRST_JWT_SECRET": "(hidden: flux project credentials shows it)",
                   "PGRST_SERVER_HOST": "0.0.0.0", "PGRST_SERVER_PORT": "3000"}
        return {"slug": project.slug, "hash": project.hash, "env": {**managed, **project.api_env},
                "chosen": project.api_env, "managed": sorted(managed)}

    async def change_api_env(self, project: Project, changes) -> dict:
        """Sets (or, with null, removes) PostgREST settings of a dedicated project and makes its API
        container again with them; if the stack does not come up with them, the settings before are
        put back."""
        self._dedicated(project, "api-env")
        await self.not_migrating(project)
        if not isinstance(changes, dict) or not changes:
            raise BadRequest('env must be a non-empty object: {"PGRST_DB_MAX_ROWS": "1000", "PGRST_X": null}')
        for key, value in changes.items():
            if key in MANAGED_API_ENV:
                raise BadRequest(f"{key} is set by Flux for every dedicated API and cannot be changed")
            if not api_setting(key):
                raise BadRequest(f"{key[:80]!r} is not a PostgREST setting: use PGRST_ and capitals, digits or _")
            if value is not None and (not isinstance(value, str) or len(value) > MAX_API_ENV_VALUE
                                      or "\n" in value or "\0" in value):
                raise BadRequest(f"{key}: the value must be one line of at most {MAX_API_ENV_VALUE} characters, "
                                 "or null to remove the setting")
        async with self._api_env_locks.setdefault(project.id, asyncio.Lock()):
            return await self._change_api_env(await self.catalog.project(project.id), changes)

    async def _change_api_env(self, project: Project, changes: dict) -> dict:
        if await self.observe(project) == "stopped":
            raise BadRequest(f"{project.slug} is stopped: start it first (flux start), then change its API settings")
        before = dict(project.api_env)
        after = {k: v for k, v in {**before, **changes}.items() if v is not None}
        if len(after) > MAX_API_ENV_KEYS:
            raise BadRequest(f"at most {MAX_API_ENV_KEYS} PostgREST settings; this change would make {len(after)}")
        await self.catalog.set_api_env(project.id, after)
        try:
            await self._recorded(project, "api-env", lambda: self._provision(dataclasses.replace(project, api_env=after)))
        except FluxError as exc:
            await self.catalog.set_api_env(project.id, before)
            try:
                await self._provision(dataclasses.replace(project, api_env=before))
            except FluxError as again:
                raise FluxError(f"the API did not come up with the new settings ({exc.message}), nor again with "
                                f"the settings before ({again.message}); `flux repair` retries") from None
            raise BadRequest(f"the API did not come up with these settings, so the ones before are back: "
                             f"{exc.message}") from None
        return self.api_env(await self.catalog.project(project.id))

    async def activity(self, project: Project, limit: int) -> dict:
        """What was done to the project, newest first: operations (create, push, start, stop, repair,
        discard, cleanup) and migrations, each with its outcome."""
        if not 1 <= limit <= MAX_ACTIVITY:
            raise BadRequest(f"limit must be between 1 and {MAX_ACTIVITY} (got {limit})")
        items = [{"kind": op["kind"], "outcome": op["outcome"], "detail": op["detail"], "at": op["at"]}
                 for op in await self.catalog.operations_of(project.id, limit)]
        for row in await self.catalog.migrations_of(project.id, limit=limit):
            items.append({"kind": f"migrate ({row.kind})", "outcome": row.state, "detail": row.error,
                          "at": row.finished_at or row.started_at, "migrationId": row.id})
        items.sort(key=lambda item: item["at"], reverse=True)
        return {"slug": project.slug, "hash": project.hash,
                "activity": [{**item, "at": item["at"].isoformat()} for item in items[:limit]]}

    async def discard_staged_stack(self, project: Project, during_migration: bool = False) -> dict:
        """Removes a pooled project's staged stack and its data; the pooled project serves on."""
        if not during_migration:
            await self.not_migrating(project, staged_sync_ends=True)
        if project.mode != POOLED or not project.docker_agent:
            raise BadRequest(f"{project.slug} has no staged stack to discard")
        if not during_migration:
            await self.end_staged_sync(project, "the staged stack was discarded")
        untouched = None
        try:
            await self.fleet.run(project.docker_agent, "stack.remove", self.stack_params(project),
                                 timeout=STACK_JOB_TIMEOUT_S)
        except ForeignObjects as exc:
            untouched = exc.message
        await self.catalog.clear_stack(project.id)
        await self.catalog.record_operation(project.id, "discard", "succeeded", "staged stack removed")
        return {"ok": True, "slug": project.slug, "hash": project.hash, "discarded": project.docker_agent,
                **({"untouched": untouched} if untouched else {})}

    async def drop_kept_copy(self, project: Project) -> dict:
        """Drops a migrated project's read-only pooled copy."""
        await self.not_migrating(project)
        if project.mode != DEDICATED or project.kept_copy_bytes is None:
            raise BadRequest(f"{project.slug} has no kept pooled copy to drop")
        await self.drop_tenant(project)
        await self.catalog.set_kept_copy(project.id, None)
        await self.catalog.record_operation(project.id, "cleanup", "succeeded", "pooled copy dropped")
        return {"ok": True, "slug": project.slug, "hash": project.hash, "dropped": project.api_schema,
                "bytes": project.kept_copy_bytes}

    async def drop_tenant(self, project: Project, timeout: float = TENANT_JOB_TIMEOUT_S) -> None:
        """Drops the project's tenant from the shared cluster. Its dump files go first, named, so
        the catalog records each as removed (the agent's drop clears the directory after them)."""
        await self.dump_files.remove_all(project, "tenant_dropped")
        await self.fleet.run(project.db_agent, "tenant.drop", self.tenant_params(project), timeout=timeout)

    async def migrations(self, project: Project) -> dict:
        if project.mode == POOLED:
            return await self.fleet.run(project.db_agent, "tenant.migrations", self.tenant_params(project),
                                        timeout=TENANT_JOB_TIMEOUT_S)
        return await self.fleet.run(project.docker_agent, "stack.migrations", self.stack_params(project, True),
                                    timeout=TENANT_JOB_TIMEOUT_S)

    async def set_maintenance(self, project: Project, enabled: bool) -> dict:
        """Returns once every gateway enforces the new state; on failure the old state stands."""
        await self.catalog.set_maintenance(project.id, enabled)
        try:
            synced = await self.gateways.sync()
        except FluxError:
            await self.catalog.set_maintenance(project.id, project.maintenance)
            try:
                await self.gateways.sync()
            except FluxError as exc:
                log.warning("gateways may disagree on maintenance of %s until the next sync: %s",
                            project.slug, exc.message)
            raise
        return {"ok": True, "maintenance": enabled, "gateways": synced["gateways"], "version": synced["version"]}
