"""Sanitizing real pg_dump output (15.18 emits \\restrict) and restoring it with the sanitized stream;
the dump file kept in the spool is encrypted."""

import hashlib
import io
import pathlib
import shutil
import subprocess
import time

import psycopg
import pytest
from psycopg import sql

from agent.adapters.dumpfile import read_sql
from agent.adapters.dumps import libpq_env
from agent.domain.dumpstream import dropped_lines, sanitize
from contract.failures import FailureKind

pytestmark = pytest.mark.integration

KEY = bytes(range(100, 132))


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
    from agent.adapters.tenants import Tenant

    return Tenant("0123abcd-0000-4000-8000-000000000000", "0123abcd0000")


def test_roles_the_schema_names_are_created_on_the_target(databases, tenant, tmp_path):
    from agent.adapters.transfer import move
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
        result = move(source, tenant, target)
        assert result["rows"] == 1 and result["kept"] is None
        with psycopg.connect(target) as conn:
            assert conn.execute(f"SELECT count(*) FROM {tenant.schema}.notes").fetchone() == (1,)
            assert conn.execute("SELECT has_table_privilege('auditor', %s, 'SELECT')",
                                (f"{tenant.schema}.notes",)).fetchone() == (True,)
    finally:
        remove_cluster(other)


def test_a_failing_copy_ends_the_job_with_the_targets_error_and_keeps_no_file(databases, tenant, tmp_path):
    from agent.adapters.transfer import move
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
        move(source, tenant, target, spool=tmp_path, name="fails", key=KEY)
    assert not (tmp_path / "dumps").exists()


def _tenant_source(source: str, tenant, extra: str) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA flux; CREATE TABLE flux.flux_migrations (tenant_schema text, version text,"
                     " filename text, checksum text, applied_at timestamptz DEFAULT now(),"
                     " PRIMARY KEY (tenant_schema, filename))")
        conn.execute(f"CREATE SCHEMA {tenant.schema}; SET search_path = {tenant.schema}; " + extra)


