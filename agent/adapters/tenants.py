"""Tenants of the shared cluster (db role): bootstrap, create, drop, push, ledger.

Every identifier goes through psycopg.sql. A schema is touched only after its
comment says it belongs to the tenant at hand; a schema owned by another tenant is
an error, never reused.

The agent's own connection is the cluster's superuser; it only ever runs fixed SQL.
Everything scoped to one tenant (push, the ledger, preflight, the write guard, dump,
verify) runs in a session that *logs in* as the tenant's owner role, so nothing a
tenant writes (`set_config('role', ...)`, `RESET ROLE`, `SET SESSION AUTHORIZATION`,
functions with a `SET role` clause) can reach a role beyond that one tenant.
"""

import base64
import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass

import psycopg
from psycopg import conninfo, sql

from contract import names
from contract.failures import FailureKind
from contract.tenants import TenantRef

from .apiroles import API_ROLES_AND_LEDGER
from ..errors import AgentError
from ..runtime.settings import DbSettings
from .ledger import MigrationFile, apply_files

_SHORT_ID = re.compile(r"^[0-9a-f]{12}$")
# One lock for changes to the cluster's tenant list (roles, schemas, exposed schemas).
_TENANTS_LOCK = 0x666C7874
# Sessions a tenant's owner role may hold at once: a push, a guard, a dump and a verify.
OWNER_CONNECTION_LIMIT = 8


@dataclass(frozen=True)
class Tenant:
    project_id: str
    short_id: str

    @classmethod
    def from_params(cls, params: TenantRef) -> "Tenant":
        project_id, short_id = params.project_id, params.short_id
        try:
            canonical = str(uuid.UUID(project_id))
        except ValueError:
            raise AgentError(f"invalid project id {project_id!r}", kind=FailureKind.INVALID) from None
        if not _SHORT_ID.match(short_id) or names.short_id(canonical) != short_id:
            raise AgentError(f"short id {short_id!r} does not belong to project {project_id}",
                             kind=FailureKind.INVALID)
        return cls(canonical, short_id)

    @property
    def schema(self) -> str:
        return names.tenant_schema(self.short_id)

    @property
    def runtime_role(self) -> str:
        return names.runtime_role(self.short_id)

    @property
    def owner_role(self) -> str:
        return names.owner_role(self.short_id)

    @property
    def comment(self) -> str:
        return names.tenant_comment(self.project_id)


BOOTSTRAP = API_ROLES_AND_LEDGER + """
GRANT anon TO authenticator;
GRANT USAGE ON SCHEMA auth TO PUBLIC;
GRANT USAGE ON SCHEMA flux TO PUBLIC;
REVOKE ALL ON flux.flux_migrations FROM PUBLIC;
-- Tenant roles get nothing on the database or its public schema: no new schemas, no temp tables.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
-- The pooled PostgREST's login role may only become anon and tenant runtime roles.
DO $$
DECLARE
  granted record;
BEGIN
  FOR granted IN SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
                 WHERE m.member = 'authenticator'::regrole
                   AND r.rolname <> 'anon' AND r.rolname !~ '^t_[0-9a-f]{12}_role$' LOOP
    EXECUTE format('REVOKE %I FROM authenticator', granted.rolname);
  END LOOP;
END $$;
ALTER ROLE anon NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
-- A tenant's owner session sees and adds its own ledger rows only.
ALTER TABLE flux.flux_migrations ENABLE ROW LEVEL SECURITY;
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_policies WHERE schemaname = 'flux' AND tablename = 'flux_migrations'
                 AND policyname = 'own_tenant') THEN
    CREATE POLICY own_tenant ON flux.flux_migrations
      USING (tenant_schema = regexp_replace(session_user, '^(t_[0-9a-f]{12})_ddl$', '\\1_api'))
      WITH CHECK (tenant_schema = regexp_replace(session_user, '^(t_[0-9a-f]{12})_ddl$', '\\1_api'));
  END IF;
END $$;
-- The key tenant login passwords are derived from; only superusers read it.
CREATE SCHEMA IF NOT EXISTS flux_private;
REVOKE ALL ON SCHEMA flux_private FROM PUBLIC;
CREATE TABLE IF NOT EXISTS flux_private.login_key (id int PRIMARY KEY CHECK (id = 1), key bytea NOT NULL);
REVOKE ALL ON flux_private.login_key FROM PUBLIC;
-- The write grants a frozen copy's runtime role had, so a rollback can give them back.
CREATE TABLE IF NOT EXISTS flux_private.frozen_grants (schema_name text NOT NULL, table_name text NOT NULL,
  privilege text NOT NULL, PRIMARY KEY (schema_name, table_name, privilege));
REVOKE ALL ON flux_private.frozen_grants FROM PUBLIC;
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
                         retryable=True, kind=FailureKind.UNAVAILABLE) from None


def bootstrap(conn: psycopg.Connection, settings: DbSettings) -> None:
    """Idempotent cluster set-up for the pooled engine."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_TENANTS_LOCK,))
        conn.execute(BOOTSTRAP)
        conn.execute(sql.SQL("REVOKE CREATE, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
            sql.Identifier(conn.info.dbname)))
        conn.execute("INSERT INTO flux_private.login_key (id, key) VALUES (1, %s) ON CONFLICT DO NOTHING",
                     (secrets.token_bytes(32),))
        if settings.authenticator_password:
            conn.execute(sql.SQL("ALTER ROLE authenticator PASSWORD {}").format(
                sql.Literal(scram_verifier(settings.authenticator_password))))


