"""Engine migrations and the steps of their plans."""

import datetime
import json
from dataclasses import dataclass

import psycopg

from ..errors import Conflict
from .base import Store


@dataclass(frozen=True)
class MigrationRow:
    id: str
    project_id: str
    kind: str
    options: dict
    phase: str
    state: str
    error: str | None
    result: dict | None
    new_jwt_secret_sealed: str | None
    started_at: datetime.datetime
    finished_at: datetime.datetime | None = None
    created_stack: bool = False

@dataclass
class StepRow:
    """One step of a migration as last recorded."""

    step: str
    position: int
    state: str
    output: dict | None
    error: str | None

def _migration(row: dict) -> MigrationRow:
    return MigrationRow(**{k: (str(v) if k in ("id", "project_id") else v) for k, v in row.items()
                           if k in MigrationRow.__dataclass_fields__})


class MigrationStore(Store):
    async def insert_migration(self, migration_id: str, project_id: str, kind: str, options: dict,
                               new_jwt_secret_sealed: str | None) -> MigrationRow:
        try:
            row = await self._one(
                "INSERT INTO migrations (id, project_id, kind, options, phase, state, new_jwt_secret_sealed)"
                " VALUES (%s, %s, %s, %s, 'lease', 'running', %s) RETURNING *",
                (migration_id, project_id, kind, json.dumps(options), new_jwt_secret_sealed))
        except psycopg.errors.UniqueViolation:
            running = await self.running_migration(project_id)
            detail = f" (migration {running.id}, phase {running.phase})" if running else ""
            raise Conflict(f"this project is already migrating{detail}; wait for it to finish") from None
        return _migration(row)

    async def running_migration(self, project_id: str) -> MigrationRow | None:
        row = await self._one("SELECT * FROM migrations WHERE project_id = %s AND state = 'running'", (project_id,))
        return _migration(row) if row else None

    async def migration(self, migration_id: str) -> MigrationRow | None:
        row = await self._one("SELECT * FROM migrations WHERE id = %s", (migration_id,))
        return _migration(row) if row else None

    async def running_migrations(self) -> list[MigrationRow]:
        return [_migration(r) for r in await self._all("SELECT * FROM migrations WHERE state = 'running'")]

    async def migrations_of(self, project_id: str, limit: int = 10) -> list[MigrationRow]:
        rows = await self._all("SELECT * FROM migrations WHERE project_id = %s ORDER BY started_at DESC LIMIT %s",
                               (project_id, limit))
        return [_migration(r) for r in rows]

    async def mark_created_stack(self, migration_id: str) -> None:
        await self._one("UPDATE migrations SET created_stack = true WHERE id = %s RETURNING 1", (migration_id,))

    async def resume_migration(self, migration_id: str) -> bool:
        """A failed_after_cutover migration runs again; False when it is not in that state."""
        row = await self._one("UPDATE migrations SET state = 'running', error = NULL, finished_at = NULL,"
                              " updated_at = now() WHERE id = %s AND state = 'failed_after_cutover' RETURNING 1",
                              (migration_id,))
        return row is not None

    async def migration_phase(self, migration_id: str, phase: str) -> None:
        await self._one("UPDATE migrations SET phase = %s, updated_at = now() WHERE id = %s RETURNING 1",
                        (phase, migration_id))

    async def finish_migration(self, migration_id: str, state: str, error: str | None, result: dict | None) -> None:
        await self._one("UPDATE migrations SET state = %s, error = %s, result = %s, updated_at = now(),"
                        " finished_at = now() WHERE id = %s RETURNING 1",
                        (state, error, json.dumps(result) if result is not None else None, migration_id))

    async def set_migration_result(self, migration_id: str, result: dict) -> None:
        await self._one("UPDATE migrations SET result = %s, updated_at = now() WHERE id = %s RETURNING 1",
                        (json.dumps(result), migration_id))

    async def open_rollback_windows(self) -> list[MigrationRow]:
        """Succeeded migrations whose pooled copy still follows the stack."""
        rows = await self._all("SELECT * FROM migrations WHERE state = 'succeeded' AND result ? 'rollback'"
                               " AND result -> 'rollback' ? 'until' AND NOT result -> 'rollback' ? 'ended'")
        return [_migration(r) for r in rows]

    async def staged_syncs(self) -> list[MigrationRow]:
        """Staged migrations whose sync still keeps their stack current."""
        rows = await self._all("SELECT * FROM migrations WHERE state = 'succeeded' AND kind = 'staged'"
                               " AND (result -> 'stagedSync' ->> 'active')::boolean")
        return [_migration(r) for r in rows]

    async def return_to_pooled(self, project_id: str) -> None:
        """A rollback's catalog flip: the project is v2_shared again, its pooled copy live (no longer kept)."""
        await self._one("UPDATE projects SET mode = 'v2_shared', kept_copy_bytes = NULL WHERE id = %s RETURNING 1",
                        (project_id,))

    async def flip(self, project_id: str, migration_id: str, jwt_secret_sealed: str | None) -> None:
        """The catalog side of cutover: the project is dedicated from this commit on."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE projects SET mode = 'v1_dedicated', observed_status = 'running',"
                " jwt_secret_sealed = coalesce(%s, jwt_secret_sealed) WHERE id = %s",
                (jwt_secret_sealed, project_id))
            await conn.execute("UPDATE migrations SET phase = 'flipped', updated_at = now() WHERE id = %s",
                               (migration_id,))

    async def unflip(self, project_id: str, migration_id: str, jwt_secret_sealed: str) -> None:
        """Undoes a flip whose route switch failed: the migration is before cutover again."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("UPDATE projects SET mode = 'v2_shared', jwt_secret_sealed = %s WHERE id = %s",
                               (jwt_secret_sealed, project_id))
            await conn.execute("UPDATE migrations SET phase = 'flip', updated_at = now() WHERE id = %s",
                               (migration_id,))

    async def step_started(self, migration_id: str, step: str, position: int) -> None:
        await self._one(
            "INSERT INTO migration_steps (migration_id, step, position, state) VALUES (%s, %s, %s, 'running')"
            " ON CONFLICT (migration_id, step) DO UPDATE SET state = 'running', error = NULL,"
            " started_at = now(), finished_at = NULL RETURNING 1", (migration_id, step, position))

    async def step_finished(self, migration_id: str, step: str, state: str, output: dict | None = None,
                            error: str | None = None) -> None:
        await self._one(
            "UPDATE migration_steps SET state = %s, output = coalesce(%s, output), error = %s, finished_at = now()"
            " WHERE migration_id = %s AND step = %s RETURNING 1",
            (state, json.dumps(output) if output is not None else None, error, migration_id, step))

    async def migration_steps(self, migration_id: str) -> list[StepRow]:
        rows = await self._all("SELECT step, position, state, output, error FROM migration_steps"
                               " WHERE migration_id = %s ORDER BY position", (migration_id,))
        return [StepRow(**r) for r in rows]
