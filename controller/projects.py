"""Projects on the pooled engine: create, list, credentials, push, maintenance.

Create is a short step machine whose state is the project's lifecycle in the catalog:
a row in `provisioning` is undone (tenant dropped, route removed, row deleted) when a
step fails, and by `recover()` when the controller restarts with one left over.
"""

import asyncio
import hashlib
import logging
import re
import secrets
import uuid

from .catalog import Catalog, HashTaken, Project, User
from .errors import BadRequest, FluxError, NotFound, Unavailable
from .fleet import Fleet
from .gateways import Gateways, service_url
from .secretbox import SecretBox

log = logging.getLogger(__name__)

MODES = ("v2_shared", "v1_dedicated")
HASH = re.compile(r"^[0-9a-f]{7}$")
MAX_NAME = 63
JWT_SECRET_BYTES = 48
TENANT_JOB_TIMEOUT_S = 60
PUSH_TIMEOUT_S = 300
POOLED_NOTE = "Pooled project: the database lives in a tenant schema of the shared cluster."


def slugify(name: str) -> str:
    """Lower-cased, each run of characters outside [a-z0-9] becomes '-', trimmed."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_hash(value: str) -> str:
    if not HASH.match(value or ""):
        raise BadRequest(f"invalid project hash {value!r}: expected 7 lower-case hex characters")
    return value


def new_jwt_secret() -> str:
    return secrets.token_urlsafe(JWT_SECRET_BYTES)


def list_item(project: Project, base_domain: str) -> dict:
    return {
        "slug": project.slug,
        "hash": project.hash,
        "name": project.name,
        "mode": project.mode,
        "status": "running",
        "lifecycleState": project.lifecycle,
        "apiUrl": service_url(project, base_domain),
    }


class Projects:
    def __init__(self, catalog: Catalog, fleet: Fleet, box: SecretBox, gateways: Gateways):
        self.catalog = catalog
        self.fleet = fleet
        self.box = box
        self.gateways = gateways

    @property
    def base_domain(self) -> str:
        return self.gateways.base_domain

    # lookups

    async def get(self, user: User, hash_: str, slug: str | None = None) -> Project:
        project = await self.catalog.project_by_hash(user.id, check_hash(hash_))
        if project is None or project.lifecycle in ("provisioning", "deleting"):
            raise NotFound("Project not found for this hash.")
        if slug is not None and slug != project.slug:
            raise BadRequest(f"slug {slug!r} does not match the project with hash {hash_} "
                             f"(its slug is {project.slug!r}); check -p/--hash or flux.json")
        return project

    async def listing(self, user: User) -> list[dict]:
        return [list_item(p, self.base_domain) for p in await self.catalog.projects_of(user.id)
                if p.lifecycle not in ("provisioning", "deleting")]

    def jwt_secret(self, project: Project) -> str:
        return self.gateways.jwt_secret(project)

    def credentials(self, project: Project) -> dict:
        return {"mode": project.mode, "slug": project.slug, "hash": project.hash,
                "projectJwtSecret": self.jwt_secret(project), "serviceUrl": service_url(project, self.base_domain),
                "note": POOLED_NOTE}

    # create

    async def _db_agent(self) -> str:
        counts = await self.catalog.projects_per_db_agent()
        candidates = [a.name for a in await self.catalog.list_agents()
                      if "db" in a.roles and a.revoked_at is None and self.fleet.connected(a.name)]
        if not candidates:
            raise Unavailable("no connected db agent can host a pooled project")
        return min(candidates, key=lambda name: (counts.get(name, 0), name))

    async def create(self, user: User, name: str, mode: str = "v2_shared") -> tuple[Project, str]:
        name = (name or "").strip()
        if not name or len(name) > MAX_NAME:
            raise BadRequest(f"project name must be 1-{MAX_NAME} characters")
        slug = slugify(name)
        if not slug:
            raise BadRequest(f"project name {name!r} has no letters or digits to make a slug from")
        if mode not in MODES:
            raise BadRequest(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if mode != "v2_shared":
            raise BadRequest("v1_dedicated projects are not available on this controller yet")
        db_agent = await self._db_agent()
        secret = new_jwt_secret()
        project = None
        for _ in range(5):
            project_id = str(uuid.uuid4())
            short_id = project_id.replace("-", "")[:12]
            try:
                project = await self.catalog.insert_project(
                    project_id, user.id, name, slug, secrets.token_hex(4)[:7], mode, f"t_{short_id}_api",
                    self.box.seal(secret.encode(), f"project:{project_id}"), db_agent)
                break
            except HashTaken:
                continue
        if project is None:
            raise FluxError("could not find a free project hash; try again")
        try:
            await self.fleet.run(db_agent, "tenant.create", self._tenant(project), timeout=TENANT_JOB_TIMEOUT_S)
            await self.catalog.set_lifecycle(project.id, "active")
            await self.gateways.sync()
        except FluxError as exc:
            log.warning("create %s failed, undoing: %s", project.slug, exc.message)
            await self._undo(project)
            raise
        return await self.catalog.project(project.id), secret

    @staticmethod
    def _tenant(project: Project) -> dict:
        return {"project_id": project.id, "short_id": project.short_id}

    async def _undo(self, project: Project) -> None:
        """Removes every trace of a project; raises if a part could not be removed."""
        await self.catalog.set_lifecycle(project.id, "deleting")
        if project.db_agent:
            await self.fleet.run(project.db_agent, "tenant.drop", self._tenant(project),
                                 timeout=TENANT_JOB_TIMEOUT_S)
        await self.catalog.delete_project(project.id)
        try:
            await self.gateways.sync()
        except Unavailable as exc:
            # The row is gone, so the next successful sync drops the route everywhere.
            log.warning("route of %s not yet removed from every gateway: %s", project.slug, exc.message)

    async def recover(self) -> None:
        """Undoes creates and deletes that a stopped controller left half-done; retries until done."""
        while True:
            leftovers = await self.catalog.projects_in("provisioning", "deleting")
            if not leftovers:
                return
            for project in leftovers:
                try:
                    await self._undo(project)
                    log.info("removed half-created project %s (%s)", project.slug, project.hash)
                except FluxError as exc:
                    log.warning("cannot remove half-created project %s yet: %s", project.slug, exc.message)
            await asyncio.sleep(10)

    # push, ledger, maintenance

    async def push(self, project: Project, files: list[dict], dry_run: bool) -> dict:
        if project.mode != "v2_shared":
            raise BadRequest("push to v1_dedicated projects is not available on this controller yet")
        for item in files:
            item.setdefault("checksum", hashlib.sha256(item.get("sql", "").encode()).hexdigest())
        output = await self.fleet.run(project.db_agent, "tenant.push",
                                      {**self._tenant(project), "files": files, "dry_run": dry_run},
                                      timeout=PUSH_TIMEOUT_S)
        return {"ok": True, **output}

    async def migrations(self, project: Project) -> dict:
        return await self.fleet.run(project.db_agent, "tenant.migrations", self._tenant(project),
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
