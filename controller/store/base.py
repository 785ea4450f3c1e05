"""The catalog's connection pool and its versioned schema.

Schema changes are numbered SQL files in `schema/`, applied in order and recorded in
`schema_migrations`.
"""

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import FluxError, Unavailable

log = logging.getLogger(__name__)

# A request waits at most this for a pooled connection; a catalog known to be down is answered at once.
CATALOG_WAIT_S = 5.0
# How often the catalog is asked whether it answers (it is back within about this after it returns).
WATCH_EVERY_S = 1.0
# A probe that times out may be this process being busy rather than the catalog gone (thousands of
# agents connecting at once): only this many in a row make it gone. A refused connection does at once.
WATCH_TIMEOUTS_GONE = 3


class CatalogUnavailable(Unavailable):
    def __init__(self, message: str = "catalog unavailable: the controller cannot reach its PostgreSQL; "
                                      "try again shortly"):
        super().__init__(message)


def _lost_connection(exc: psycopg.OperationalError) -> bool:
    """A connection that failed or went away (not a query the server refused)."""
    return exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P"))


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
        self._url = url
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=max_size, open=False, timeout=CATALOG_WAIT_S,
            kwargs={"autocommit": True, "row_factory": dict_row},
        )
        # The leader's lease has a connection of its own: renewing it never waits behind requests
        # for a pooled one (thousands of agents connecting at once fill the pool's queue).
        self._lease_pool = AsyncConnectionPool(
            url, min_size=1, max_size=1, open=False, timeout=CATALOG_WAIT_S,
            kwargs={"autocommit": True, "row_factory": dict_row},
        )
        # False from the moment a request or the watch finds the catalog gone until the watch
        # reaches it again: requests meanwhile are answered 503 at once.
        self.available = True

    async def open(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=15)
            await self._lease_pool.open(wait=True, timeout=15)
        except PoolTimeout:
            await self.close()
            raise Unavailable("cannot connect to the catalog") from None

    async def close(self) -> None:
        await self._pool.close()
        await self._lease_pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self, pool: AsyncConnectionPool | None = None):
        """A pooled connection; CatalogUnavailable while the catalog cannot be reached (the lease's
        own connection tries anyway: one watch probe that timed out under load must not end a lease)."""
        if not self.available and pool is not self._lease_pool:
            raise CatalogUnavailable()
        try:
            async with (pool or self._pool).connection() as conn:
                yield conn
        except PoolTimeout:
            # A pool this busy is not a catalog gone: the watch says when it is.
            raise CatalogUnavailable(f"catalog busy: no connection to it within {CATALOG_WAIT_S:g}s; "
                                     "try again shortly") from None
        except psycopg.OperationalError as exc:
            if not _lost_connection(exc):
                raise
            self._gone(str(exc).strip().splitlines()[0] if str(exc).strip() else "connection lost")
            raise CatalogUnavailable() from None

    def _gone(self, why: str) -> None:
        if self.available:
            log.error("catalog unavailable (%s); answering 503 until it is back", why)
        self.available = False

    async def _probe(self) -> str | None:
        """None when the catalog answers; "timeout" when it did not in time; else "refused"."""
        try:
            async with await psycopg.AsyncConnection.connect(self._url, connect_timeout=2) as conn:
                await asyncio.wait_for(conn.execute("SELECT 1"), 2)
            return None
        except (psycopg.errors.ConnectionTimeout, asyncio.TimeoutError):
            return "timeout"
        except psycopg.Error:
            return "refused"

    async def keep_watch(self) -> None:
        """Asks the catalog every WATCH_EVERY_S whether it answers, until cancelled."""
        timeouts = 0
        while True:
            why = await self._probe()
            timeouts = timeouts + 1 if why == "timeout" else 0
            if why is None:
                if not self.available:
                    # Connections from before it went away are dropped.
                    await self._pool.check()
                    await self._lease_pool.check()
                    self.available = True
                    log.warning("catalog is reachable again")
            elif why == "refused" or timeouts >= WATCH_TIMEOUTS_GONE:
                self._gone("it does not answer")
            await asyncio.sleep(WATCH_EVERY_S)

    async def _one(self, query: str, params: tuple | dict = (), *, lease: bool = False) -> dict | None:
        """The first row of a query; with `lease`, on the lease's own connection."""
        async with self._connection(self._lease_pool if lease else None) as conn:
            return await (await conn.execute(query, params)).fetchone()

    async def _all(self, query: str, params: tuple = ()) -> list[dict]:
        async with self._connection() as conn:
            return await (await conn.execute(query, params)).fetchall()

    async def pending_schema_versions(self) -> list[int]:
        try:
            rows = await self._all("SELECT version FROM schema_migrations")
        except psycopg.errors.UndefinedTable:
            rows = []
        return [m.version for m in pending_migrations(available_migrations(), {r["version"] for r in rows})]
