"""Routes to projects, pushed to every gateway agent; a change returns once all have applied it."""

import asyncio
import logging

from .catalog import Catalog, Project
from .errors import FluxError, Unavailable
from .fleet import Fleet
from .secretbox import SecretBox

log = logging.getLogger(__name__)

SYNC_TIMEOUT_S = 20
ROUTED_LIFECYCLES = ("provisioning", "active", "dormant")


def service_host(project: Project, base_domain: str) -> str:
    return f"api--{project.slug}--{project.hash}.{base_domain}"


def legacy_host(project: Project, base_domain: str) -> str:
    return f"api.{project.slug}.{project.hash}.{base_domain}"


def service_url(project: Project, base_domain: str) -> str:
    return f"https://{service_host(project, base_domain)}"


def runtime_role(project: Project) -> str:
    return f"t_{project.short_id}_role"


class Gateways:
    def __init__(self, catalog: Catalog, fleet: Fleet, box: SecretBox, base_domain: str):
        self.catalog = catalog
        self.fleet = fleet
        self.box = box
        self.base_domain = base_domain
        self._lock = asyncio.Lock()

    def jwt_secret(self, project: Project) -> str:
        return self.box.open(project.jwt_secret_sealed, f"project:{project.id}").decode()

    def route(self, project: Project) -> dict:
        pooled = project.mode == "v2_shared"
        return {
            "project_id": project.id,
            "hosts": [service_host(project, self.base_domain), legacy_host(project, self.base_domain)],
            "mode": project.mode,
            "schema": project.api_schema,
            # App tokens (a `sub`, no `role`) act as this role; none for projects created dedicated.
            "app_role": runtime_role(project) if pooled or project.api_schema != "api" else None,
            "jwt_secret": self.jwt_secret(project),
            "upstream": "pool" if pooled else project.api_upstream,
            "maintenance": project.maintenance,
        }

    async def sync(self) -> dict:
        """Sends the whole route table to every gateway agent and waits for each to apply it."""
        async with self._lock:
            gateways = [a for a in await self.catalog.list_agents()
                        if "gateway" in a.roles and a.revoked_at is None]
            if not gateways:
                raise Unavailable("no gateway agent is enrolled; enroll one with role gateway")
            version = await self.catalog.next_routes_version()
            routes = [self.route(p) for p in await self.catalog.projects_in(*ROUTED_LIFECYCLES)
                      if p.mode == "v2_shared" or p.api_upstream]
            params = {"version": version, "routes": routes}
            results = await asyncio.gather(
                *(self.fleet.run(g.name, "gateway.sync", params, timeout=SYNC_TIMEOUT_S) for g in gateways),
                return_exceptions=True)
            failed = [(g.name, r) for g, r in zip(gateways, results) if isinstance(r, Exception)]
            for name, error in failed:
                log.warning("gateway %s did not apply routes version %d: %s", name, version, error)
            if failed:
                names = ", ".join(name for name, _ in failed)
                first = failed[0][1]
                detail = first.message if isinstance(first, FluxError) else str(first)
                raise Unavailable(f"gateway agent(s) {names} did not acknowledge the route change: {detail}")
            return {"version": version, "gateways": [g.name for g in gateways]}
