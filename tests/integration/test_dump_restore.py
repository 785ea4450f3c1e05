"""Sanitizing real pg_dump output (15.18 emits \\restrict) and restoring it with the sanitized stream."""

import io
import shutil
import subprocess

import psycopg
import pytest
from psycopg import sql

from agent.dumps import libpq_env, sanitize

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
    clean = b"".join(sanitize(io.BytesIO(dump).read, 15))
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
