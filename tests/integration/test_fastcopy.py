"""A tenant schema copied by agent/adapters/fastcopy.py between two real clusters: rows, keys,
indexes, policies and grants as the source has them at the snapshot, and failures that name
where they happened."""

import uuid
from types import SimpleNamespace

import psycopg
import pytest
from psycopg import sql

from agent.adapters import changes
from agent.adapters.dumps import CHECKSUM, prepare_target, referenced_roles, tables_of
from agent.adapters.fastcopy import copy_schema
from agent.adapters.tenants import Tenant
from agent.errors import AgentError
from contract import names
from tests import support
from tests.support import CuttableProxy, remove_cluster

pytestmark = pytest.mark.integration

PASSWORD = "owner-secret"

SCHEMA = """
CREATE TYPE mood AS ENUM ('ok', 'meh', 'great');
CREATE TABLE authors (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL UNIQUE, born date);
CREATE TABLE posts (id bigserial PRIMARY KEY, author_id bigint NOT NULL REFERENCES authors (id) ON DELETE CASCADE,
                    title text, body text, tags text[], meta jsonb, score numeric(12, 4), raw bytea,
                    created timestamptz DEFAULT now(), feeling mood, moods mood[],
                    words int GENERATED ALWAYS AS (length(body)) STORED, CHECK (score >= 0));
CREATE INDEX posts_author ON posts (author_id);
CREATE INDEX posts_meta ON posts USING gin (meta);
CREATE UNIQUE INDEX posts_title ON posts (lower(title)) WHERE title IS NOT NULL;
CREATE TABLE events (at timestamptz, kind text, payload jsonb, seen aclitem);
CREATE INDEX events_at ON events (at);
CREATE TABLE readings (id int, at date, v double precision, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE readings_2023 PARTITION OF readings FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE readings_2024 PARTITION OF readings FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE notes (id int, reading_id int, reading_at date, FOREIGN KEY (reading_id, reading_at) REFERENCES readings);
CREATE VIEW recent AS SELECT id, title FROM posts WHERE created > now() - interval '1 day';
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.created = now(); RETURN NEW; END $$;
CREATE TRIGGER posts_touch BEFORE UPDATE ON posts FOR EACH ROW EXECUTE FUNCTION touch();
ALTER TABLE posts ENABLE ROW LEVEL SECURITY;
CREATE POLICY own ON posts TO {runtime} USING (author_id > 0 AND title <> E'\\n-- Name: x; Type: INDEX\\n');
GRANT SELECT ON posts, recent TO {runtime};
GRANT SELECT ON events TO {auditor};
COMMENT ON INDEX posts_author IS 'by author';
INSERT INTO authors (name, born) SELECT 'author ' || g, date '1970-01-01' + g FROM generate_series(1, 50) g;
INSERT INTO posts (author_id, title, body, tags, meta, score, raw, feeling, moods)
  SELECT 1 + g % 50, 'title ' || g, repeat('body ', g % 40), ARRAY['a' || g, NULL, 'b,c'],
         jsonb_build_object('g', g, 'list', ARRAY[1, 2]), g / 7.0, decode(md5(g::text), 'hex'),
         (ARRAY['ok', 'meh', 'great'])[1 + g % 3]::mood, ARRAY['ok', 'great']::mood[]
  FROM generate_series(1, 6000) g;
INSERT INTO events SELECT timestamptz '2024-05-01 12:00+02' - g * interval '1 minute', 'k' || g % 3,
  '{{"a": [1, {{"b": null}}]}}', '=r/{owner}' FROM generate_series(1, 3000) g;
INSERT INTO readings SELECT g, date '2023-06-01' + g % 400, g * 0.1 FROM generate_series(1, 2000) g;
INSERT INTO notes SELECT g, g, date '2023-06-01' + g % 400 FROM generate_series(1, 100) g;
"""

SHAPE = {
    "constraints": "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
                   " WHERE connamespace = %(s)s::regnamespace ORDER BY 1, 2",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = %(s)s ORDER BY 1, 2",
    "policies": "SELECT tablename, policyname, roles::text, qual FROM pg_policies WHERE schemaname = %(s)s",
    "triggers": "SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " WHERE c.relnamespace = %(s)s::regnamespace AND NOT tgisinternal ORDER BY 1",
    "relations": "SELECT relname, relkind, relrowsecurity, relacl::text, pg_get_userbyid(relowner)"
                 " FROM pg_class WHERE relnamespace = %(s)s::regnamespace ORDER BY 1",
    "sequences": "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = %(s)s ORDER BY 1",
    "comments": "SELECT c.relname, d.description FROM pg_description d JOIN pg_class c ON c.oid = d.objoid"
                " WHERE c.relnamespace = %(s)s::regnamespace ORDER BY 1",
}


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    source = support.test_cluster(tmp_path_factory.mktemp("src"), wal_level="logical")
    try:
        target = support.test_cluster(tmp_path_factory.mktemp("dst"))
    except BaseException:
        remove_cluster(source)
        raise
    with psycopg.connect(target.url(), autocommit=True) as conn:
        conn.execute("CREATE ROLE authenticator; CREATE ROLE authenticated")
    yield source, target
    remove_cluster(source)
    remove_cluster(target)


