"""Dump files a migration leaves in a db agent's spool: where, how big, their digests and sealed keys."""

import datetime
from dataclasses import dataclass

from .base import Store


@dataclass(frozen=True)
class DumpFile:
    id: str
    project_id: str
    migration_id: str | None
    agent: str
    path: str
    bytes: int
    sha256: str
    sql_bytes: int
    sql_sha256: str
    key_sealed: str
    created_at: datetime.datetime
    removed_at: datetime.datetime | None
    removed_why: str | None
    missing: bool


def _dump_file(row: dict) -> DumpFile:
    return DumpFile(**{k: (str(v) if k in ("id", "project_id", "migration_id") and v is not None else v)
                       for k, v in row.items()})


class DumpFileStore(Store):
    async def insert_dump_file(self, dump_id: str, project_id: str, migration_id: str | None, agent: str,
                               path: str, size: int, sha256: str, sql_bytes: int, sql_sha256: str,
                               key_sealed: str) -> DumpFile:
        row = await self._one(
            "INSERT INTO dump_files (id, project_id, migration_id, agent, path, bytes, sha256, sql_bytes,"
            " sql_sha256, key_sealed) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
            (dump_id, project_id, migration_id, agent, path, size, sha256, sql_bytes, sql_sha256, key_sealed))
        return _dump_file(row)

    async def dump_files_of(self, project_id: str, removed_too: bool = False) -> list[DumpFile]:
        rows = await self._all("SELECT * FROM dump_files WHERE project_id = %s AND (%s OR removed_at IS NULL)"
                               " ORDER BY created_at, id", (project_id, removed_too))
        return [_dump_file(r) for r in rows]

    async def expired_dump_files(self, older_than: datetime.timedelta) -> list[DumpFile]:
        rows = await self._all("SELECT * FROM dump_files WHERE removed_at IS NULL AND created_at < now() - %s"
                               " ORDER BY agent, project_id, created_at", (older_than,))
        return [_dump_file(r) for r in rows]

    async def dump_files_removed(self, dump_ids: list[str], why: str, missing: bool) -> None:
        if not dump_ids:
            return
        await self._all("UPDATE dump_files SET removed_at = now(), removed_why = %s, missing = %s"
                        " WHERE id = ANY(%s::uuid[]) AND removed_at IS NULL RETURNING 1", (why, missing, dump_ids))
