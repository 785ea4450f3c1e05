"""The online sync's change stream (agent/adapters/changes.py) between two real clusters: the
copy from the slot's snapshot plus the applied stream equal the source, whatever the changes."""

import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from agent.adapters import changes
from agent.adapters.dumps import libpq_env
from agent.adapters.tenants import Tenant
from contract import names
from tests import support
from tests.support import remove_cluster, wait_until


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    source = support.test_cluster(tmp_path_factory.mktemp("src"), wal_level="logical")
    target = support.test_cluster(tmp_path_factory.mktemp("dst"))
    yield source, target
    remove_cluster(source)
    remove_cluster(target)


def new_tenant() -> Tenant:
    project_id = str(uuid.uuid4())
    return Tenant(project_id, names.short_id(project_id))


SCHEMA = """
CREATE SCHEMA {s};
CREATE TYPE {s}.mood AS ENUM ('ok', 'sad');
CREATE TABLE {s}.items (id bigserial PRIMARY KEY, body text, big text, tags text[], doc jsonb, mood {s}.mood,
                        raw bytea, at timestamptz DEFAULT now(), n numeric(12, 3),
                        twice bigint GENERATED ALWAYS AS (id * 2) STORED);
CREATE TABLE {s}.pairs (a int, b int, note text, PRIMARY KEY (a, b));
CREATE TABLE {s}.loose (x int, y text);
ALTER TABLE {s}.loose REPLICA IDENTITY FULL;
INSERT INTO {s}.items (body) SELECT 'before ' || g FROM generate_series(1, 50) g;
"""


def fingerprint(url: str, schema: str) -> dict:
    with psycopg.connect(url) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE nspname = %s AND relkind = 'r' ORDER BY 1", (schema,))]
        return {t: conn.execute(f"SELECT count(*), coalesce(sum(hashtextextended(x::text, 0)), 0)"
                                f" FROM {schema}.{t} x").fetchone() for t in tables}


def start_sync(source, target, tenant: Tenant, **kwargs) -> changes.Follow:
    admin = source.url("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(SCHEMA.format(s=tenant.schema))
    with psycopg.connect(target.url("postgres"), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA IF NOT EXISTS flux")
    replication, snapshot, _ = changes.create_slot(admin, tenant)
    # Writes after the slot's consistent point: in the stream, not in the copy.
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {tenant.schema}.items (body) VALUES ('after slot')")
    dump = subprocess.run(["pg_dump", "--snapshot", snapshot, "--schema", tenant.schema, "--no-publications"],
                          capture_output=True, env=libpq_env(admin), check=True).stdout
    replication.close()
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"], input=dump, check=True,
                   env=libpq_env(target.url("postgres")), capture_output=True)
    return changes.Follow(tenant, admin, target.url("postgres"), **kwargs).start()


def test_copy_and_stream_equal_the_source(clusters):
    source, target = clusters
    tenant = new_tenant()
    s = tenant.schema
    follow = start_sync(source, target, tenant)
    try:
        with psycopg.connect(source.url("postgres"), autocommit=True) as conn:
            conn.execute(f"INSERT INTO {s}.items (body, big, tags, doc, mood, raw, n) VALUES"
                         f" ('x', repeat('toast', 40000), ARRAY['a', 'b,c', NULL], '{{\"k\": [1, 2]}}', 'sad',"
                         f" '\\x00ff'::bytea, 3.25)")
            conn.execute(f"UPDATE {s}.items SET body = 'kept toast' WHERE big IS NOT NULL")  # big unchanged: 'u'
            conn.execute(f"UPDATE {s}.items SET id = 1000 WHERE id = 2")  # the key changes
            conn.execute(f"DELETE FROM {s}.items WHERE id BETWEEN 10 AND 20")
            conn.execute(f"INSERT INTO {s}.pairs VALUES (1, 1, 'one'), (1, 2, 'two'), (2, 1, NULL)")
            conn.execute(f"UPDATE {s}.pairs SET note = 'changed' WHERE a = 1")
            conn.execute(f"INSERT INTO {s}.loose VALUES (1, 'same'), (1, 'same'), (2, NULL)")
            conn.execute(f"DELETE FROM {s}.loose WHERE ctid = (SELECT ctid FROM {s}.loose WHERE x = 1 LIMIT 1)")
            conn.execute(f"UPDATE {s}.loose SET y = 'was null' WHERE x = 2")
            with conn.transaction():
                for i in range(200):
                    conn.execute(f"INSERT INTO {s}.items (body) VALUES (%s)", (f"tx {i}",))
            conn.execute(f"TRUNCATE {s}.pairs")
            conn.execute(f"INSERT INTO {s}.pairs VALUES (9, 9, 'after truncate')")
        lsn = changes.pause_lsn(source.url("postgres"))
        result = follow.drain(lsn, timeout=30)
        assert result["lsn"] == lsn and not follow.running and follow.error is None
        assert fingerprint(source.url("postgres"), s) == fingerprint(target.url("postgres"), s)
        with psycopg.connect(target.url("postgres")) as conn:
            assert conn.execute(f"SELECT body FROM {s}.items WHERE id = 51").fetchone() == ("after slot",)
            assert conn.execute(f"SELECT length(big), body FROM {s}.items WHERE big IS NOT NULL").fetchone() \
                == (200000, "kept toast")
            assert conn.execute("SELECT lsn::text FROM flux.sync_position WHERE slot = %s",
                                (changes.slot_name(tenant),)).fetchone()[0] == follow.applied_lsn
        assert changes.set_sequences(source.url("postgres"), tenant, target.url("postgres")) == 1
        with psycopg.connect(target.url("postgres")) as conn:
            assert conn.execute(f"SELECT last_value, is_called FROM {s}.items_id_seq").fetchone() == (252, True)
    finally:
        follow.stop()
        changes.drop_slot(source.url("postgres"), tenant)


def test_a_restarted_follower_applies_each_transaction_once(clusters):
    source, target = clusters
    tenant = new_tenant()
    s = tenant.schema
    admin = source.url("postgres")
    follow = start_sync(source, target, tenant)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            for i in range(30):
                conn.execute(f"INSERT INTO {s}.items (body) VALUES (%s)", (f"first {i}",))
        wait_until(lambda: follow.transactions >= 31, 30, "the first writes applied")
        follow.stop()
        # The target has what the slot has not confirmed yet: as if the agent stopped in between.
        with psycopg.connect(admin, autocommit=True) as conn:
            confirmed = changes.slot_state(conn, tenant)["confirmed_lsn"]
            for i in range(30):
                conn.execute(f"INSERT INTO {s}.items (body) VALUES (%s)", (f"second {i}",))
        second = changes.Follow(tenant, admin, target.url("postgres")).start()
        lsn = changes.pause_lsn(admin)
        second.drain(lsn, timeout=30)
        assert second.applied_lsn and second.transactions == 30 and confirmed
        assert fingerprint(admin, s) == fingerprint(target.url("postgres"), s)
    finally:
        changes.drop_slot(admin, tenant)


def test_a_change_the_target_cannot_take_stops_the_sync_and_drops_its_slot(clusters):
    source, target = clusters
    tenant = new_tenant()
    s = tenant.schema
    admin = source.url("postgres")
    follow = start_sync(source, target, tenant)
    with psycopg.connect(target.url("postgres"), autocommit=True) as conn:
        conn.execute(f"DELETE FROM {s}.items WHERE id = 5")  # the copies differ now
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"UPDATE {s}.items SET body = 'lost?' WHERE id = 5")
    wait_until(lambda: not follow.running, 30, "the sync to stop")
    assert "has no row of items for a source update" in follow.error
    with psycopg.connect(admin) as conn:
        assert changes.slot_state(conn, tenant) is None
        assert conn.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s",
                            (changes.slot_name(tenant),)).fetchone()[0] == 0


