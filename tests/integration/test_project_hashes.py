"""Project hashes are unique across the whole catalog, on a real PostgreSQL catalog."""

import asyncio
import datetime
import itertools
import uuid

import psycopg
import pytest

from controller import store as catalog_mod
from controller.store import Catalog, HashTaken, available_migrations
from controller.projects import Projects
from controller.secretbox import SecretBox, new_master_key
from controller.tokens import new_api_token, token_hash

pytestmark = pytest.mark.integration


class ConnectedFleet:
    """A fleet whose agents are all connected and finish every job at once."""

    def __init__(self):
        self.jobs: list[tuple[str, str]] = []
        self.report_listeners: list = []

    def connected(self, name: str) -> bool:
        return True

    async def run(self, agent: str, kind: str, params: dict, **_) -> dict:
        self.jobs.append((agent, kind))
        return {}


class AckingGateways:
    base_domain = "localhost"

    async def sync(self) -> dict:
        return {"gateways": [], "version": 0}


def migrate(url: str, up_to: int | None = None) -> None:
    async def apply():
        conn = await catalog_mod.connect(url)
        try:
            if up_to is None:
                await catalog_mod.migrate(conn)
                return
            await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                               " applied_at timestamptz NOT NULL DEFAULT now())")
            for migration in catalog_mod.available_migrations():
                if migration.version <= up_to:
                    await conn.execute(migration.sql)
                    await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                       (migration.version, migration.name))
        finally:
            await conn.close()

    asyncio.run(apply())


def add_project(conn, owner: int, slug: str, hash_: str, created: datetime.datetime) -> str:
    project_id = str(uuid.uuid4())
    conn.execute("INSERT INTO projects (id, owner_id, name, slug, hash, mode, lifecycle, api_schema,"
                 " jwt_secret_sealed, created_at) VALUES (%s, %s, %s, %s, %s, 'v2_shared', 'active', %s, 'x', %s)",
                 (project_id, owner, slug, slug, hash_, f"t_{project_id.replace('-', '')[:12]}_api", created))
    return project_id


def test_two_owners_creating_the_same_name_get_different_hashes(catalog_url):
    migrate(catalog_url)
    # The hash source offers the first owner's hash again before a free one.
    offered = itertools.chain(["abc1234", "abc1234"], itertools.cycle(["def5678"]))
    with psycopg.connect(catalog_url) as conn:
        conn.execute("INSERT INTO agents (name, roles, cert_serial, cert_expires_at)"
                     " VALUES ('db-1', '{db}', '1', now() + interval '1 day')")

    async def scenario():
        catalog = Catalog(catalog_url, max_size=2)
        await catalog.open()
        try:
            fleet = ConnectedFleet()
            projects = Projects(catalog, fleet, SecretBox(new_master_key()), AckingGateways(),
                                hashes=lambda: next(offered))
            alice = await catalog.create_user("alice", token_hash(new_api_token()), "operator")
            bob = await catalog.create_user("bob", token_hash(new_api_token()), "operator")
            first, _ = await projects.create(alice, "Shop")
            second, _ = await projects.create(bob, "Shop")
            return first, second, fleet.jobs
        finally:
            await catalog.close()

    first, second, jobs = asyncio.run(scenario())
    assert first.slug == second.slug == "shop"
    assert first.hash == "abc1234" and second.hash == "def5678"
    assert first.owner_id != second.owner_id
    assert jobs == [("db-1", "tenant.create"), ("db-1", "tenant.create")]


def test_the_catalog_refuses_a_hash_another_owner_has(catalog_url):
    migrate(catalog_url)
    with psycopg.connect(catalog_url) as conn:
        alice, bob = (conn.execute("INSERT INTO users (name) VALUES (%s) RETURNING id", (n,)).fetchone()[0]
                      for n in ("alice", "bob"))
        add_project(conn, alice, "shop", "0a0a0a0", datetime.datetime.now(datetime.timezone.utc))
        with pytest.raises(psycopg.errors.UniqueViolation):
            add_project(conn, bob, "other", "0a0a0a0", datetime.datetime.now(datetime.timezone.utc))


def test_existing_shared_hashes_survive_the_migration_and_stay_taken(catalog_url):
    """Rows from before: both owners keep their hash (their names are in use); no new project joins them."""
    migrate(catalog_url, up_to=6)
    now = datetime.datetime.now(datetime.timezone.utc)
    with psycopg.connect(catalog_url) as conn:
        alice, bob, carol, dave = (
            conn.execute("INSERT INTO users (name) VALUES (%s) RETURNING id", (n,)).fetchone()[0]
            for n in ("alice", "bob", "carol", "dave"))
        oldest = add_project(conn, alice, "shop", "1b1b1b1", now - datetime.timedelta(days=3))
        same_slug = add_project(conn, bob, "shop", "1b1b1b1", now - datetime.timedelta(days=2))
        other_slug = add_project(conn, carol, "blog", "1b1b1b1", now - datetime.timedelta(days=1))
        alone = add_project(conn, carol, "wiki", "2c2c2c2", now)

    migrate(catalog_url)

    with psycopg.connect(catalog_url) as conn:
        rows = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT id::text, hash, hash_shared FROM projects")}
        assert conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == max(
            m.version for m in available_migrations())
    assert rows == {oldest: ("1b1b1b1", False), same_slug: ("1b1b1b1", True),
                    other_slug: ("1b1b1b1", True), alone: ("2c2c2c2", False)}

    async def insert(hash_: str):
        catalog = Catalog(catalog_url, max_size=1)
        await catalog.open()
        try:
            project_id = str(uuid.uuid4())
            return await catalog.insert_project(project_id, dave, "New", "new", hash_, "v2_shared",
                                                f"t_{project_id.replace('-', '')[:12]}_api", "x", None)
        finally:
            await catalog.close()

    with pytest.raises(HashTaken):
        asyncio.run(insert("1b1b1b1"))
    # Even once the oldest holder is gone, the hash stays taken by the projects that kept it.
    with psycopg.connect(catalog_url) as conn:
        conn.execute("DELETE FROM projects WHERE id = %s", (oldest,))
    with pytest.raises(HashTaken):
        asyncio.run(insert("1b1b1b1"))
    assert asyncio.run(insert("3d3d3d3")).hash == "3d3d3d3"
