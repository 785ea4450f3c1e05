"""The catalog's schema upgrades from every earlier version to the latest with a fleet in place:
users, tokens, agents, jobs and projects written at the old version read the same afterwards."""

import asyncio
import datetime

import psycopg
import pytest

from controller.store import Catalog, available_migrations
from controller.tokens import token_hash
from tests.integration.test_project_hashes import add_project, migrate

pytestmark = pytest.mark.integration

VERSIONS = [m.version for m in available_migrations()]
PROJECTS_FROM = 2  # the first version with a projects table


def _seed(conn, version: int) -> dict:
    owner = conn.execute("INSERT INTO users (name) VALUES ('ada') RETURNING id").fetchone()[0]
    conn.execute("INSERT INTO api_tokens (token_hash, user_id) VALUES (%s, %s)", (token_hash("flx_live_t"), owner))
    conn.execute("INSERT INTO agents (name, roles, cert_serial, cert_expires_at, facts) VALUES"
                 " ('db-1', '{db}', 'serial-1', now() + interval '1 year', '{\"agent_version\": \"0.1.0\"}')")
    conn.execute("INSERT INTO jobs (id, agent, kind, params_sealed, state, finished_at) VALUES"
                 " ('j1', 'db-1', 'facts.collect', 'x', 'succeeded', now())")
    seeded = {"owner": owner, "projects": []}
    if version >= PROJECTS_FROM:
        created = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        seeded["projects"] = [add_project(conn, owner, "shop", "a1b2c3d", created),
                              add_project(conn, owner, "blog", "e4f5a6b", created)]
    return seeded


@pytest.mark.parametrize("version", VERSIONS[:-1])
def test_the_catalog_upgrades_from_an_earlier_version_with_a_fleet_in_place(catalog_url, version):
    migrate(catalog_url, up_to=version)
    with psycopg.connect(catalog_url, autocommit=True) as conn:
        seeded = _seed(conn, version)
    migrate(catalog_url)

    async def read() -> tuple:
        catalog = Catalog(catalog_url, max_size=1)
        await catalog.open()
        try:
            pending = await catalog.pending_schema_versions()
            agent = await catalog.get_agent("db-1")
            projects = await catalog.projects_of(seeded["owner"])
            first = await catalog.project(seeded["projects"][0]) if seeded["projects"] else None
            job = await catalog.get_job("j1")
            return pending, agent, projects, first, job
        finally:
            await catalog.close()

    pending, agent, projects, first, job = asyncio.run(read())
    assert pending == []
    assert agent.cert_serial == "serial-1" and agent.facts["agent_version"] == "0.1.0"
    assert job.state == "succeeded"
    assert sorted(p.slug for p in projects) == (["blog", "shop"] if version >= PROJECTS_FROM else [])
    if first is not None:
        assert (first.slug, first.hash, first.mode) == ("shop", "a1b2c3d", "v2_shared")
    with psycopg.connect(catalog_url) as conn:
        applied = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert applied == VERSIONS
