"""A backup made and restored on a real PostgreSQL with the agent's own code: the manifest, one
transaction per restore, and nothing changed by a restore that fails or stops midway."""

import io
import os
import secrets

import psycopg
import pytest
from psycopg import sql

from agent.adapters import backups
from agent.errors import AgentError

pytestmark = pytest.mark.integration

KEY = os.urandom(32)


class Sink(io.BytesIO):
    """A transfer's sending end that keeps what it is sent."""

    def close(self) -> int:  # the bytes stay readable
        return len(self.getvalue())

    def abort(self) -> None:
        pass


class Source:
    """A transfer's receiving end over bytes, cut after `limit` of them when given."""

    def __init__(self, data: bytes, limit: int | None = None):
        self.handle = io.BytesIO(data if limit is None else data[:limit])

    def read(self, size: int = -1) -> bytes:
        return self.handle.read(size)

    def abort(self) -> None:
        pass


@pytest.fixture
def database(pg_cluster):
    name = f"restore_{secrets.token_hex(4)}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = pg_cluster.url(name)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA flux; CREATE TABLE flux.flux_migrations (tenant_schema text NOT NULL,"
                     " version text NOT NULL, filename text NOT NULL, checksum text NOT NULL,"
                     " applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(f"DROP ROLE IF EXISTS {name}_owner; CREATE ROLE {name}_owner NOLOGIN")
        conn.execute(f"CREATE SCHEMA shop AUTHORIZATION {name}_owner")
        conn.execute(f"SET ROLE {name}_owner; CREATE TABLE shop.items (id serial PRIMARY KEY, name text NOT NULL);"
                     " INSERT INTO shop.items (name) SELECT 'item ' || g FROM generate_series(1, 5000) g;"
                     " CREATE TABLE shop.notes (body text); INSERT INTO shop.notes VALUES"
                     " (E'CREATE SCHEMA shop;'), (E'a\\\\.b'); RESET ROLE")
        conn.execute("INSERT INTO flux.flux_migrations (tenant_schema, version, filename, checksum)"
                     " VALUES ('shop', '0001', '0001_items.sql', 'abc')")
    yield url, name
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(f"DROP ROLE IF EXISTS {name}_owner")


def _made(url: str) -> tuple[dict, bytes]:
    dump, _, _, env = backups.local_tools(url)
    sink = Sink()
    made = backups.make(url, "shop", dump, env, KEY, sink, None)
    return made, sink.getvalue()


def _restore(url: str, facts: dict, data: bytes, limit: int | None = None) -> dict:
    _, restore, psql, env = backups.local_tools(url)
    return backups.restore(Source(data, limit), KEY, "shop", restore, psql, env,
                           backups.pre_sql(facts, "shop"), backups.post_sql(facts, "shop"))


def _state(url: str) -> dict:
    with psycopg.connect(url) as conn:
        return backups.manifest(conn, "shop")


def test_a_restore_gives_back_what_the_manifest_says(database):
    url, name = database
    made, data = _made(url)
    facts = made["manifest"]
    assert facts["owner"] == f"{name}_owner" and facts["tables"]["items"]["rows"] == 5000
    assert [r["filename"] for r in facts["ledger"]] == ["0001_items.sql"]
    assert facts["sequences"] == {"items_id_seq": 5000}
    assert b"item 4999" not in data  # encrypted
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM shop.items WHERE id > 10; DROP TABLE shop.notes")
        conn.execute("DELETE FROM flux.flux_migrations")
    out = _restore(url, facts, data)
    assert backups.compare(facts, _state(url)) == [] and out["archive_bytes"] == made["archive_bytes"]
    # The line that reads like the schema's creation, inside COPY data, is data and came back.
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT body FROM shop.notes ORDER BY 1").fetchall() == [("CREATE SCHEMA shop;",),
                                                                                    ("a\\.b",)]


@pytest.mark.parametrize("cut", ["early", "late"])
def test_a_restore_cut_short_changes_nothing(database, cut):
    url, _ = database
    made, data = _made(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM shop.items WHERE id > 100")
    before = _state(url)
    limit = 200 if cut == "early" else len(data) - 20
    with pytest.raises(AgentError, match="does not decrypt|pg_restore failed"):
        _restore(url, made["manifest"], data, limit)
    assert _state(url) == before


def test_a_restore_that_fails_in_sql_changes_nothing_and_quotes_no_rows(database):
    url, name = database
    made, data = _made(url)
    facts = {**made["manifest"], "ledger": [{"version": "1", "filename": "x.sql", "checksum": "c",
                                             "applied_at": "not a time"}]}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM shop.items WHERE id > 100")
    before = _state(url)
    with pytest.raises(AgentError, match="rolled back") as failed:
        _restore(url, facts, data)
    assert "ERROR:" in failed.value.message and "item 4999" not in failed.value.message
    assert _state(url) == before


def test_role_names_cannot_end_a_guarded_block():
    facts = {"owner": "o", "roles": ["x$do$; DROP DATABASE postgres; --"], "ledger": []}
    text = backups.pre_sql(facts, "shop")
    block = [line for line in text.splitlines() if "x$do$" in line][0]
    tag = block.split()[1]
    assert block.startswith(f"DO {tag} BEGIN") and block.endswith(f"END {tag};") and tag not in block[len(tag) + 3:-len(tag) - 2]
