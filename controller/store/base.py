"""The catalog's connection pool and its versioned schema.

Schema changes are numbered SQL files in `schema/`, applied in order and recorded in
`schema_migrations`.
"""

import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import FluxError, Unavailable

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

# Serialises concurrent `init` runs against one catalog.
_MIGRATION_LOCK = 0x666C7578


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


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


class Store:
    """The pool every aggregate's queries run on."""

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