def _in_thread(work, seconds: float):
    """Runs `work` with a bound: a hang fails the test instead of hanging the suite."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["result"] = work()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def test_a_copy_printing_megabytes_of_warnings_does_not_deadlock(databases, tenant, tmp_path):
    from agent.adapters.transfer import move

    source, target = databases
    # The CHECK runs for each restored row of a_noisy, and psql prints the ~1 MB of warnings once
    # that table's COPY ends, while the 5 MB of b_bulk are still to be written to its stdin.
    _tenant_source(source, tenant,
                   "CREATE FUNCTION noisy(n int) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN"
                   "  RAISE WARNING 'row % %', n, repeat('w', 200); RETURN true; END $$;"
                   " SET client_min_messages = error;"
                   " CREATE TABLE a_noisy (id int CHECK (noisy(id)));"
                   " INSERT INTO a_noisy SELECT generate_series(1, 5000);"
                   " CREATE TABLE b_bulk (id int, body text);"
                   " INSERT INTO b_bulk SELECT g, repeat('b', 1000) FROM generate_series(1, 5000) g")
    _tenant_target(target)
    result = _in_thread(lambda: move(source, tenant, target, spool=tmp_path, name="noisy", expected_bytes=1 << 20,
                                     key=KEY), 120)
    assert result["rows"] == 10000 and pathlib.Path(result["kept"]["path"]).exists()
    with psycopg.connect(target) as conn:
        assert conn.execute(f"SELECT count(*) FROM {tenant.schema}.a_noisy").fetchone() == (5000,)
        assert conn.execute(f"SELECT count(*) FROM {tenant.schema}.b_bulk").fetchone() == (5000,)


def test_a_stuck_copy_fails_within_its_time_limit(databases, tenant, tmp_path):
    from agent.adapters.transfer import move
    from agent.errors import AgentError

    source, target = databases
    _tenant_source(source, tenant, "CREATE TABLE notes (id int); INSERT INTO notes VALUES (1)")
    _tenant_target(target)
    # Another session creating the same schema, uncommitted: the copy's CREATE SCHEMA waits on it.
    with psycopg.connect(target) as blocker:
        blocker.execute(f"CREATE SCHEMA {tenant.schema}")
        started = time.monotonic()
        with pytest.raises(AgentError, match=r"did not finish within 3s") as caught:
            _in_thread(lambda: move(source, tenant, target, spool=tmp_path, name="stuck", time_limit_s=3, key=KEY), 60)
        assert caught.value.kind == FailureKind.TIMEOUT
        assert time.monotonic() - started < 30
        blocker.rollback()
    assert not (tmp_path / "dumps").exists()
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT to_regclass(%s)", (f"{tenant.schema}.notes",)).fetchone() == (None,)


def test_the_kept_dump_file_restores_with_any_psql_into_any_server(databases, tenant, tmp_path):
    from agent.adapters.transfer import move

    source, target = databases
    _tenant_source(source, tenant, "CREATE TABLE notes (id int); INSERT INTO notes VALUES (1), (2)")
    _tenant_target(target)
    result = move(source, tenant, target, spool=tmp_path, name="anywhere", key=KEY)
    sql_text = b"".join(read_sql(result["kept"]["path"], KEY))
    # Made for later and for any psql and server: no meta-command an older psql rejects, no
    # setting an older server lacks.
    assert not any(line.startswith((b"\\restrict", b"\\unrestrict", b"SET transaction_timeout"))
                   for line in sql_text.splitlines())
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(tenant.schema)))
    restored = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction"], input=sql_text,
                              capture_output=True, env=libpq_env(target))
    assert restored.returncode == 0, restored.stderr.decode()
    with psycopg.connect(target) as conn:
        assert conn.execute(f"SELECT count(*) FROM {tenant.schema}.notes").fetchone() == (2,)


def test_the_kept_dump_file_is_encrypted_and_decrypts_to_the_sql_copied(databases, tenant, tmp_path):
    from agent.adapters.dumps import dump
    from agent.adapters.transfer import move
    from agent.errors import AgentError

    source, target = databases
    _tenant_source(source, tenant, "CREATE TABLE notes (id int, body text);"
                   " INSERT INTO notes SELECT g, 'marigold-' || g FROM generate_series(1, 50000) g")
    _tenant_target(target)
    result = move(source, tenant, target, spool=tmp_path, name="sealed", key=KEY)["kept"]
    path = pathlib.Path(result["path"])
    stored = path.read_bytes()
    assert path.name == "sealed.sql.enc" and (path.stat().st_mode & 0o077) == 0
    assert stored.startswith(b"FLUXDUMP") and b"marigold" not in stored and b"COPY" not in stored
    assert result["bytes"] == len(stored) and result["sha256"] == hashlib.sha256(stored).hexdigest()
    sql_text = b"".join(read_sql(path, KEY))
    assert b"marigold-49999" in sql_text and b"COPY " in sql_text
    assert result["sql_bytes"] == len(sql_text) and result["sql_sha256"] == hashlib.sha256(sql_text).hexdigest()
    with psycopg.connect(target) as conn:
        assert conn.execute(f"SELECT count(*) FROM {tenant.schema}.notes").fetchone() == (50000,)
    # A file the catalog knows under one key is never replaced by another dump.
    with pytest.raises(AgentError, match="exists already") as caught:
        dump(source, tenant, tmp_path, "sealed", key=bytes(32))
    assert caught.value.kind == FailureKind.CONFLICT and path.read_bytes() == stored


def test_a_write_guard_whose_freeze_fails_stays_held_until_the_freeze_succeeds(databases, tenant):
    """After cutover the pooled copy is frozen in the guard's own transaction; when that fails, the
    guard keeps holding writes (the controller keeps the project in maintenance and resumes later)."""
    from agent.adapters.guards import WriteGuards
    from agent.errors import AgentError

    source = databases[0]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {tenant.runtime_role}")
        conn.execute(f"CREATE SCHEMA {tenant.schema}; CREATE TABLE {tenant.schema}.notes (id int)")
    guards = WriteGuards()
    assert guards.lock(source, tenant)["changed"] is True
    try:
        # The runtime role does not exist, so the revoke fails inside the guard's transaction.
        with pytest.raises(AgentError, match="the write guard stays held") as caught:
            guards.unlock(source, tenant, revoke_writes=True)
        assert caught.value.retryable and caught.value.kind == FailureKind.UNAVAILABLE
        assert guards.held(tenant)
        with psycopg.connect(source, autocommit=True) as writer:
            writer.execute("SET lock_timeout = '500ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                writer.execute(f"INSERT INTO {tenant.schema}.notes VALUES (1)")
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {tenant.runtime_role}")
            conn.execute(f"GRANT INSERT ON {tenant.schema}.notes TO {tenant.runtime_role}")
        # The write grants it revoked are reported, so the freeze can record them for a rollback.
        assert guards.unlock(source, tenant, revoke_writes=True) == {"locked": False, "held": True,
                                                                     "source_read_only": True,
                                                                     "revoked": [("notes", "INSERT")]}
        assert not guards.held(tenant)
        with psycopg.connect(source, autocommit=True) as conn:
            assert conn.execute("SELECT has_table_privilege(%s, %s, 'INSERT')",
                                (tenant.runtime_role, f"{tenant.schema}.notes")).fetchone() == (False,)
    finally:
        guards.close()
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {tenant.schema} CASCADE")
            conn.execute(f"DROP ROLE IF EXISTS {tenant.runtime_role}")


def test_a_write_guard_gives_up_after_the_lock_wait_it_is_given(databases, tenant):
    """An open write holds the guard off; the guard stops waiting after its `lock_timeout`
    (db.write_guard_lock_timeout), not after the 15 s default, and holds nothing then."""
    from agent.adapters.guards import WriteGuards
    from agent.errors import AgentError

    source = databases[0]
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {tenant.schema}; CREATE TABLE {tenant.schema}.notes (id int)")
    guards = WriteGuards()
    try:
        with psycopg.connect(source) as writer:
            writer.execute(f"INSERT INTO {tenant.schema}.notes VALUES (1)")  # open: its lock stays
            started = time.monotonic()
            with pytest.raises(AgentError, match="could not lock the tables .*lock timeout") as caught:
                guards.lock(source, tenant, lock_timeout="1s")
            waited = time.monotonic() - started
        assert waited < 10, waited
        assert caught.value.retryable and not guards.held(tenant)
    finally:
        guards.close()
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {tenant.schema} CASCADE")


def test_only_the_kept_copy_of_a_migrated_project_is_dumped_as_the_agents_role(databases, tenant, tmp_path):
    """After an offline cutover the dump file is written from the frozen pooled copy, whose owner
    logs in no more; the agent reads it as its own role then, and never a live tenant that way."""
    from agent.adapters.dumps import dump
    from agent.adapters.tenants import freeze, kept_copy_reader
    from agent.errors import AgentError

    source = databases[0]
    with psycopg.connect(source, autocommit=True) as conn:
        for role in (tenant.owner_role, tenant.runtime_role):
            conn.execute(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN")
        conn.execute("CREATE SCHEMA flux_private; CREATE TABLE flux_private.frozen_grants (schema_name text,"
                     " table_name text, privilege text, PRIMARY KEY (schema_name, table_name, privilege))")
        conn.execute(f"CREATE SCHEMA {tenant.schema} AUTHORIZATION {tenant.owner_role};"
                     f" COMMENT ON SCHEMA {tenant.schema} IS '{tenant.comment}';"
                     f" CREATE TABLE {tenant.schema}.notes (id int, body text);"
                     f" ALTER TABLE {tenant.schema}.notes OWNER TO {tenant.owner_role};"
                     f" INSERT INTO {tenant.schema}.notes VALUES (1, 'kept-row')")
    try:
        with psycopg.connect(source, autocommit=True) as conn:
            with pytest.raises(AgentError, match="is not the kept read-only copy") as caught:
                kept_copy_reader(conn, tenant, source)
            assert caught.value.kind == FailureKind.CONFLICT
            freeze(conn, tenant)
            reader = kept_copy_reader(conn, tenant, source)
            assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s",
                                (tenant.owner_role,)).fetchone() == (False,)
        result = dump(reader, tenant, tmp_path, "kept", key=KEY)
        assert b"kept-row" in b"".join(read_sql(result["path"], KEY))
    finally:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {tenant.schema} CASCADE; DROP SCHEMA IF EXISTS flux_private CASCADE")
            for role in (tenant.owner_role, tenant.runtime_role):
                conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
def small_spool(tmp_path):
    """A spool on a disk of its own, 1 MiB: a dump fills it."""
    from tests.support import small_disk

    with small_disk(tmp_path / "spool") as spool:
        yield spool


def test_a_dump_that_fills_the_spools_disk_fails_with_what_is_free_and_gives_the_room_back(
        databases, tenant, small_spool):
    from agent.adapters.transfer import move
    from agent.errors import AgentError

    source, target = databases
    # md5 text does not compress: encrypted, the dump is about as large as the table's text (3 MB).
    _tenant_source(source, tenant, "CREATE TABLE notes (id int, body text);"
                   " INSERT INTO notes SELECT g, md5(g::text) || md5((g * 7)::text) FROM generate_series(1, 40000) g")
    _tenant_target(target)
    with pytest.raises(AgentError) as caught:
        move(source, tenant, target, spool=small_spool, name="toobig", key=KEY)
    message = str(caught.value)
    assert f"the dump of {tenant.schema} could not be kept in the spool {small_spool}" in message
    assert "No space left on device" in message and "nothing of it was kept" in message
    assert not caught.value.retryable
    # The partial file is gone (and its tenant's directory): the disk has its room back.
    assert [p for p in small_spool.rglob("*") if not p.is_dir()] == []
    assert not (small_spool / "dumps" / tenant.schema).exists()
    assert shutil.disk_usage(small_spool).used < 64 * 1024