# tenant logins

SCRAM_ITERATIONS = 4096


def scram_verifier(password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores, so no password travels to the server in clear."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _verifier_matches(verifier: str | None, password: str) -> bool:
    match = re.match(r"^SCRAM-SHA-256\$(\d+):([^$]+)\$", verifier or "")
    if not match:
        return False
    expected = scram_verifier(password, base64.b64decode(match.group(2)), int(match.group(1)))
    return hmac.compare_digest(expected, verifier)


def tenant_login(conn, settings: DbSettings, tenant: "Tenant") -> str:
    """A connection string that logs in as the tenant's owner role, which can reach nothing else.

    The owner role gets LOGIN and a password derived from the cluster's login key (so any
    db agent of the cluster derives the same one); tenants created before logins existed are
    converted here, on their first scoped job.
    """
    key = conn.execute("SELECT key FROM flux_private.login_key WHERE id = 1").fetchone()
    if key is None:
        # Every job bootstraps the cluster before it logs in: sending it again would not help.
        raise AgentError("the shared cluster is not bootstrapped (no login key)")
    password = hmac.new(bytes(key[0]), tenant.owner_role.encode(), "sha256").hexdigest()
    row = conn.execute("SELECT rolcanlogin, rolpassword, shobj_description(oid, 'pg_authid') FROM pg_authid"
                       " WHERE rolname = %s", (tenant.owner_role,)).fetchone()
    if row is None:
        conn.rollback()
        raise AgentError(f"role {tenant.owner_role} does not exist on the shared cluster", kind=FailureKind.NOT_FOUND)
    if row[2] == FROZEN:
        conn.rollback()
        raise AgentError(f"{tenant.schema} is the kept read-only copy of a migrated project: nothing logs in as "
                         "its owner any more; `flux migrate cleanup` drops it", kind=FailureKind.CONFLICT)
    owner = sql.Identifier(tenant.owner_role)
    with conn.transaction():
        revoke_self_grants(conn, tenant)
        if not row[0] or not _verifier_matches(row[1], password):
            conn.execute(sql.SQL(
                "ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
                " CONNECTION LIMIT {} PASSWORD {}").format(
                    owner, sql.Literal(OWNER_CONNECTION_LIMIT), sql.Literal(scram_verifier(password))))
        conn.execute(sql.SQL("GRANT SELECT, INSERT ON flux.flux_migrations TO {}").format(owner))
    return conninfo.make_conninfo(settings.shared_cluster_url, user=tenant.owner_role, password=password,
                                  connect_timeout=10)


def revoke_self_grants(conn, tenant: "Tenant") -> list[str]:
    """Takes back memberships in the tenant's roles: PostgreSQL before 16 lets a session user grant
    its own role, and a tenant role must never be reachable from another role."""
    revoked = []
    for role in (tenant.owner_role, tenant.runtime_role):
        members = conn.execute(
            "SELECT mr.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
            " JOIN pg_roles mr ON mr.oid = m.member WHERE r.rolname = %s", (role,)).fetchall()
        for (member,) in members:
            if role == tenant.runtime_role and member == "authenticator":
                continue
            conn.execute(sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(role), sql.Identifier(member)))
            revoked.append(f"{role} from {member}")
    return revoked


FROZEN = "flux: kept read-only copy of a migrated project"


def is_frozen(conn, tenant: "Tenant") -> bool:
    row = conn.execute("SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
                       (tenant.owner_role,)).fetchone()
    conn.rollback()
    return row is not None and row[0] == FROZEN


WRITE_PRIVILEGES = ("INSERT", "UPDATE", "DELETE", "TRUNCATE")


def kept_copy_reader(conn, tenant: "Tenant", admin_url: str) -> str:
    """The connection string a dump of the kept read-only copy of a migrated project reads with:
    the agent's own, as the copy's owner logs in no more. Never for a live tenant, which is only
    ever read as itself."""
    if not is_frozen(conn, tenant):
        raise AgentError(f"{tenant.schema} is not the kept read-only copy of a migrated project",
                         kind=FailureKind.CONFLICT)
    return admin_url


