"""Write guards: an EXCLUSIVE lock on every table of a tenant (reads pass, writes wait), held in
a session of the tenant's owner role for as long as a migration needs the source to stand still.

The agent owns one `WriteGuards` for as long as it runs; a guard ends with the agent's process,
which the controller notices (tenant.dump with `require_guard` refuses without one).
"""

import threading

import psycopg
from psycopg import sql

from contract.failures import FailureKind

from ..errors import AgentError
from .dumps import tables_of
from .tenants import Tenant, write_grants


class WriteGuards:
    def __init__(self):
        self._held: dict[str, psycopg.Connection] = {}
        self._lock = threading.Lock()

    def lock(self, source_url: str, tenant: Tenant, key: str | None = None, lock_timeout: str = "15s") -> dict:
        """Holds writes to every tenant table at the database, whatever path they take; fails when
        a table's lock is not had within `lock_timeout` (a PostgreSQL duration: an open write holds it off).

        `source_url` logs in as the tenant's owner role, as every url named so here does, except
        for a guard on the dedicated database (a rollback), kept under its own `key`.
        """
        key = key or tenant.schema
        with self._lock:
            existing = self._held.get(key)
            if existing is not None and not existing.closed:
                return {"locked": True, "changed": False}
            conn = psycopg.connect(source_url, connect_timeout=10)
            try:
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (lock_timeout,))
                tables = tables_of(conn, tenant.schema)
                for name in tables:
                    conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(tenant.schema, name)))
            except psycopg.Error as exc:
                conn.close()
                raise AgentError(f"could not lock the tables of {tenant.schema}: {exc}", retryable=True,
                                 kind=FailureKind.UNAVAILABLE) from None
            self._held[key] = conn
            return {"locked": True, "changed": True, "tables": len(tables)}


    def held(self, tenant: Tenant, key: str | None = None) -> bool:
        conn = self._held.get(key or tenant.schema)
        return conn is not None and not conn.closed


    def unlock(self, source_url: str | None, tenant: Tenant, revoke_writes: bool, key: str | None = None) -> dict:
        """Releases the guard; with `revoke_writes` the source stays read-only for the tenant from then on.

        The revoke commits in the guard's own transaction, so no write slips in between; without a
        held guard it runs on a new session of `source_url` (fixed SQL: the cluster's own login will do).
        """
        with self._lock:
            conn = self._held.pop(key or tenant.schema, None)
        held = conn is not None and not conn.closed
        if not revoke_writes:
            if held:
                conn.close()
            return {"locked": False, "held": held, "source_read_only": False}
        target = conn if held else psycopg.connect(source_url, connect_timeout=10)
        try:
            # A savepoint: should the revoke fail, the guard's locks stay held and so does the guard.
            target.execute("SAVEPOINT before_freeze")
            exists = target.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (tenant.schema,)).fetchone()
            revoked = write_grants(target, tenant) if exists else []
            if exists:
                target.execute(sql.SQL("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA {} FROM {}")
                               .format(sql.Identifier(tenant.schema), sql.Identifier(tenant.runtime_role)))
            target.commit()
        except psycopg.Error as exc:
            if held and self._keep(tenant, target):
                raise AgentError(f"could not make {tenant.schema} read-only; the write guard stays held: {exc}",
                                 retryable=True, kind=FailureKind.UNAVAILABLE) from None
            target.close()
            raise AgentError(f"could not make {tenant.schema} read-only: {exc}", retryable=True,
                             kind=FailureKind.UNAVAILABLE) from None
        target.close()
        return {"locked": False, "held": held, "source_read_only": True, "revoked": revoked}

    def _keep(self, tenant: Tenant, conn: psycopg.Connection) -> bool:
        """Puts a guard whose freeze failed back, its locks still held; False when its session is gone."""
        try:
            conn.execute("ROLLBACK TO SAVEPOINT before_freeze")
        except psycopg.Error:
            return False
        with self._lock:
            self._held[tenant.schema] = conn
        return True

    def close(self) -> None:
        """Releases every guard (the agent is stopping)."""
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for conn in held:
            conn.close()
