"""Sanitizing real pg_dump output (15.18 emits \\restrict) and restoring it with the sanitized stream."""

import io
import pathlib
import shutil
import subprocess

import psycopg
import pytest
from psycopg import sql

from agent.dumps import dropped_lines, libpq_env, sanitize

pytestmark = pytest.mark.integration


@pytest.fixture
def databases(pg_cluster):
    names = ["dump_src", "dump_dst"]
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield [pg_cluster.url(n) for n in names]
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.mark.skipif(shutil.which("pg_dump") is None, reason="pg_dump is not installed")
def test_real_pg_dump_output_is_sanitized_and_restores(databases):
    source, target = databases
    with psycopg.connect(source) as conn:
        conn.execute("CREATE SCHEMA t_0123456789ab_api; CREATE TABLE t_0123456789ab_api.notes"
                     " (id serial PRIMARY KEY, body text); INSERT INTO t_0123456789ab_api.notes (body)"
                     " VALUES (E'\\\\restrict in data'), ('plain')")
    dump = subprocess.run(["pg_dump", "--schema", "t_0123456789ab_api"], capture_output=True, check=True,
                          env=libpq_env(source)).stdout
    clean = b"".join(sanitize(io.BytesIO(dump).read, dropped_lines("15.13", 15)))
    assert not any(line.startswith((b"\\restrict", b"\\unrestrict")) for line in clean.splitlines())
    restore = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction"], input=clean,
                             capture_output=True, env=libpq_env(target))
    assert restore.returncode == 0, restore.stderr
    with psycopg.connect(target) as conn:
        rows = conn.execute("SELECT body FROM t_0123456789ab_api.notes ORDER BY id").fetchall()
    assert rows == [("\\restrict in data",), ("plain",)]


@pytest.mark.skipif(shutil.which("pg_dump") is None, reason="pg_dump is not installed")
def test_pg_dump_15_18_emits_restrict(databases):
    version = subprocess.run(["pg_dump", "--version"], capture_output=True, text=True).stdout
    if "15.18" not in version:
        pytest.skip(f"this check is about pg_dump 15.18; installed: {version.strip()}")
    dump = subprocess.run(["pg_dump"], capture_output=True, check=True, env=libpq_env(databases[0])).stdout
    assert dump.splitlines()[0].startswith(b"\\restrict") or b"\n\\restrict " in dump


def _tenant_target(target: str) -> None:
    with psycopg.connect(target) as conn:
        for role in ("authenticator", "authenticated"):  # roles are per cluster; tests may share one
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute("CREATE SCHEMA flux;"
                     " CREATE TABLE flux.flux_migrations (tenant_schema text, version text, filename text,"
                     " checksum text, applied_at timestamptz DEFAULT now(), PRIMARY KEY (tenant_schema, filename))")


@pytest.fixture
def tenant():
    from agent.tenants import Tenant

    return Tenant("0123abcd-0000-4000-8000-000000000000", "0123abcd0000")


def test_roles_the_dump_names_are_created_on_the_target(databases, tenant, tmp_path):
    from agent.dumps import dump
    from tests.support import remove_cluster, test_cluster

    source = databases[0]
    other = test_cluster(tmp_path)  # roles are per cluster: the target must be another one
    target = other.url()
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA flux; CREATE TABLE flux.flux_migrations (tenant_schema text, version text,"
                     " filename text, checksum text, applied_at timestamptz DEFAULT now(),"
                     " PRIMARY KEY (tenant_schema, filename))")
        conn.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'auditor') THEN"
                     f" CREATE ROLE auditor; END IF; END $$; CREATE SCHEMA {tenant.schema};"
                     f" CREATE TABLE {tenant.schema}.notes (id int); INSERT INTO {tenant.schema}.notes VALUES (1);"
                     f" GRANT SELECT ON {tenant.schema}.notes TO auditor")
    try:
        _tenant_target(target)
        with psycopg.connect(target) as conn:
            assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = 'auditor'").fetchone() == (0,)
        result = dump(source, tenant, tmp_path, "roles", target)
        assert result["restored"] is True
        with psycopg.connect(target) as conn:
            assert conn.execute(f"SELECT count(*) FROM {tenant.schema}.notes").fetchone() == (1,)
            assert conn.execute("SELECT has_table_privilege('auditor', %s, 'SELECT')",
                                (f"{tenant.schema}.notes",)).fetchone() == (True,)
    finally:
        remove_cluster(other)


def test_a_failing_restore_ends_the_job_with_psqls_error(databases, tenant, tmp_path):
    from agent.dumps import dump
    from agent.errors import AgentError

    source, target = databases
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA flux; CREATE TABLE flux.flux_migrations (tenant_schema text, version text,"
                     " filename text, checksum text, applied_at timestamptz DEFAULT now(),"
                     " PRIMARY KEY (tenant_schema, filename))")
        # A type outside the tenant schema: the dump refers to it but does not carry it.
        conn.execute(f"CREATE TYPE public.mood AS ENUM ('ok', 'meh'); CREATE SCHEMA {tenant.schema};"
                     f" CREATE TABLE {tenant.schema}.feelings (id int, mood public.mood);"
                     f" INSERT INTO {tenant.schema}.feelings SELECT g, 'ok' FROM generate_series(1, 200000) g")
    _tenant_target(target)
    with pytest.raises(AgentError, match='type "public.mood" does not exist'):
        dump(source, tenant, tmp_path, "fails", target)
    assert list((tmp_path / "dumps").iterdir()) == []


def _tenant_source(source: str, tenant, extra: str) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA flux; CREATE TABLE flux.flux_migrations (tenant_schema text, version text,"
                     " filename text, checksum text, applied_at timestamptz DEFAULT now(),"
                     " PRIMARY KEY (tenant_schema, filename))")
        conn.execute(f"CREATE SCHEMA {tenant.schema}; SET search_path = {tenant.schema}; " + extra)


def test_the_psql_that_restores_decides_on_restrict(databases, tenant, tmp_path):
    from agent.dumps import dump, psql_understands_restrict, tool_version

    if not psql_understands_restrict(tool_version("psql")):
        pytest.skip(f"this check needs a psql that knows \\restrict; installed: {tool_version('psql')}")
    source, target = databases
    _tenant_source(source, tenant, "CREATE TABLE notes (id int); INSERT INTO notes VALUES (1)")
    _tenant_target(target)
    result = dump(source, tenant, tmp_path, "restrict", target, target_major=15)
    lines = pathlib.Path(result["path"]).read_bytes().splitlines()
    # The target server is 15, yet psql keeps the dump's protection; the 17-only setting goes.
    assert any(line.startswith(b"\\restrict ") for line in lines)
    assert not any(line.startswith(b"SET transaction_timeout") for line in lines)
    with psycopg.connect(target) as conn:
        assert conn.execute(f"SELECT count(*) FROM {tenant.schema}.notes").fetchone() == (1,)
