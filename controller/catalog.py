"""The catalog: the controller's state in PostgreSQL.

Schema changes are numbered SQL files in `schema/`, applied in order and recorded in
`schema_migrations`. Every other module reaches the catalog through `Catalog`.
"""

import datetime
import json
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .errors import Conflict, FluxError, NotFound, Unavailable

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Serialises concurrent `init` runs against one catalog.
_MIGRATION_LOCK = 0x666C7578


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class User:
    id: int
    name: str
    plan: str
    cli_role: str


@dataclass(frozen=True)
class ApiToken:
    id: int
    user_id: int
    user: str
    token_hash: str
    created_at: datetime.datetime
    last_used_at: datetime.datetime | None


@dataclass(frozen=True)
class Agent:
    name: str
    roles: list[str]
    cert_serial: str
    cert_expires_at: datetime.datetime
    revoked_at: datetime.datetime | None
    last_seen: datetime.datetime | None
    facts: dict


@dataclass(frozen=True)
class Job:
    id: str
    agent: str
    kind: str
    params_sealed: str
    state: str
    output: dict | None
    error: str | None
    retryable: bool | None
    progress: dict | None
    error_code: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed")


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

    @property
    def short_id(self) -> str:
        return self.id.replace("-", "")[:12]


def _project(row: dict) -> Project:
    return Project(**{**row, "id": str(row["id"])})


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files(__package__).joinpath("schema").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def pending_migrations(available: list[Migration], applied: set[int]) -> list[Migration]:
    """What remains to apply; refuses a catalog that is ahead of this controller."""
    known = {m.version for m in available}
    unknown = sorted(applied - known)
    if unknown:
        raise FluxError(
            f"catalog has schema versions {unknown} this controller does not know; "
            "upgrade the controller before pointing it at this catalog"
        )
    return [m for m in available if m.version not in applied]


async def connect(url: str) -> psycopg.AsyncConnection:
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise Unavailable(f"cannot connect to the catalog: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


async def migrate(conn: psycopg.AsyncConnection) -> tuple[list[Migration], int]:
    """Applies pending schema migrations; returns (applied now, resulting version)."""
    await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await (await conn.execute("SELECT version FROM schema_migrations")).fetchall()
        available = available_migrations()
        todo = pending_migrations(available, {r[0] for r in rows})
        for migration in todo:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                    (migration.version, migration.name),
                )
        return todo, max((m.version for m in available), default=0)
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


def _agent(row: dict) -> Agent:
    return Agent(
        name=row["name"], roles=list(row["roles"]), cert_serial=row["cert_serial"],
        cert_expires_at=row["cert_expires_at"], revoked_at=row["revoked_at"],
        last_seen=row["last_seen"], facts=row["facts"] or {},
    )


def _job(row: dict) -> Job:
    return Job(
        id=row["id"], agent=row["agent"], kind=row["kind"], params_sealed=row["params_sealed"],
        state=row["state"], output=row["output"], error=row["error"],
        retryable=row["retryable"], progress=row["progress"], error_code=row.get("error_code"),
    )


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


class HashTaken(Conflict):
    """A random project hash collided with one a project in the catalog has; pick another."""