@pytest.fixture
def tenant(clusters):
    """A tenant with its schema on the source, its owner able to log in as in production, and an
    empty target database with what a dedicated one has (prepare() makes it ready)."""
    source, target = clusters
    project_id = str(uuid.uuid4())
    tenant = Tenant(project_id, names.short_id(project_id))
    s, owner, runtime = tenant.schema, tenant.owner_role, tenant.runtime_role
    auditor = f"auditor_{tenant.short_id}"
    with psycopg.connect(source.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}; CREATE ROLE {}; CREATE ROLE {}").format(
            sql.Identifier(owner), sql.Literal(PASSWORD), sql.Identifier(runtime), sql.Identifier(auditor)))
        conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(s), sql.Identifier(owner)))
        conn.execute(sql.SQL("SET ROLE {}; SET search_path = {}").format(sql.Identifier(owner), sql.Identifier(s)))
        conn.execute(SCHEMA.format(runtime=runtime, owner=owner, auditor=auditor))
        conn.execute("RESET ROLE")
        conn.execute(sql.SQL("ANALYZE"))
    database = f"dst_{tenant.short_id}"
    with psycopg.connect(target.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    with psycopg.connect(target.url(database), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA flux; CREATE TABLE flux.flux_migrations (tenant_schema text, version text,"
                     " filename text, checksum text, applied_at timestamptz, PRIMARY KEY (tenant_schema, filename))")
    yield SimpleNamespace(tenant=tenant, schema=s, auditor=auditor, target_url=target.url(database),
                          source_url=source.url().replace(f"{source.user}:{source.password}", f"{owner}:{PASSWORD}"))
    with psycopg.connect(source.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(s)))


def prepare(tenant) -> None:
    with psycopg.connect(tenant.source_url) as conn:
        roles = referenced_roles(conn, tenant.schema)
    prepare_target(tenant.target_url, tenant.tenant, roles)


def rows(url: str, schema: str, snapshot: str | None = None) -> dict:
    with psycopg.connect(url) as conn:
        if snapshot:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        return {t: conn.execute(sql.SQL(CHECKSUM).format(sql.Identifier(schema, t))).fetchone()
                for t in tables_of(conn, schema)}


def shape(url: str, schema: str) -> dict:
    with psycopg.connect(url) as conn:
        return {k: conn.execute(q, {"s": schema}).fetchall() for k, q in SHAPE.items()}


def test_a_schema_is_copied_whole_as_its_snapshot_saw_it(tenant):
    s = tenant.schema
    prepare(tenant)
    before = rows(tenant.source_url, s)
    calls = []

    def progress(phase, done, total, unit, detail):
        if not calls:  # rows written once the snapshot is taken are not in the copy
            with psycopg.connect(tenant.source_url, autocommit=True) as conn:
                conn.execute(sql.SQL("INSERT INTO {} (name) VALUES ('late')").format(sql.Identifier(s, "authors")))
                conn.execute(sql.SQL("DELETE FROM {} WHERE id < 100").format(sql.Identifier(s, "posts")))
        calls.append((phase, done, total, unit))

    result = copy_schema(tenant.source_url, s, tenant.target_url, workers=2, split_bytes=64 * 1024,
                         progress=progress)
    assert rows(tenant.target_url, s) == before != rows(tenant.source_url, s)
    assert before["posts"][0] == 6000 and before["readings_2024"][0] > 0
    source_shape, target_shape = shape(tenant.source_url, s), shape(tenant.target_url, s)
    # Sequences are outside snapshots: the copy has them as they are after the late insert.
    assert source_shape == target_shape
    assert len(target_shape["indexes"]) == 10 and len(target_shape["policies"]) == 1
    assert result["tables"] == 6 and result["rows"] == sum(r[0] for t, r in before.items() if t != "readings")
    assert result["chunks"] > result["tables"]  # posts and events went in several chunks
    # Arrays of the schema's enum cannot go as binary; aclitem has no binary form and falls back.
    assert result["text_tables"] == ["events", "posts"]
    assert set(result["seconds"]) == {"schema", "data", "post_data", "total"}
    assert {c[0] for c in calls} == {"schema", "data", "post-data"} and calls[-1][1] == calls[-1][2]


def test_the_snapshot_a_replication_slot_exports_is_the_one_copied(tenant, clusters):
    source = clusters[0]
    s = tenant.schema
    prepare(tenant)
    replication, snapshot, _ = changes.create_slot(source.url(), tenant.tenant)
    try:
        with psycopg.connect(source.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("INSERT INTO {} SELECT g, NULL, NULL FROM generate_series(101, 150) g")
                         .format(sql.Identifier(s, "notes")))
        result = copy_schema(tenant.source_url, s, tenant.target_url, snapshot=snapshot, workers=3)
        assert result["snapshot"] == snapshot
        assert rows(tenant.target_url, s) == rows(source.url(), s, snapshot)
        assert rows(tenant.target_url, s)["notes"][0] == 100
    finally:
        replication.close()
        changes.drop_slot(source.url(), tenant.tenant)


def test_a_role_the_target_lacks_fails_the_schema_phase(tenant):
    prepare_target(tenant.target_url, tenant.tenant, [])  # the owner and runtime roles, not the auditor
    s, auditor = tenant.schema, tenant.auditor
    with pytest.raises(AgentError, match=rf"schema of {s} on the target failed at GRANT SELECT ON TABLE "
                                         rf"{s}\.events TO {auditor}: role \"{auditor}\" does not exist") as caught:
        copy_schema(tenant.source_url, s, tenant.target_url)
    assert not caught.value.retryable


def test_a_cut_connection_fails_the_copy_naming_the_table(tenant, clusters):
    target = clusters[1]
    prepare(tenant)
    proxy = CuttableProxy(target.port)
    try:
        through = tenant.target_url.replace(f":{target.port}/", f":{proxy.port}/")

        def progress(phase, done, total, unit, detail):
            if phase == "data":
                proxy.cut()

        # One worker: its connections are open before the first rows, so the cut finds it copying.
        with pytest.raises(AgentError, match=rf"copy of {tenant.schema}\.\w+ failed: ") as caught:
            copy_schema(tenant.source_url, tenant.schema, through, workers=1, split_bytes=16 * 1024,
                        progress=progress)
        assert caught.value.retryable
    finally:
        proxy.close()


def test_rows_cut_short_on_the_source_commit_nothing_on_the_target(tenant, clusters):
    """A COPY stream that ends early ends without an error on the receiving side, so the copy
    must not let the target's COPY end when the source's did not finish: the table stays empty."""
    source = clusters[0]
    s = tenant.schema
    big = sql.Identifier(s, "big")
    with psycopg.connect(source.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(big))
        conn.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(big, sql.Identifier(tenant.tenant.owner_role)))
        conn.execute(sql.SQL("INSERT INTO {} SELECT g, repeat(md5(g::text), 16) FROM generate_series(1, 120000) g")
                     .format(big))
    prepare(tenant)
    cut = []

    def progress(phase, done, total, unit, detail):
        if phase == "data" and detail == "big" and not cut:
            with psycopg.connect(source.url(), autocommit=True) as conn:
                cut.extend(conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                        " WHERE application_name = 'flux-copy' AND query LIKE 'COPY%'").fetchall())

    with pytest.raises(AgentError, match=rf"copy of {s}\.big failed: .*(terminating connection|connection to server was lost)") as caught:
        copy_schema(tenant.source_url, s, tenant.target_url, workers=1, progress=progress)
    assert cut == [(True,)] and caught.value.retryable
    with psycopg.connect(tenant.target_url) as conn:
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(big)).fetchone()[0] == 0


def test_hostile_table_and_column_names_are_copied_as_names(tenant, clusters):
    """Names a tenant chooses reach psql's command line only as quoted identifiers: quotes,
    semicolons, SQL and non-ASCII stay names, and nothing outside the schema is touched."""
    source = clusters[0]
    s = tenant.schema
    table = 'x"; DROP TABLE authors; --ü表'
    column = "it's \"a\" col;\\"
    with psycopg.connect(source.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(tenant.tenant.owner_role)))
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {} text)").format(
            sql.Identifier(s, table), sql.Identifier(column)))
        conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'ü ' || repeat(E'\\\\'';', g) FROM generate_series(1, 300) g")
                     .format(sql.Identifier(s, table)))
    prepare(tenant)
    before = rows(tenant.source_url, s)
    result = copy_schema(tenant.source_url, s, tenant.target_url)
    assert rows(tenant.target_url, s) == before and table in before and before[table][0] == 300
    assert result["tables"] == 7 and "authors" in before
    with psycopg.connect(tenant.target_url) as conn:
        got = conn.execute(sql.SQL("SELECT {} FROM {} WHERE id = 2").format(
            sql.Identifier(column), sql.Identifier(s, table))).fetchone()[0]
    assert got == "ü \\';\\';"
