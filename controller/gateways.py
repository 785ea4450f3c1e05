"""Routes to projects, pushed to every gateway agent, and the leases gateways serve under.

A route change returns once every gateway either applied it or can no longer serve: a
gateway that does not acknowledge within ACK_TIMEOUT_S is marked unhealthy and stops
blocking changes. Gateways serve only under a lease they renew with the controller
(LeaseRequest/LeaseGrant on the fleet stream); an unhealthy gateway gets no renewal, so
a change that alters a route it serves waits at most until its last lease has run out
(one that only adds projects does not wait). From then on, the gateway
refuses every request on its own, so maintenance means no write lands through any
gateway that serves.

The table goes out as deltas against what each gateway last acknowledged, and in chunks
under CHUNK_BYTES: 100,000 projects never make one message. A gateway whose base is
unknown (new, reconnected, or behind) gets the whole table, in chunks.
"""

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass

from contract import names

from .store import Catalog, Project
from .errors import Conflict, FluxError, Unavailable
from .fleet import Fleet
from .secretbox import SecretBox

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 10
# A whole table takes longer to apply than a delta: this much more per chunk.
CHUNK_TIMEOUT_S = 5
# Long enough that a controller restart (or a short outage) never stops a gateway: leases
# only make a change wait when a silent gateway serves a route the change alters.
LEASE_S = 60
RETRY_UNHEALTHY_S = 15
# Agents reconnect within seconds of a controller start; until then a gateway is not offline.
STARTUP_GRACE_S = 15
CHUNK_BYTES = 1024 * 1024
ROUTED_LIFECYCLES = ("provisioning", "active", "dormant")


def service_host(project: Project, base_domain: str) -> str:
    return f"api--{project.slug}--{project.hash}.{base_domain}"


def legacy_host(project: Project, base_domain: str) -> str:
    return f"api.{project.slug}.{project.hash}.{base_domain}"


def service_url(project: Project, base_domain: str) -> str:
    return f"https://{service_host(project, base_domain)}"


def runtime_role(project: Project) -> str:
    return names.runtime_role(project.short_id)


def route_digest(route: dict) -> str:
    return hashlib.sha256(json.dumps(route, sort_keys=True).encode()).hexdigest()[:24]


def route_chunks(upsert: list[dict], remove: list[str], limit: int = CHUNK_BYTES) -> list[dict]:
    """Splits a change into parts of at most `limit` bytes of routes; at least one part."""
    chunks: list[dict] = []
    current: dict = {"upsert": [], "remove": []}
    size = 0
    for key, item in [("upsert", r) for r in upsert] + [("remove", p) for p in remove]:
        length = len(json.dumps(item, ensure_ascii=False).encode()) + 2
        if size and size + length > limit:
            chunks.append(current)
            current, size = {"upsert": [], "remove": []}, 0
        current[key].append(item)
        size += length
    chunks.append(current)
    return chunks


@dataclass
class Acked:
    """What a gateway last applied: the version and a digest of each route."""

    version: int
    digests: dict[str, str]


def alters_served_routes(acked: Acked | None, routes: dict[str, dict]) -> bool:
    """Whether a new table changes or removes a route a gateway last applied (`acked`).

    When it only adds projects the gateway does not know, that gateway serving on under its
    lease lets nothing through that the new table forbids, so the change need not wait for it.
    """
    if acked is None:
        return True
    return any(pid not in routes or route_digest(routes[pid]) != digest for pid, digest in acked.digests.items())