class Catalog:
    def __init__(self, url: str, *, max_size: int = 10):
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=max_size, open=False,
            kwargs={"autocommit": True, "row_factory": dict_row},
        )

    async def open(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=15)
        except PoolTimeout:
            raise Unavailable("cannot connect to the catalog") from None

    async def close(self) -> None:
        await self._pool.close()

    async def _one(self, query: str, params: tuple = ()) -> dict | None:
        async with self._pool.connection() as conn:
            return await (await conn.execute(query, params)).fetchone()

    async def _all(self, query: str, params: tuple = ()) -> list[dict]:
        async with self._pool.connection() as conn:
            return await (await conn.execute(query, params)).fetchall()

    async def pending_schema_versions(self) -> list[int]:
        try:
            rows = await self._all("SELECT version FROM schema_migrations")
        except psycopg.errors.UndefinedTable:
            rows = []
        return [m.version for m in pending_migrations(available_migrations(), {r["version"] for r in rows})]

    # users and API tokens

    async def user_for_token(self, token_hash: str) -> User | None:
        row = await self._one(
            "UPDATE api_tokens SET last_used_at = now() FROM users"
            " WHERE api_tokens.token_hash = %s AND users.id = api_tokens.user_id"
            " RETURNING users.id, users.name, users.plan, users.cli_role",
            (token_hash,),
        )
        return User(**row) if row else None

    async def list_users(self) -> list[User]:
        return [User(**r) for r in await self._all("SELECT id, name, plan, cli_role FROM users ORDER BY name")]

    _TOKENS = ("SELECT t.id, t.user_id, u.name AS user, t.token_hash, t.created_at, t.last_used_at"
               " FROM api_tokens t JOIN users u ON u.id = t.user_id")

    async def api_tokens(self, user_id: int | None) -> list[ApiToken]:
        """The user's API tokens, or every user's with None."""
        rows = await self._all(self._TOKENS + " WHERE %s::bigint IS NULL OR t.user_id = %s ORDER BY t.id",
                               (user_id, user_id))
        return [ApiToken(**r) for r in rows]

    async def api_token(self, token_id: int) -> ApiToken | None:
        row = await self._one(self._TOKENS + " WHERE t.id = %s", (token_id,))
        return ApiToken(**row) if row else None

    async def add_api_token(self, user_id: int, token_hash: str) -> ApiToken:
        await self._one("INSERT INTO api_tokens (token_hash, user_id) VALUES (%s, %s) RETURNING id",
                        (token_hash, user_id))
        return next(t for t in await self.api_tokens(user_id) if t.token_hash == token_hash)

    async def delete_api_token(self, token_id: int) -> bool:
        return await self._one("DELETE FROM api_tokens WHERE id = %s RETURNING id", (token_id,)) is not None

    async def has_users(self) -> bool:
        return await self._one("SELECT 1 FROM users LIMIT 1") is not None

    async def create_user(self, name: str, token_hash: str, cli_role: str = "admin", plan: str = "pro") -> User:
        async with self._pool.connection() as conn, conn.transaction():
            try:
                row = await (await conn.execute(
                    "INSERT INTO users (name, cli_role, plan) VALUES (%s, %s, %s)"
                    " RETURNING id, name, plan, cli_role", (name, cli_role, plan)
                )).fetchone()
            except psycopg.errors.UniqueViolation:
                raise Conflict(f"a user named {name} already exists") from None
            await conn.execute(
                "INSERT INTO api_tokens (token_hash, user_id) VALUES (%s, %s)", (token_hash, row["id"])
            )
        return User(**row)

    # join tokens and enrollment

    async def create_join_token(
        self, token_hash: str, roles: list[str], expires_at: datetime.datetime, user_id: int
    ) -> None:
        await self._one(
            "INSERT INTO join_tokens (token_hash, roles, expires_at, created_by)"
            " VALUES (%s, %s, %s, %s) RETURNING 1",
            (token_hash, roles, expires_at, user_id),
        )

    async def enroll(
        self, token_hash: str, name: str, roles: list[str], register
    ) -> Agent:
        """Consumes a join token and records the agent, in one transaction.

        `register()` signs the certificate and returns (serial, not_after); it runs
        only once the token and the name have been checked.
        """
        async with self._pool.connection() as conn, conn.transaction():
            token = await (await conn.execute(
                "SELECT roles, expires_at, used_at, expires_at < now() AS expired"
                " FROM join_tokens WHERE token_hash = %s FOR UPDATE",
                (token_hash,),
            )).fetchone()
            if token is None:
                raise NotFound("join token is not known to this controller")
            if token["used_at"] is not None:
                raise Conflict("join token was already used")
            if token["expired"]:
                raise Conflict("join token has expired")
            extra = sorted(set(roles) - set(token["roles"]))
            if extra:
                raise Conflict(
                    f"join token does not grant role(s) {', '.join(extra)}"
                    f" (it grants {', '.join(token['roles'])})"
                )
            existing = await (await conn.execute(
                "SELECT revoked_at FROM agents WHERE name = %s FOR UPDATE", (name,)
            )).fetchone()
            if existing is not None and existing["revoked_at"] is None:
                raise Conflict(f"an agent named {name} is already enrolled; revoke it first")
            serial, not_after = register()
            row = await (await conn.execute(
                "INSERT INTO agents (name, roles, cert_serial, cert_expires_at)"
                " VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET roles = EXCLUDED.roles,"
                "  cert_serial = EXCLUDED.cert_serial, cert_expires_at = EXCLUDED.cert_expires_at,"
                "  enrolled_at = now(), revoked_at = NULL, facts = '{}'"
                " RETURNING *",
                (name, sorted(set(roles)), str(serial), not_after),
            )).fetchone()
            await conn.execute(
                "UPDATE join_tokens SET used_at = now(), used_by = %s WHERE token_hash = %s",
                (name, token_hash),
            )
        return _agent(row)

    # agents

    async def get_agent(self, name: str) -> Agent | None:
        row = await self._one("SELECT * FROM agents WHERE name = %s", (name,))
        return _agent(row) if row else None

    async def list_agents(self) -> list[Agent]:
        return [_agent(r) for r in await self._all("SELECT * FROM agents ORDER BY name")]

    async def renew_agent(self, name: str, old_serial: str, new_serial: str,
                          not_after: datetime.datetime) -> bool:
        """Swaps an agent's certificate; False if the presented one is no longer its current one."""
        row = await self._one(
            "UPDATE agents SET cert_serial = %s, cert_expires_at = %s"
            " WHERE name = %s AND cert_serial = %s AND revoked_at IS NULL RETURNING 1",
            (new_serial, not_after, name, old_serial))
        return row is not None

    async def revoke_agent(self, name: str) -> bool:
        row = await self._one(
            "UPDATE agents SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s RETURNING 1",
            (name,),
        )
        return row is not None

    async def agent_seen(self, name: str, facts: dict | None) -> None:
        if facts is None:
            await self._one(
                "UPDATE agents SET last_seen = now() WHERE name = %s RETURNING 1", (name,)
            )
        else:
            await self._one(
                "UPDATE agents SET last_seen = now(), facts = %s WHERE name = %s RETURNING 1",
                (json.dumps(facts), name),
            )

    # jobs

    async def create_job(self, job_id: str, agent: str, kind: str, params_sealed: str) -> tuple[Job, bool]:
        """Records a job once; returns (job, created). A known id returns the existing job."""
        row = await self._one(
            "INSERT INTO jobs (id, agent, kind, params_sealed) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING *",
            (job_id, agent, kind, params_sealed),
        )
        if row is not None:
            return _job(row), True
        existing = await self.get_job(job_id)
        if existing.agent != agent or existing.kind != kind:
            raise Conflict(f"job {job_id} already exists for another agent or kind")
        return existing, False

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._one("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return _job(row) if row else None

    async def open_jobs(self, agent: str) -> list[Job]:
        rows = await self._all(
            "SELECT * FROM jobs WHERE agent = %s AND state IN ('pending', 'sent') ORDER BY created_at",
            (agent,),
        )
        return [_job(r) for r in rows]

    async def job_sent(self, job_id: str) -> None:
        await self._one(
            "UPDATE jobs SET state = 'sent', updated_at = now()"
            " WHERE id = %s AND state = 'pending' RETURNING 1",
            (job_id,),
        )

    async def abandon_jobs(self, agent: str, kind: str, error: str) -> list[str]:
        """Closes an agent's open jobs of one kind as failed, so no reconnect sends them again."""
        rows = await self._all(
            "UPDATE jobs SET state = 'failed', error = %s, retryable = true, error_code = 'unavailable',"
            " updated_at = now(), finished_at = now()"
            " WHERE agent = %s AND kind = %s AND state IN ('pending', 'sent') RETURNING id",
            (error, agent, kind),
        )
        return [r["id"] for r in rows]

    async def job_progress(self, job_id: str, progress: dict) -> None:
        await self._one(
            "UPDATE jobs SET progress = %s, updated_at = now()"
            " WHERE id = %s AND state IN ('pending', 'sent') RETURNING 1",
            (json.dumps(progress), job_id),
        )

    async def job_finished(
        self, job_id: str, agent: str, ok: bool, output: dict | None, error: str, retryable: bool,
        error_code: str = "",
    ) -> Job | None:
        """Records a result once; a repeated result for a finished job changes nothing."""
        row = await self._one(
            "UPDATE jobs SET state = %s, output = %s, error = %s, retryable = %s, error_code = %s,"
            " updated_at = now(), finished_at = now()"
            " WHERE id = %s AND agent = %s AND state IN ('pending', 'sent') RETURNING *",
            ("succeeded" if ok else "failed", json.dumps(output) if output is not None else None,
             None if ok else error, None if ok else retryable, None if ok else (error_code or None),
             job_id, agent),
        )
        return _job(row) if row else None

    # projects

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
        await self._one("DELETE FROM projects WHERE id = %s RETURNING 1", (project_id,))

    async def projects_per_agent(self, column: str) -> dict[str, int]:
        """Projects placed on each agent, by `db_agent` or `docker_agent`."""
        if column not in ("db_agent", "docker_agent"):
            raise ValueError(column)
        query = sql.SQL("SELECT {c} AS agent, count(*) AS n FROM projects WHERE {c} IS NOT NULL GROUP BY {c}"
                        ).format(c=sql.Identifier(column))
        async with self._pool.connection() as conn:
            rows = await (await conn.execute(query)).fetchall()
        return {r["agent"]: r["n"] for r in rows}

    async def set_stack(self, project_id: str, api_upstream: str, api_port: int, db_host: str, db_port: int) -> None:
        await self._one("UPDATE projects SET api_upstream = %s, api_port = %s, db_host = %s, db_port = %s"
                        " WHERE id = %s RETURNING 1", (api_upstream, api_port, db_host, db_port, project_id))

    async def clear_stack(self, project_id: str) -> None:
        """Forgets a pooled project's staged stack (placement, ports, its passwords)."""
        await self._one("UPDATE projects SET docker_agent = NULL, postgres_password_sealed = NULL,"
                        " authenticator_password_sealed = NULL, api_upstream = NULL, api_port = NULL,"
                        " db_host = NULL, db_port = NULL WHERE id = %s AND mode = 'v2_shared' RETURNING 1",
                        (project_id,))

    async def set_observed_status(self, project_id: str, status: str) -> None:
        await self._one("UPDATE projects SET observed_status = %s WHERE id = %s RETURNING 1", (status, project_id))

    async def next_routes_version(self) -> int:
        row = await self._one("UPDATE gateway_routes_version SET version = version + 1 WHERE id = 1"
                              " RETURNING version")
        return row["version"]


    # migrations

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

    async def set_kept_copy(self, project_id: str, size: int | None) -> None:
        await self._one("UPDATE projects SET kept_copy_bytes = %s WHERE id = %s RETURNING 1", (size, project_id))

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

    async def prepare_dedicated(self, project_id: str, docker_agent: str, postgres_password_sealed: str,
                                authenticator_password_sealed: str) -> None:
        """Places a pooled project's future stack; passwords are set once and kept for re-runs."""
        await self._one(
            "UPDATE projects SET docker_agent = %s,"
            " postgres_password_sealed = coalesce(postgres_password_sealed, %s),"
            " authenticator_password_sealed = coalesce(authenticator_password_sealed, %s)"
            " WHERE id = %s RETURNING 1",
            (docker_agent, postgres_password_sealed, authenticator_password_sealed, project_id))

    async def flip(self, project_id: str, migration_id: str, jwt_secret_sealed: str | None) -> None:
        """The catalog side of cutover: the project is dedicated from this commit on."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE projects SET mode = 'v1_dedicated', observed_status = 'running',"
                " jwt_secret_sealed = coalesce(%s, jwt_secret_sealed) WHERE id = %s",
                (jwt_secret_sealed, project_id))
            await conn.execute("UPDATE migrations SET phase = 'flipped', updated_at = now() WHERE id = %s",
                               (migration_id,))

    async def unflip(self, project_id: str, migration_id: str, jwt_secret_sealed: str) -> None:
        """Undoes a flip whose route switch failed: the migration is before cutover again."""
        async with self._pool.connection() as conn, conn.transaction():
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

    # dashboard sessions

    async def create_session(self, id_hash: str, user_id: int, csrf: str, ttl: datetime.timedelta) -> None:
        await self._one("INSERT INTO sessions (id_hash, user_id, csrf, expires_at) VALUES (%s, %s, %s, now() + %s)"
                        " RETURNING 1", (id_hash, user_id, csrf, ttl))

    async def session_user(self, id_hash: str) -> tuple[User, str] | None:
        row = await self._one(
            "SELECT u.id, u.name, u.plan, u.cli_role, s.csrf FROM sessions s JOIN users u ON u.id = s.user_id"
            " WHERE s.id_hash = %s AND s.expires_at > now()", (id_hash,))
        if row is None:
            return None
        csrf = row.pop("csrf")
        return User(**row), csrf

    async def delete_session(self, id_hash: str) -> None:
        await self._one("DELETE FROM sessions WHERE id_hash = %s RETURNING 1", (id_hash,))

    async def migrations_of(self, project_id: str, limit: int = 10) -> list[MigrationRow]:
        rows = await self._all("SELECT * FROM migrations WHERE project_id = %s ORDER BY started_at DESC LIMIT %s",
                               (project_id, limit))
        return [_migration(r) for r in rows]

    # operations

    async def record_operation(self, project_id: str, kind: str, outcome: str, detail: str | None = None) -> None:
        await self._one("INSERT INTO operations (project_id, kind, outcome, detail) VALUES (%s, %s, %s, %s)"
                        " RETURNING 1", (project_id, kind, outcome, detail))

    async def operations_of(self, project_id: str, limit: int = 10) -> list[dict]:
        return await self._all("SELECT kind, outcome, detail, at FROM operations WHERE project_id = %s"
                               " ORDER BY at DESC LIMIT %s", (project_id, limit))
