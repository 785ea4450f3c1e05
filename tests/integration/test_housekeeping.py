"""The catalog forgets what outlived its retention, and nothing younger, on a real PostgreSQL."""

import asyncio
import datetime

import psycopg
import pytest

from controller.store import Catalog, Retention
from controller.store import housekeeping
from tests.integration.test_project_hashes import add_project, migrate

pytestmark = pytest.mark.integration

OLD = "now() - interval '400 days'"
RECENT = "now() - interval '1 day'"


def _seed(conn) -> None:
    owner = conn.execute("INSERT INTO users (name) VALUES ('ada') RETURNING id").fetchone()[0]
    conn.execute("INSERT INTO agents (name, roles, cert_serial, cert_expires_at) VALUES"
                 " ('db-1', '{db}', 's', now() + interval '1 year')")
    project = add_project(conn, owner, "shop", "a1b2c3d", datetime.datetime.now(datetime.timezone.utc))
    for i, (state, finished) in enumerate([("succeeded", OLD), ("failed", OLD), ("succeeded", RECENT),
                                           ("pending", None), ("sent", None)]):
        conn.execute(f"INSERT INTO jobs (id, agent, kind, params_sealed, state, created_at, finished_at)"
                     f" VALUES ('j{i}', 'db-1', 'facts.collect', 'x', %s, {OLD}, {finished or 'NULL'})", (state,))
    for when in (OLD, OLD, RECENT):
        conn.execute(f"INSERT INTO operations (project_id, kind, outcome, at) VALUES (%s, 'start', 'succeeded', {when})",
                     (project,))
    conn.execute("INSERT INTO sessions (id_hash, user_id, csrf, expires_at) VALUES"
                 " ('gone', %s, 'c', now() - interval '1 minute'), ('live', %s, 'c', now() + interval '1 hour')",
                 (owner, owner))
    conn.execute(f"INSERT INTO join_tokens (token_hash, roles, expires_at) VALUES ('old', '{{db}}', {OLD}),"
                 f" ('used-recently', '{{db}}', {RECENT}), ('open', '{{db}}', now() + interval '1 hour')")
    conn.execute(f"INSERT INTO controllers (id, grpc_address, http_address, seen_at) VALUES"
                 f" ('gone:7443', 'gone:7443', 'gone:8080', {OLD}), ('leader:7443', 'leader:7443', 'leader:8080', {OLD}),"
                 f" ('follower:7443', 'follower:7443', 'follower:8080', {RECENT})")
    conn.execute("UPDATE controller_lease SET holder = 'leader:7443'")


def _left(conn, table: str, key: str) -> list:
    return sorted(r[0] for r in conn.execute(f"SELECT {key} FROM {table}"))


def test_housekeeping_deletes_only_what_outlived_its_retention(catalog_url, monkeypatch):
    migrate(catalog_url)
    with psycopg.connect(catalog_url, autocommit=True) as conn:
        _seed(conn)
    monkeypatch.setattr(housekeeping, "BATCH", 1)  # several batches per table

    async def prune() -> tuple[dict, dict]:
        catalog = Catalog(catalog_url, max_size=1)
        await catalog.open()
        try:
            return await catalog.prune(Retention()), await catalog.prune(Retention())
        finally:
            await catalog.close()

    first, again = asyncio.run(prune())
    assert first == {"jobs": 2, "operations": 2, "sessions": 1, "join_tokens": 1, "controllers": 1}
    assert set(again.values()) == {0}
    with psycopg.connect(catalog_url) as conn:
        # Open jobs stay whatever their age; finished ones stay for their retention.
        assert _left(conn, "jobs", "id") == ["j2", "j3", "j4"]
        assert len(_left(conn, "operations", "id")) == 1
        assert _left(conn, "sessions", "id_hash") == ["live"]
        assert _left(conn, "join_tokens", "token_hash") == ["open", "used-recently"]
        # The lease holder stays, however long ago it was seen.
        assert _left(conn, "controllers", "id") == ["follower:7443", "leader:7443"]