class Gateways:
    def __init__(self, catalog: Catalog, fleet: Fleet, box: SecretBox, base_domain: str,
                 lease_seconds: int = LEASE_S, ack_timeout: float = ACK_TIMEOUT_S):
        self.catalog = catalog
        self.fleet = fleet
        self.box = box
        self.base_domain = base_domain
        self.lease_seconds = lease_seconds
        self.ack_timeout = ack_timeout
        self._lock = asyncio.Lock()
        self._acked: dict[str, Acked] = {}
        self._unhealthy: dict[str, str] = {}
        self._lease_until: dict[str, float] = {}
        self._committed = 0
        # Leases granted by an earlier controller process may still run this long.
        self._started = time.monotonic()
        self._retry_task: asyncio.Task | None = None
        if fleet is not None:
            fleet.lease_granter = self.grant_lease
            fleet.hello_listeners.append(self._on_hello)

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

    # health and leases

    def healthy(self, name: str) -> bool:
        acked = self._acked.get(name)
        return name not in self._unhealthy and acked is not None and acked.version >= self._committed

    def grant_lease(self, name: str) -> int:
        """Seconds a gateway may serve from its request on; 0 while it is unhealthy or behind."""
        if not self.healthy(name):
            return 0
        self._lease_until[name] = time.monotonic() + self.lease_seconds
        return self.lease_seconds

    def view(self, name: str) -> dict:
        """A gateway agent's state for `flux agents list`."""
        acked = self._acked.get(name)
        left = self._lease_until.get(name, 0) - time.monotonic()
        if self.healthy(name):
            state = "healthy"
        elif name in self._unhealthy:
            state = "unhealthy"
        else:
            state = "unknown"
        return {"state": state, "problem": self._unhealthy.get(name),
                "routes_version": acked.version if acked else None,
                "lease_seconds_left": round(left, 1) if left > 0 else 0}

    def _mark_unhealthy(self, name: str, reason: str) -> None:
        if name not in self._unhealthy:
            log.warning("gateway %s marked unhealthy; it stops serving when its lease runs out: %s", name, reason)
        # What it last acknowledged stays known: a change that only adds to it need not wait for it.
        self._unhealthy[name] = reason

    def _on_hello(self, name: str) -> None:
        # A new connection: whatever the gateway held may be stale, so it gets the whole table.
        self._acked.pop(name, None)
        asyncio.get_running_loop().create_task(self._catch_up([name]))

    async def _catch_up(self, names: list[str]) -> None:
        try:
            agents = [await self.catalog.get_agent(n) for n in names]
            names = [a.name for a in agents if a is not None and "gateway" in a.roles and a.revoked_at is None]
            if names:
                await self.sync(include=names)
        except FluxError as exc:
            log.warning("gateway(s) %s not caught up: %s", ", ".join(names), exc.message)
        except Exception:
            log.exception("gateway(s) %s not caught up", ", ".join(names))

    def start(self) -> None:
        """Retries unhealthy gateways that are still connected (a slow moment, not a lost host)."""
        async def retry():
            while True:
                await asyncio.sleep(RETRY_UNHEALTHY_S)
                stuck = [n for n in self._unhealthy if self.fleet.connected(n)]
                if stuck:
                    await self._catch_up(stuck)

        self._retry_task = asyncio.get_running_loop().create_task(retry())

    def stop(self) -> None:
        if self._retry_task is not None:
            self._retry_task.cancel()

    # route changes

    async def sync(self, include: list[str] | tuple[str, ...] = ()) -> dict:
        """Sends the current table to the healthy gateways (and `include`) and waits as described above."""
        async with self._lock:
            gateways = [a.name for a in await self.catalog.list_agents()
                        if "gateway" in a.roles and a.revoked_at is None]
            if not gateways:
                if include:
                    return {"version": self._committed, "gateways": []}
                raise Unavailable("no gateway agent is enrolled; enroll one with role gateway")
            version = await self.catalog.next_routes_version()
            routes = {p.id: self.route(p) for p in await self.catalog.projects_in(*ROUTED_LIFECYCLES)
                      if p.mode == "v2_shared" or p.api_upstream}
            targets = sorted({g for g in gateways if self.healthy(g)} | (set(include) & set(gateways)))
            results = await asyncio.gather(*(self._push(g, version, routes) for g in targets or gateways),
                                           return_exceptions=True)
            acked, failed = [], []
            for name, result in zip(targets or gateways, results):
                if isinstance(result, BaseException):
                    detail = result.message if isinstance(result, FluxError) else str(result)
                    failed.append((name, detail))
                    self._mark_unhealthy(name, f"did not apply routes version {version}: {detail}")
                    await self.catalog.abandon_jobs(name, "gateway.sync", "superseded: the gateway was marked unhealthy")
                else:
                    acked.append(name)
            if not acked:
                names = ", ".join(name for name, _ in failed)
                raise Unavailable(f"no gateway agent acknowledged the route change ({names}: {failed[0][1]})")
            self._committed = max(self._committed, version)
            waiting = [g for g in gateways if g not in acked]
            await self._outlast_leases([g for g in waiting if alters_served_routes(self._acked.get(g), routes)],
                                       version)
            return {"version": version, "gateways": acked, "unhealthy": sorted(waiting)}

    async def _outlast_leases(self, names: list[str], version: int) -> None:
        """Waits until no gateway in `names` can still be serving an older table."""
        if not names:
            return
        default = self._started + self.lease_seconds
        deadline = max(self._lease_until.get(n, default) for n in names)
        delay = deadline - time.monotonic()
        if delay > 0:
            log.info("routes version %d: waiting %.1fs for the lease of %s to run out", version, delay,
                     ", ".join(names))
            await asyncio.sleep(delay)

    async def _push(self, name: str, version: int, routes: dict[str, dict]) -> None:
        acked = self._acked.get(name)
        try:
            await self._send(name, version, routes, acked)
        except Conflict:
            if acked is None:
                raise
            log.info("gateway %s is not at routes version %d; sending the whole table", name, acked.version)
            await self._send(name, version, routes, None)
        self._acked[name] = Acked(version, {pid: route_digest(r) for pid, r in routes.items()})
        self._unhealthy.pop(name, None)

    async def _connected_soon(self, name: str) -> bool:
        """Whether the gateway is connected; right after this controller started, agents are still
        reconnecting, so it waits for one up to STARTUP_GRACE_S before calling it offline."""
        deadline = self._started + STARTUP_GRACE_S
        while not self.fleet.connected(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.fleet.connected(name)

    async def _send(self, name: str, version: int, routes: dict[str, dict], base: Acked | None) -> None:
        if not await self._connected_soon(name):
            raise Unavailable(f"gateway {name} is not connected")
        if base is None:
            chunks = route_chunks(list(routes.values()), [])
        else:
            upsert = [r for pid, r in routes.items() if base.digests.get(pid) != route_digest(r)]
            chunks = route_chunks(upsert, [pid for pid in base.digests if pid not in routes])
        deadline = time.monotonic() + self.ack_timeout + (CHUNK_TIMEOUT_S * len(chunks) if len(chunks) > 1 else 0)
        for part, chunk in enumerate(chunks):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable(f"gateway {name} did not apply routes version {version} in time")
            params = {"version": version, "base_version": base.version if base else None,
                      "part": part, "parts": len(chunks), **chunk}
            await self.fleet.run(name, "gateway.sync", params, timeout=left)