def test_the_lag_guard_drops_a_slot_that_falls_behind(clusters):
    source, target = clusters
    tenant = new_tenant()
    s = tenant.schema
    admin = source.url("postgres")
    follow = start_sync(source, target, tenant, max_lag_bytes=64 * 1024)
    follow.stop()  # nobody reads the slot while the shared cluster writes on
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {s}.items (body) SELECT repeat('w', 1000) FROM generate_series(1, 1000)")
    guarded = changes.Follow(tenant, admin, target.url("postgres"), max_lag_bytes=64 * 1024).start()
    wait_until(lambda: not guarded.running, 30, "the lag guard")
    assert "bytes behind the shared cluster" in guarded.error
    with psycopg.connect(admin) as conn:
        assert changes.slot_state(conn, tenant) is None


def test_a_snapshot_the_slot_exported_is_what_the_copy_sees(clusters):
    source, _ = clusters
    tenant = new_tenant()
    admin = source.url("postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(SCHEMA.format(s=tenant.schema))
    replication, snapshot, lsn = changes.create_slot(admin, tenant)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"INSERT INTO {tenant.schema}.items (body) VALUES ('later')")
        seen = []

        def read():
            with psycopg.connect(admin) as conn:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                seen.append(conn.execute(f"SELECT count(*) FROM {tenant.schema}.items").fetchone()[0])

        reader = threading.Thread(target=read)
        reader.start()
        reader.join()
        assert seen == [50] and lsn
    finally:
        replication.close()
        changes.drop_slot(admin, tenant)


def test_a_checkpoint_compares_both_copies_at_one_lsn_while_writes_go_on(clusters):
    source, target = clusters
    tenant = new_tenant()
    s = tenant.schema
    admin = source.url("postgres")
    follow = start_sync(source, target, tenant)
    stop = threading.Event()

    def write():
        with psycopg.connect(admin, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(f"INSERT INTO {s}.items (body) VALUES ('during')")

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.3)
        checked = changes.verify_checkpoint(admin, tenant, follow.checkpoint(30))
        assert checked["tables"]["items"] > 51 and set(checked["tables"]) == {"items", "pairs", "loose"}
        # A target that lost a row the stream never touches again differs at the next checkpoint.
        with psycopg.connect(target.url("postgres"), autocommit=True) as conn:
            conn.execute(f"DELETE FROM {s}.items WHERE id = 7")
        with pytest.raises(changes.AgentError, match="table items: source .* rows, target .* rows"):
            changes.verify_checkpoint(admin, tenant, follow.checkpoint(30))
        assert follow.running
    finally:
        stop.set()
        writer.join()
        follow.stop()
        changes.drop_slot(admin, tenant)
    with psycopg.connect(admin) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0] == 0
