"""Tenants of the shared cluster (db role): bootstrap, create, drop, push, ledger.

Every identifier goes through psycopg.sql. A schema is touched only after its
comment says it belongs to the tenant at hand; a schema owned by another tenant is
an error, never reused.
"""

import re
import uuid
from dataclasses import dataclass

import psycopg
from psycopg import sql

from .apiroles import API_ROLES_AND_LEDGER
from .errors import AgentError
from .settings import DbSettings
from .ledger import MigrationFile, apply_files

_SHORT_ID = re.compile(r"^[0-9a-f]{12}$")
# One lock for changes to the cluster's tenant list (roles, schemas, exposed schemas).
_TENANTS_LOCK = 0x666C7874


@dataclass(frozen=True)
class Tenant:
    project_id: str
    short_id: str

    @classmethod
    def from_params(cls, params: dict) -> "Tenant":
        project_id, short_id = str(params.get("project_id", "")), str(params.get("short_id", ""))
        try:
            canonical = str(uuid.UUID(project_id))
        except ValueError:
            raise AgentError(f"invalid project id {project_id!r}", code="invalid") from None
        if not _SHORT_ID.match(short_id) or canonical.replace("-", "")[:12] != short_id:
            raise AgentError(f"short id {short_id!r} does not belong to project {project_id}", code="invalid")
        return cls(canonical, short_id)

    @property
    def schema(self) -> str:
        return f"t_{self.short_id}_api"

    @property
    def runtime_role(self) -> str:
        return f"t_{self.short_id}_role"

    @property
    def owner_role(self) -> str:
        return f"t_{self.short_id}_ddl"

    @property
    def comment(self) -> str:
        return f"tenant:{self.project_id}"


BOOTSTRAP = API_ROLES_AND_LEDGER + """
GRANT anon TO authenticator;
GRANT USAGE ON SCHEMA auth TO PUBLIC;
GRANT USAGE ON SCHEMA flux TO PUBLIC;
REVOKE ALL ON flux.flux_migrations FROM PUBLIC;
-- PostgREST's pre-request hook: a tenant's runtime role only ever sees its own schema.
CREATE OR REPLACE FUNCTION flux.pre_request() RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  tenant_schema text;
BEGIN
  IF current_user ~ '^t_[0-9a-f]{12}_role$' THEN
    tenant_schema := regexp_replace(current_user, '_role$', '_api');
    IF current_schema() IS DISTINCT FROM tenant_schema THEN
      RAISE EXCEPTION 'schema % is not exposed to this project', current_schema()
        USING ERRCODE = '42501';
    END IF;
    PERFORM set_config('search_path', quote_ident(tenant_schema), true);
  END IF;
END $$;
GRANT EXECUTE ON FUNCTION flux.pre_request() TO PUBLIC;
"""