def write_grants(conn, tenant: "Tenant") -> list[tuple[str, str]]:
    """(table, privilege) for each write privilege the tenant's runtime role holds on its tables."""
    return [(t, p) for t, p in conn.execute(
        "SELECT c.relname, a.privilege_type FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,"
        " aclexplode(c.relacl) a WHERE n.nspname = %s AND c.relkind IN ('r', 'p')"
        " AND a.grantee = (SELECT oid FROM pg_roles WHERE rolname = %s) AND a.privilege_type = ANY(%s)",
        (tenant.schema, tenant.runtime_role, list(WRITE_PRIVILEGES))).fetchall()]


def freeze(conn, tenant: "Tenant", revoked: list | None = None) -> dict:
    """After cutover: no tenant role writes the pooled copy again, its owner included (it can no
    longer log in, so it cannot grant itself back what is revoked here). The runtime role's write
    grants are recorded first (`revoked`: those a guard revoked before), for `thaw`. Returns the
    copy's size."""
    with conn.transaction():
        for table, privilege in [*(revoked or []), *write_grants(conn, tenant)]:
            conn.execute("INSERT INTO flux_private.frozen_grants VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                         (tenant.schema, table, privilege))
        if _check_owner(conn, tenant):
            conn.execute(sql.SQL("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA {} FROM {}, {}")
                         .format(sql.Identifier(tenant.schema), sql.Identifier(tenant.runtime_role),
                                 sql.Identifier(tenant.owner_role)))
        if _role_exists(conn, tenant.owner_role):
            conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(tenant.owner_role)))
            conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(tenant.owner_role),
                                                                    sql.Literal(FROZEN)))
        size = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'm')",
            (tenant.schema,)).fetchone()[0]
    return {"frozen": True, "bytes": int(size)}


def cancel_autovacuum(conn, tenant: "Tenant") -> int:
    """Cancels autovacuum on the tenant's tables, which would hold a write guard's LOCK back until
    it is cancelled by itself (after deadlock_timeout, a second by default): after a bulk load it
    is usually there. It starts again later; nothing is lost."""
    cancelled = conn.execute(
        "SELECT count(pg_cancel_backend(a.pid)) FROM pg_stat_activity a WHERE a.backend_type = 'autovacuum worker'"
        " AND EXISTS (SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE l.pid = a.pid AND n.nspname = %s)",
        (tenant.schema,)).fetchone()[0]
    conn.commit()
    return cancelled


def thaw(conn, tenant: "Tenant") -> dict:
    """Undoes `freeze` (a rollback to the pooled engine): the owner logs in and writes again, and the
    runtime role gets back the write grants it had."""
    with conn.transaction():
        if not _check_owner(conn, tenant):
            raise AgentError(f"{tenant.schema} is not there to take writes again", kind=FailureKind.NOT_FOUND)
        conn.execute(sql.SQL("GRANT INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA {} TO {}")
                     .format(sql.Identifier(tenant.schema), sql.Identifier(tenant.owner_role)))
        grants = conn.execute("SELECT table_name, privilege FROM flux_private.frozen_grants WHERE schema_name = %s",
                              (tenant.schema,)).fetchall()
        for table, privilege in grants:
            if privilege in WRITE_PRIVILEGES and conn.execute("SELECT to_regclass(%s)", (
                    sql.Identifier(tenant.schema, table).as_string(conn),)).fetchone()[0] is not None:
                conn.execute(sql.SQL("GRANT {} ON {} TO {}").format(
                    sql.SQL(privilege), sql.Identifier(tenant.schema, table), sql.Identifier(tenant.runtime_role)))
        conn.execute("DELETE FROM flux_private.frozen_grants WHERE schema_name = %s", (tenant.schema,))
        conn.execute(sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(tenant.owner_role)))
        conn.execute(sql.SQL("COMMENT ON ROLE {} IS NULL").format(sql.Identifier(tenant.owner_role)))
    return {"thawed": True, "grants": len(grants)}


def connect_as_tenant(url: str) -> psycopg.Connection:
    try:
        return psycopg.connect(url)
    except psycopg.OperationalError as exc:
        raise AgentError(f"cannot log in to the shared cluster as the tenant: "
                         f"{str(exc).strip().splitlines()[0]}", retryable=True, kind=FailureKind.UNAVAILABLE) from None


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
                         f"(comment {comment!r}); refusing to touch it", kind=FailureKind.CONFLICT)
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


def drop_tenant(conn, tenant: Tenant, lock_timeout: str = "10s") -> dict:
    with conn.transaction():
        # A session holding a lock on a tenant table fails the drop in seconds rather than hanging it.
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (lock_timeout,))
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
    """Applies files not yet in the ledger, in order, in one transaction.

    `conn` is logged in as the tenant's owner role (`tenant_login`), never a superuser.
    """
    exists, _ = _schema_comment(conn, tenant.schema)
    if exists:
        _check_owner(conn, tenant)
    else:
        raise AgentError(f"schema {tenant.schema} does not exist on the shared cluster", kind=FailureKind.NOT_FOUND)
    conn.rollback()
    return apply_files(conn, tenant.schema, files, settings.push_statement_timeout, dry_run,
                       authenticated_as=tenant.runtime_role, progress=progress)
