"""Projects, their dedicated stacks, routes versions and the operations done on them."""

import datetime
import json
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from contract import names

from ..errors import Conflict
from .base import Store


@dataclass(frozen=True)
class Project:
    id: str
    owner_id: int
    name: str
    slug: str
    hash: str
    mode: str
    lifecycle: str
    api_schema: str
    jwt_secret_sealed: str
    db_agent: str | None
    maintenance: bool
    created_at: datetime.datetime
    docker_agent: str | None = None
    postgres_password_sealed: str | None = None
    authenticator_password_sealed: str | None = None
    api_upstream: str | None = None
    api_port: int | None = None
    db_host: str | None = None
    db_port: int | None = None
    observed_status: str | None = None
    # Shares its hash with an older project of another owner, from before hashes were unique
    # across the catalog (schema 0008); it keeps it, since its names are in use.
    hash_shared: bool = False
    # A migrated project's pooled copy, kept read-only until dropped: its size at cutover.
    kept_copy_bytes: int | None = None
    # PostgREST settings its owner chose for its dedicated API (PGRST_* keys Flux does not set).
    api_env: dict = field(default_factory=dict)
    # Not a column: when its docker agent last reported the status (set by Projects.observed).
    status_reported_at: datetime.datetime | None = None

    @property
    def short_id(self) -> str:
        return names.short_id(self.id)

def _project(row: dict) -> Project:
    return Project(**{**row, "id": str(row["id"])})

class HashTaken(Conflict):
    """A random project hash collided with one a project in the catalog has; pick another."""