def connect(settings: DbSettings) -> psycopg.Connection:
    try:
        return psycopg.connect(settings.shared_cluster_url, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise AgentError(f"cannot connect to the shared cluster: {str(exc).strip().splitlines()[0]}",
                         retryable=True) from None


def bootstrap(conn: psycopg.Connection, settings: DbSettings) -> None:
    """Idempotent cluster set-up for the pooled engine."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_TENANTS_LOCK,))
        conn.execute(BOOTSTRAP)
        if settings.authenticator_password:
            conn.execute(sql.SQL("ALTER ROLE authenticator PASSWORD {}").format(
                sql.Literal(settings.authenticator_password)))


def _schema_comment(conn, schema: str) -> tuple[bool, str | None]:
    row = conn.execute("SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = %s",
                       (schema,)).fetchone()
    return (row is not None, row[0] if row else None)


def _role_exists(conn, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def _check_owner(conn, tenant: Tenant) -> bool:
    """True when the schema exists and is this tenant's; an error when it is another's."""
    exists, comment = _schema_comment(conn, tenant.schema)
    if exists and comment != tenant.comment:
        raise AgentError(f"schema {tenant.schema} exists but belongs to another tenant "
                         f"(comment {comment!r}); refusing to touch it", code="conflict")
    return exists


def expose_tenant_schemas(conn) -> list[str]:
    """Points the pooled PostgREST at every tenant schema (in-database config) and reloads it."""
    rows = conn.execute(
        "SELECT nspname FROM pg_namespace WHERE obj_description(oid, 'pg_namespace') LIKE 'tenant:%%'"
        " ORDER BY nspname").fetchall()
    schemas = [r[0] for r in rows]
    if schemas:
        conn.execute(sql.SQL("ALTER ROLE authenticator SET pgrst.db_schemas = {}").format(
            sql.Literal(", ".join(schemas))))
    else:
        conn.execute("ALTER ROLE authenticator RESET pgrst.db_schemas")
    conn.execute("NOTIFY pgrst, 'reload config'")
    conn.execute("NOTIFY pgrst, 'reload schema'")
    return schemas


def create_tenant(conn, tenant: Tenant, settings: DbSettings) -> dict:
    steps = {}
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_TENANTS_LOCK,))
        schema_existed = _check_owner(conn, tenant)
        schema, role, owner = (sql.Identifier(n) for n in (tenant.schema, tenant.runtime_role, tenant.owner_role))
        for name, ident, extra in ((tenant.owner_role, owner, sql.SQL("")),
                                   (tenant.runtime_role, role, sql.SQL(" CONNECTION LIMIT {}").format(
                                       sql.Literal(settings.runtime_connection_limit)))):
            if _role_exists(conn, name):
                steps[f"role {name}"] = "ok"
            else:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN{}").format(ident, extra))
                steps[f"role {name}"] = "changed"
        conn.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = {}").format(
            role, sql.Literal(settings.runtime_statement_timeout)))
        conn.execute(sql.SQL("GRANT {} TO authenticator").format(role))
        if not schema_existed:
            conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(schema, owner))
            conn.execute(sql.SQL("COMMENT ON SCHEMA {} IS {}").format(schema, sql.Literal(tenant.comment)))
        steps[f"schema {tenant.schema}"] = "ok" if schema_existed else "changed"
        conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(schema))
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, role))
        for grant in ("GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {r}",
                      "GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {r}",
                      "GRANT EXECUTE ON FUNCTIONS TO {r}"):
            conn.execute(sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {o} IN SCHEMA {s} " + grant).format(
                o=owner, s=schema, r=role))
        expose_tenant_schemas(conn)
    return {"schema": tenant.schema, "runtime_role": tenant.runtime_role, "owner_role": tenant.owner_role,
            "steps": steps}


def drop_tenant(conn, tenant: Tenant) -> dict:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_TENANTS_LOCK,))
        existed = _check_owner(conn, tenant)
        if existed:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(tenant.schema)))
        conn.execute("DELETE FROM flux.flux_migrations WHERE tenant_schema = %s", (tenant.schema,))
        dropped = []
        for name in (tenant.runtime_role, tenant.owner_role):
            if _role_exists(conn, name):
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
                dropped.append(name)
        expose_tenant_schemas(conn)
    return {"schema_dropped": existed, "roles_dropped": dropped}


def push(conn, tenant: Tenant, files: list[MigrationFile], settings: DbSettings, dry_run: bool,
         progress=None) -> dict:
    """Applies files not yet in the ledger, in order, in one transaction, as the owner role."""
    exists, _ = _schema_comment(conn, tenant.schema)
    if exists:
        _check_owner(conn, tenant)
    else:
        raise AgentError(f"schema {tenant.schema} does not exist on the shared cluster", code="not_found")
    conn.rollback()
    return apply_files(conn, tenant.schema, files, settings.push_statement_timeout, dry_run,
                       run_as=tenant.owner_role, authenticated_as=tenant.runtime_role, progress=progress)
