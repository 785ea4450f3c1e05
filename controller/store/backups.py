"""Backups of projects, their keys and their schedules."""

import datetime
import json

from .base import Store

FIELDS = ("status", "error", "path", "bytes", "sha256", "archive_bytes", "archive_sha256", "manifest",
          "artifact_status", "artifact_at", "artifact_error", "restore_status", "restore_at", "restore_error",
          "completed_at", "removed_at", "removed_why")


def _row(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {**row, "id": str(row["id"]), "project_id": str(row["project_id"])}


class BackupStore(Store):
    async def backup_key(self, project_id: str) -> str | None:
        row = await self._one("SELECT key_sealed FROM backup_keys WHERE project_id = %s", (project_id,))
        return row["key_sealed"] if row else None

    async def insert_backup_key(self, project_id: str, key_sealed: str) -> str:
        """The project's sealed key: this one, or the one another request stored first."""
        await self._one("INSERT INTO backup_keys (project_id, key_sealed) VALUES (%s, %s)"
                        " ON CONFLICT (project_id) DO NOTHING RETURNING 1", (project_id, key_sealed))
        return await self.backup_key(project_id)

    async def insert_backup(self, backup_id: str, project, kind: str, made_by: str, source_agent: str,
                            agent: str) -> dict:
        return _row(await self._one(
            "INSERT INTO backups (id, project_id, owner_id, slug, hash, kind, made_by, status, source_agent, agent)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, 'running', %s, %s) RETURNING *",
            (backup_id, project.id, project.owner_id, project.slug, project.hash, kind, made_by, source_agent, agent)))

    async def update_backup(self, backup_id: str, **fields) -> dict:
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"not a backup field: {', '.join(sorted(unknown))}")
        values = [json.dumps(v) if k == "manifest" and v is not None else v for k, v in fields.items()]
        sets = ", ".join(f"{k} = %s" for k in fields)
        return _row(await self._one(f"UPDATE backups SET {sets} WHERE id = %s RETURNING *", (*values, backup_id)))

    async def backup(self, backup_id: str) -> dict | None:
        return _row(await self._one("SELECT * FROM backups WHERE id = %s", (backup_id,)))

    async def backups_of(self, project_id: str, removed_too: bool = False) -> list[dict]:
        rows = await self._all("SELECT * FROM backups WHERE project_id = %s AND (%s OR status <> 'removed')"
                               " ORDER BY created_at DESC, id", (project_id, removed_too))
        return [_row(r) for r in rows]

    async def last_push_at(self, project_id: str) -> datetime.datetime | None:
        row = await self._one("SELECT max(at) AS at FROM operations WHERE project_id = %s AND kind = 'push'"
                              " AND outcome = 'succeeded'", (project_id,))
        return row["at"] if row else None

    async def abandon_running_backups(self) -> int:
        """Backups a controller was making when it stopped: they failed."""
        rows = await self._all("UPDATE backups SET status = 'failed', error = 'the controller stopped while it was"
                               " made', completed_at = now() WHERE status = 'running' RETURNING 1")
        return len(rows)

    # schedules

    async def set_backup_schedule(self, project_id: str, every_seconds: int, keep_daily: int, keep_weekly: int,
                                  next_at: datetime.datetime) -> dict:
        return await self._one(
            "INSERT INTO backup_schedules (project_id, every_seconds, keep_daily, keep_weekly, next_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (project_id) DO UPDATE SET every_seconds = EXCLUDED.every_seconds,"
            " keep_daily = EXCLUDED.keep_daily, keep_weekly = EXCLUDED.keep_weekly, next_at = EXCLUDED.next_at,"
            " last_error = NULL, updated_at = now() RETURNING *",
            (project_id, every_seconds, keep_daily, keep_weekly, next_at))

    async def backup_schedule(self, project_id: str) -> dict | None:
        return await self._one("SELECT * FROM backup_schedules WHERE project_id = %s", (project_id,))

    async def remove_backup_schedule(self, project_id: str) -> bool:
        return await self._one("DELETE FROM backup_schedules WHERE project_id = %s RETURNING 1", (project_id,)) is not None

    async def due_backup_schedules(self) -> list[dict]:
        return await self._all("SELECT s.*, p.lifecycle FROM backup_schedules s JOIN projects p ON p.id = s.project_id"
                               " WHERE s.next_at <= now() ORDER BY s.next_at")

    async def schedule_ran(self, project_id: str, next_at: datetime.datetime, error: str | None) -> None:
        await self._one("UPDATE backup_schedules SET next_at = %s, last_error = %s WHERE project_id = %s RETURNING 1",
                        (next_at, error, project_id))