class ProjectStore(Store):
    async def insert_project(self, project_id: str, owner_id: int, name: str, slug: str, hash_: str,
                             mode: str, api_schema: str, jwt_secret_sealed: str, db_agent: str | None,
                             docker_agent: str | None = None, postgres_password_sealed: str | None = None,
                             authenticator_password_sealed: str | None = None) -> Project:
        """A new project whose hash no other project in the catalog has, or HashTaken."""
        try:
            # The unique index covers all but the projects that kept a shared hash (0008);
            # the NOT EXISTS keeps new hashes clear of those too.
            row = await self._one(
                "INSERT INTO projects (id, owner_id, name, slug, hash, mode, api_schema, jwt_secret_sealed,"
                " db_agent, docker_agent, postgres_password_sealed, authenticator_password_sealed)"
                " SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s"
                " WHERE NOT EXISTS (SELECT 1 FROM projects WHERE hash = %s) RETURNING *",
                (project_id, owner_id, name, slug, hash_, mode, api_schema, jwt_secret_sealed, db_agent,
                 docker_agent, postgres_password_sealed, authenticator_password_sealed, hash_))
        except psycopg.errors.UniqueViolation as exc:
            constraint = exc.diag.constraint_name or ""
            if "hash" in constraint:
                raise HashTaken(hash_) from None
            raise Conflict(f"a project named {slug} already exists") from None
        if row is None:
            raise HashTaken(hash_)
        return _project(row)

    async def shared_hashes(self) -> list[Project]:
        """Projects that kept a hash another owner's older project has (from before schema 0008)."""
        return [_project(r) for r in await self._all(
            "SELECT * FROM projects WHERE hash_shared ORDER BY hash, created_at")]

    async def project_by_hash(self, owner_id: int, hash_: str) -> Project | None:
        row = await self._one("SELECT * FROM projects WHERE owner_id = %s AND hash = %s", (owner_id, hash_))
        return _project(row) if row else None

    async def project(self, project_id: str) -> Project | None:
        row = await self._one("SELECT * FROM projects WHERE id = %s", (project_id,))
        return _project(row) if row else None

    async def projects_of(self, owner_id: int) -> list[Project]:
        rows = await self._all("SELECT * FROM projects WHERE owner_id = %s ORDER BY slug", (owner_id,))
        return [_project(r) for r in rows]

    async def projects_in(self, *lifecycles: str) -> list[Project]:
        rows = await self._all("SELECT * FROM projects WHERE lifecycle = ANY(%s) ORDER BY created_at",
                               (list(lifecycles),))
        return [_project(r) for r in rows]

    async def set_lifecycle(self, project_id: str, lifecycle: str) -> None:
        await self._one("UPDATE projects SET lifecycle = %s WHERE id = %s RETURNING 1", (lifecycle, project_id))

    async def set_maintenance(self, project_id: str, enabled: bool) -> None:
        await self._one("UPDATE projects SET maintenance = %s WHERE id = %s RETURNING 1", (enabled, project_id))

    async def delete_project(self, project_id: str) -> None:
        """Deletes the project and the records of its removed dump files; a dump file still kept
        stops it (the foreign key restricts), so no file is forgotten while it may exist."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM dump_files WHERE project_id = %s AND removed_at IS NOT NULL",
                               (project_id,))
            try:
                await conn.execute("DELETE FROM projects WHERE id = %s", (project_id,))
            except psycopg.errors.ForeignKeyViolation:
                raise Conflict("the project still has dump files the catalog lists as kept; "
                               "they are removed before it is deleted") from None

    async def projects_per_agent(self, column: str) -> dict[str, int]:
        """Projects placed on each agent, by `db_agent` or `docker_agent`."""
        if column not in ("db_agent", "docker_agent"):
            raise ValueError(column)
        query = sql.SQL("SELECT {c} AS agent, count(*) AS n FROM projects WHERE {c} IS NOT NULL GROUP BY {c}"
                        ).format(c=sql.Identifier(column))
        async with self._connection() as conn:
            rows = await (await conn.execute(query)).fetchall()
        return {r["agent"]: r["n"] for r in rows}

    async def set_stack(self, project_id: str, api_upstream: str, api_port: int, db_host: str, db_port: int) -> None:
        await self._one("UPDATE projects SET api_upstream = %s, api_port = %s, db_host = %s, db_port = %s"
                        " WHERE id = %s RETURNING 1", (api_upstream, api_port, db_host, db_port, project_id))

    async def set_api_env(self, project_id: str, env: dict) -> None:
        await self._one("UPDATE projects SET api_env = %s WHERE id = %s RETURNING 1", (json.dumps(env), project_id))

    async def clear_stack(self, project_id: str) -> None:
        """Forgets a pooled project's staged stack (placement, ports, its passwords)."""
        await self._one("UPDATE projects SET docker_agent = NULL, postgres_password_sealed = NULL,"
                        " authenticator_password_sealed = NULL, api_upstream = NULL, api_port = NULL,"
                        " db_host = NULL, db_port = NULL WHERE id = %s AND mode = 'v2_shared' RETURNING 1",
                        (project_id,))

    async def set_observed_status(self, project_id: str, status: str) -> None:
        await self._one("UPDATE projects SET observed_status = %s WHERE id = %s RETURNING 1", (status, project_id))

    async def set_kept_copy(self, project_id: str, size: int | None) -> None:
        await self._one("UPDATE projects SET kept_copy_bytes = %s WHERE id = %s RETURNING 1", (size, project_id))

    async def prepare_dedicated(self, project_id: str, docker_agent: str, postgres_password_sealed: str,
                                authenticator_password_sealed: str) -> None:
        """Places a pooled project's future stack; passwords are set once and kept for re-runs."""
        await self._one(
            "UPDATE projects SET docker_agent = %s,"
            " postgres_password_sealed = coalesce(postgres_password_sealed, %s),"
            " authenticator_password_sealed = coalesce(authenticator_password_sealed, %s)"
            " WHERE id = %s RETURNING 1",
            (docker_agent, postgres_password_sealed, authenticator_password_sealed, project_id))

    async def next_routes_version(self) -> int:
        row = await self._one("UPDATE gateway_routes_version SET version = version + 1 WHERE id = 1"
                              " RETURNING version")
        return row["version"]

    async def record_operation(self, project_id: str, kind: str, outcome: str, detail: str | None = None) -> None:
        await self._one("INSERT INTO operations (project_id, kind, outcome, detail) VALUES (%s, %s, %s, %s)"
                        " RETURNING 1", (project_id, kind, outcome, detail))

    async def project_metadata(self, project_id: str) -> dict | None:
        return await self._one("SELECT metadata, updated_at FROM project_metadata WHERE project_id = %s",
                               (project_id,))

    async def set_project_metadata(self, project_id: str, metadata: dict) -> dict:
        return await self._one(
            "INSERT INTO project_metadata (project_id, metadata) VALUES (%s, %s)"
            " ON CONFLICT (project_id) DO UPDATE SET metadata = EXCLUDED.metadata, updated_at = now()"
            " RETURNING metadata, updated_at", (project_id, json.dumps(metadata)))

    async def operations_of(self, project_id: str, limit: int = 10) -> list[dict]:
        return await self._all("SELECT kind, outcome, detail, at FROM operations WHERE project_id = %s"
                               " ORDER BY at DESC LIMIT %s", (project_id, limit))
