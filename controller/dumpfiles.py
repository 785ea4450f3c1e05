"""Dump files a migrate writes on a db agent: recorded, encrypted at rest, listed and removed.

Each dump gets a fresh 256-bit data key here. It goes to the db agent in the job's params
(sealed at rest in the jobs table, like every job's) and into the file's catalog row, sealed with
the master key and bound to the row's id; the agent keeps it in memory only, and the file in its
spool is encrypted under it (agent/dumpfile.py).

The controller owns the files' lifetime: a sweep removes them once older than the retention
(`flux-controller init --dump-retention-days`; files on an agent that is not connected wait for
it), and they go before their tenant is dropped and before their project is deleted. Removal
names each file; a file already gone is reported and its row marked `missing`, never an error
that stops a drop or a delete.
"""

import asyncio
import base64
import datetime
import logging
import secrets
import uuid
from itertools import groupby

from .store import Catalog, DumpFile, Project
from .config import DEFAULT_DUMP_RETENTION_DAYS
from .errors import FluxError
from .fleet import Fleet
from .secretbox import SecretBox

log = logging.getLogger(__name__)

KEY_BYTES = 32
FILE_JOB_TIMEOUT_S = 60
STAT_TIMEOUT_S = 10
# A file outlives its retention by at most a tenth of it, or an hour.
MAX_SWEEP_S = 3600.0
MIN_SWEEP_S = 1.0


def key_context(dump_id: str) -> str:
    """The associated data that binds a sealed data key to its row."""
    return f"dump:{dump_id}"


def _tenant(project: Project) -> dict:
    return {"project_id": project.id, "short_id": project.short_id}


def _iso(value: datetime.datetime | None) -> str | None:
    return value.isoformat() if value else None


