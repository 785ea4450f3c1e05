"""After an online cutover, the way back: the db agent applies the stack's changes to the kept
pooled copy (read-only for the tenant) for the rollback window. `flux migrate rollback` moves the
project back to v2_shared with the same short pause as the cutover and nothing lost; `flux
migrate finalize`, or the end of the window, stops that sync and leaves the pooled copy read-only
(or drops it).

Rollback, in order: writes paused (every gateway in maintenance, and a guard on the stack's
database), the pooled copy given every change the stack committed and its sequences, its write
grants back, the catalog and routes flipped to the pooled engine, writes resumed. A failure before
the catalog flip puts everything back (the copy frozen again, the way back resumed); after it,
the project serves from the pooled copy.
"""

import asyncio
import logging
import time

from ..errors import BadRequest, FluxError
from ..fleet import Fleet
from ..gateways import Gateways
from ..projects import DEDICATED, Projects
from ..store import Catalog, MigrationRow, Project
from .plan import DRAIN_TIMEOUT_S, MAX_LAG_BYTES

log = logging.getLogger(__name__)

SWEEP_S = 30


class Reversals:
    def __init__(self, catalog: Catalog, fleet: Fleet, projects: Projects, gateways: Gateways):
        self.catalog = catalog
        self.fleet = fleet
        self.projects = projects
        self.gateways = gateways
        self._busy: set[str] = set()

    async def window(self, project: Project) -> MigrationRow:
        """The project's migration whose rollback window is open; a clear refusal otherwise."""
        rows = await self.catalog.migrations_of(project.id, limit=1)
        row = rows[0] if rows else None
        back = (row.result or {}).get("rollback") if row and row.state == "succeeded" else None
        if project.mode != DEDICATED or not back or "until" not in back or back.get("ended"):
            why = (f"its rollback window ended ({back['ended']})" if back and back.get("ended") else
                   f"the way back is unavailable: {back['unavailable']}" if back and "unavailable" in back else
                   "it was not moved by an online migrate that kept the pooled copy following it")
            raise BadRequest(f"{project.slug} ({project.hash}) cannot be rolled back or finalized: {why}")
        return row

    def _tenant(self, project: Project) -> dict:
        return self.projects.tenant_params(project)

    async def rollback(self, project: Project) -> dict:
        row = await self.window(project)
        if project.id in self._busy:
            raise BadRequest(f"{project.slug} is already being rolled back or finalized")
        self._busy.add(project.id)
        try:
            return await self._rollback(project, row)
        finally:
            self._busy.discard(project.id)

    async def _rollback(self, project: Project, row: MigrationRow) -> dict:
        tenant, stack = self._tenant(project), self.projects.admin_url(project)
        back = {**tenant, "direction": "back", "target_url": stack}
        agent = project.db_agent
        status = await self.fleet.run(agent, "tenant.sync_status", {**back, "max_lag_bytes": MAX_LAG_BYTES},
                                      timeout=30)
        if not status["slot"] or status.get("error"):
            raise FluxError("the way back is broken, nothing was changed: "
                            + (status.get("error") or "the slot on the stack is gone"))
        paused_at = time.monotonic()
        await self.projects.set_maintenance(project, True)
        flipped = thawed = False
        try:
            await self.fleet.run(agent, "tenant.lock", {**tenant, "target_url": stack}, timeout=60)
            drained = await self.fleet.run(agent, "tenant.sync_drain", {**back, "timeout_s": DRAIN_TIMEOUT_S},
                                           timeout=DRAIN_TIMEOUT_S + 20)
            thawed = True
            await self.fleet.run(agent, "tenant.thaw", tenant, timeout=60)
            await self.catalog.return_to_pooled(project.id)
            flipped = True
            await self.gateways.sync()
        except FluxError as exc:
            if flipped:
                log.warning("rollback of %s: the catalog says v2_shared, routes follow at the next sync: %s",
                            project.slug, exc.message)
            else:
                await self._put_back(project, thawed, exc)
                raise FluxError(f"rollback failed and was undone (the project serves from its stack): "
                                f"{exc.message}") from None
        problems = []
        for kind, params in (("tenant.unlock", {**tenant, "revoke_writes": False, "target_url": stack}),
                             ("tenant.sync_stop", {**tenant, "direction": "back", "target_url": stack})):
            try:
                await self.fleet.run(agent, kind, params, timeout=60)
            except FluxError as exc:
                problems.append(f"{kind}: {exc.message}")
        current = await self.catalog.project(project.id)
        await self.projects.set_maintenance(current, False)
        pause_s = round(time.monotonic() - paused_at, 3)
        await self._end(row, "rolled_back")
        return {"ok": True, "slug": project.slug, "hash": project.hash, "mode": "v2_shared",
                "pauseSeconds": pause_s, "pauseLsn": drained["lsn"], "sequences": drained["sequences"],
                **({"warnings": problems} if problems else {}),
                "message": "Rolled back: the project serves from the pooled engine again; its stack is kept "
                           "(`flux migrate discard` removes it)."}

    async def _put_back(self, project: Project, thawed: bool, cause: FluxError) -> None:
        """Before the catalog flip: the copy read-only again, the guard released, the way back
        following again, writes resumed on the stack."""
        tenant, stack = self._tenant(project), self.projects.admin_url(project)
        steps = ([("tenant.unlock", {**tenant, "revoke_writes": True})] if thawed else []) + [
            ("tenant.unlock", {**tenant, "revoke_writes": False, "target_url": stack}),
            ("tenant.sync_status", {**tenant, "direction": "back", "target_url": stack,
                                    "max_lag_bytes": MAX_LAG_BYTES})]
        for kind, params in steps:
            try:
                await self.fleet.run(project.db_agent, kind, params, timeout=60)
            except FluxError as exc:
                log.warning("rollback of %s: putting back %s failed: %s", project.slug, kind, exc.message)
        await self.projects.set_maintenance(await self.catalog.project(project.id), False)
        log.warning("rollback of %s undone: %s", project.slug, cause.message)

    async def finalize(self, project: Project, drop_source: bool) -> dict:
        """Ends the way back: the slot on the stack goes; the pooled copy stays read-only, or is dropped."""
        row = await self.window(project)
        if project.id in self._busy:
            raise BadRequest(f"{project.slug} is already being rolled back or finalized")
        self._busy.add(project.id)
        try:
            await self.fleet.run(project.db_agent, "tenant.sync_stop",
                                 {**self._tenant(project), "direction": "back",
                                  "target_url": self.projects.admin_url(project)}, timeout=60)
            if drop_source:
                await self.projects.drop_tenant(project, timeout=120)
                await self.catalog.set_kept_copy(project.id, None)
            await self._end(row, "finalized")
        finally:
            self._busy.discard(project.id)
        return {"ok": True, "slug": project.slug, "hash": project.hash, "sourceDropped": drop_source,
                "message": "Finalized: the pooled copy no longer follows the stack"
                           + (" and is dropped." if drop_source else "; it stays, read-only (`flux cleanup` "
                                                                     "drops it).")}

    async def _end(self, row: MigrationRow, how: str) -> None:
        result = dict(row.result or {})
        result["rollback"] = {**result.get("rollback", {}), "ended": how, "endedAt": time.time()}
        await self.catalog.set_migration_result(row.id, result)

    async def sweep(self) -> None:
        """Moves back every project whose check after the cutover found differences (the runner does
        it at once; this finishes it after a controller restart or a failed attempt), and finalizes
        every project whose rollback window has run out."""
        for row in await self.catalog.open_rollback_windows():
            back = (row.result or {}).get("rollback") or {}
            project = await self.catalog.project(row.project_id)
            if project is None or project.mode != DEDICATED:
                continue
            if ((row.result or {}).get("confirmed") or {}).get("problems"):
                try:
                    await self.rollback(project)
                    log.warning("moved %s back to v2_shared: its copies differed after the cutover", project.slug)
                except FluxError as exc:
                    log.error("cannot move %s back yet (its copies differed after the cutover): %s", project.slug,
                              exc.message)
                continue
            if back.get("until", 0) > time.time():
                continue
            try:
                await self.finalize(project, drop_source=False)
                log.info("rollback window of %s ended: finalized", project.slug)
            except FluxError as exc:
                log.warning("cannot finalize %s at the end of its rollback window yet: %s", project.slug,
                            exc.message)

    async def watch_staged_syncs(self) -> None:
        """Keeps each staged stack's sync going (resumed where its db agent restarted) and its lag
        recorded; one that stopped on its own (its slot is dropped then) is recorded as ended."""
        for row in await self.catalog.staged_syncs():
            project = await self.catalog.project(row.project_id)
            if project is None or not project.docker_agent or not self.fleet.connected(project.db_agent):
                continue
            try:
                status = await self.fleet.run(project.db_agent, "tenant.sync_status",
                                              {**self._tenant(project), "target_url": self.projects.admin_url(project),
                                               "max_lag_bytes": MAX_LAG_BYTES}, timeout=30)
            except FluxError as exc:
                log.warning("staged sync of %s: %s", project.slug, exc.message)
                continue
            if status.get("error") or not status["slot"]:
                why = status.get("error") or "its replication slot is gone"
                log.warning("staged sync of %s ended: %s", project.slug, why)
                await self.projects.mark_staged_sync(row, active=False, ended=why)
            else:
                await self.projects.mark_staged_sync(row, lagBytes=status.get("lag_bytes") or 0,
                                                     lagSeconds=status.get("lag_s") or 0.0, at=time.time())

    async def keep_windows(self) -> None:
        """Every SWEEP_S: rollback windows that ran out are finalized, staged syncs kept going."""
        while True:
            for what, sweep in (("rollback window", self.sweep), ("staged sync", self.watch_staged_syncs)):
                try:
                    await sweep()
                except Exception:  # the next sweep tries again
                    log.exception("%s sweep failed", what)
            await asyncio.sleep(SWEEP_S)