class DumpFiles:
    def __init__(self, catalog: Catalog, fleet: Fleet, box: SecretBox,
                 retention_days: float = DEFAULT_DUMP_RETENTION_DAYS):
        self.catalog = catalog
        self.fleet = fleet
        self.box = box
        self.retention = datetime.timedelta(days=retention_days)
        self.sweep_every_s = min(MAX_SWEEP_S, max(MIN_SWEEP_S, self.retention.total_seconds() / 10))

    async def dump(self, project: Project, migration_id: str | None, params: dict, timeout: float,
                   on_progress=None) -> dict:
        """Runs `tenant.dump` on the project's db agent under a new data key and records the file."""
        dump_id = str(uuid.uuid4())
        key = secrets.token_bytes(KEY_BYTES)
        dumped = await self.fleet.run(project.db_agent, "tenant.dump",
                                      {**params, "dump_key": base64.b64encode(key).decode()},
                                      timeout=timeout, on_progress=on_progress)
        await self.catalog.insert_dump_file(
            dump_id, project.id, migration_id, project.db_agent, dumped["path"], dumped["bytes"], dumped["sha256"],
            dumped["sql_bytes"], dumped["sql_sha256"], self.box.seal(key, key_context(dump_id)))
        return {**dumped, "dump_id": dump_id}

    async def of_migration(self, project: Project, migration_id: str) -> list[DumpFile]:
        """The files a migration kept that are still on their host."""
        return [f for f in await self.catalog.dump_files_of(project.id) if f.migration_id == migration_id]

    # listing

    async def listing(self, project: Project, removed_too: bool = False) -> dict:
        """The project's dump files, each kept one as its db agent sees it now: `kept`, `missing`,
        `changed` (its size is not the recorded one) or `unknown` (the agent cannot say)."""
        files = await self.catalog.dump_files_of(project.id, removed_too)
        seen: dict[str, dict] = {}
        problems = []
        kept = [f for f in files if f.removed_at is None]
        for agent, group in groupby(sorted(kept, key=lambda f: f.agent), key=lambda f: f.agent):
            group = list(group)
            if not self.fleet.connected(agent):
                problems.append(f"db agent {agent} is not connected")
                continue
            try:
                out = await self.fleet.run(agent, "tenant.dump_stat", {**_tenant(project),
                                                                       "paths": [f.path for f in group]},
                                           timeout=STAT_TIMEOUT_S)
            except FluxError as exc:
                problems.append(f"db agent {agent}: {exc.message}")
                continue
            found = {item["path"]: item for item in out.get("files", [])}
            seen.update({f.id: found[f.path] for f in group if f.path in found})
        return {"retentionDays": self.retention.total_seconds() / 86400,
                "dumps": [self._view(f, seen.get(f.id)) for f in files],
                **({"problems": problems} if problems else {})}

    def _view(self, dump: DumpFile, seen: dict | None) -> dict:
        if dump.removed_at is not None:
            state = "removed"
        elif seen is None:
            state = "unknown"
        elif not seen["exists"]:
            state = "missing"
        else:
            state = "kept" if seen["bytes"] == dump.bytes else "changed"
        return {"id": dump.id, "host": dump.agent, "path": dump.path, "bytes": dump.bytes, "sha256": dump.sha256,
                "sqlBytes": dump.sql_bytes, "sqlSha256": dump.sql_sha256, "migrationId": dump.migration_id,
                "createdAt": _iso(dump.created_at), "state": state,
                "expiresAt": _iso(dump.created_at + self.retention) if dump.removed_at is None else None,
                "removedAt": _iso(dump.removed_at), "removedWhy": dump.removed_why,
                "missingWhenRemoved": dump.missing}

    # removal

    async def _remove(self, project: Project, files: list[DumpFile], why: str) -> dict:
        removed, missing = [], []
        for agent, group in groupby(sorted(files, key=lambda f: f.agent), key=lambda f: f.agent):
            by_path = {f.path: f for f in group}
            out = await self.fleet.run(agent, "tenant.dump_remove", {**_tenant(project), "paths": list(by_path)},
                                       timeout=FILE_JOB_TIMEOUT_S)
            gone = [p for p in out.get("removed", []) if p in by_path]
            lost = [p for p in out.get("missing", []) if p in by_path]
            await self.catalog.dump_files_removed([by_path[p].id for p in gone], why, False)
            if lost:
                await self.catalog.dump_files_removed([by_path[p].id for p in lost], why, True)
                log.warning("dump files of %s (%s) on %s were already gone when removed (%s): %s",
                            project.slug, project.hash, agent, why, ", ".join(lost))
            removed += gone
            missing += lost
        return {"removed": removed, "missing": missing}

    async def remove_all(self, project: Project, why: str) -> dict:
        """Removes every kept dump file of the project: before its tenant is dropped, or it is deleted."""
        return await self._remove(project, await self.catalog.dump_files_of(project.id), why)

    async def sweep(self) -> dict:
        """Removes the files past the retention on the agents connected now; the others wait."""
        removed, missing, waiting = [], [], 0
        expired = await self.catalog.expired_dump_files(self.retention)
        for project_id, group in groupby(sorted(expired, key=lambda f: f.project_id), key=lambda f: f.project_id):
            group = list(group)
            ready = [f for f in group if self.fleet.connected(f.agent)]
            waiting += len(group) - len(ready)
            project = await self.catalog.project(project_id)
            if not ready or project is None:
                continue
            try:
                out = await self._remove(project, ready, "retention")
            except FluxError as exc:
                log.warning("cannot remove expired dump files of %s (%s) yet: %s", project.slug, project.hash,
                            exc.message)
                continue
            removed += out["removed"]
            missing += out["missing"]
        if removed or missing:
            log.info("dump retention: removed %d file(s), %d already gone", len(removed), len(missing))
        return {"removed": removed, "missing": missing, "waiting": waiting}

    async def keep_retention(self) -> None:
        """Sweeps now, every `sweep_every_s` and whenever an agent connects (its expired files
        waited for it), until cancelled."""
        wake = asyncio.Event()
        self.fleet.hello_listeners.append(lambda name: wake.set())
        while True:
            wake.clear()
            try:
                await self.sweep()
            except Exception:  # the next sweep tries again; one failure must not end them all
                log.exception("dump retention sweep failed")
            try:
                await asyncio.wait_for(wake.wait(), self.sweep_every_s)
            except asyncio.TimeoutError:
                pass
