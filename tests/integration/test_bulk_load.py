"""A stack a migration fills starts in bulk-load mode (wal_level=minimal: the copy's rows write no
WAL) and leaves it at bootstrap: its Postgres made again with the usual settings on the same
volume and port, its rows kept, its API answering, logical decoding possible (the way back
after a cutover needs a slot there)."""

import secrets
import uuid

import psycopg
import pytest

from agent.adapters import stacks
from agent.runtime.settings import DockerSettings
from tests.support import TEST_LABELS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def settings(docker_engine):
    tags = {tag.split(":")[0]: tag for i in docker_engine.images.list() for tag in i.tags}
    missing = {"flux-local/postgres", "flux-local/postgrest-standin"} - set(tags)
    if missing:
        pytest.fail(f"the local images are not built ({', '.join(sorted(missing))}): run python "
                    "packaging/images/build.py")
    return DockerSettings(postgres_image=tags["flux-local/postgres"],
                          postgrest_image=tags["flux-local/postgrest-standin"], labels=TEST_LABELS)


@pytest.fixture
def spec(settings):
    project = stacks.StackSpec(project_id=str(uuid.uuid4()), slug=f"bulk-{secrets.token_hex(3)}",
                               hash=secrets.token_hex(4)[:7], postgres_password=secrets.token_urlsafe(12),
                               authenticator_password=secrets.token_urlsafe(12), jwt_secret=secrets.token_hex(32),
                               bulk_load=True)
    yield project
    stacks.remove(project)


def limits(engine, spec) -> tuple[float, int]:
    """CPUs and bytes of memory the stack's database container may use (0: no limit)."""
    host = engine.containers.get(spec.db).attrs["HostConfig"]
    return host["NanoCpus"] / 1e9, host["Memory"]


def wal_level(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SHOW wal_level").fetchone()[0]


def fsync(url: str) -> str:
    with psycopg.connect(url) as conn:
        return conn.execute("SHOW fsync").fetchone()[0]


def test_a_stack_leaves_bulk_load_mode_at_bootstrap_with_its_rows(docker_engine, settings, spec):
    provisioned = stacks.provision(spec, settings)
    url = stacks.admin_url(spec, settings)
    assert wal_level(url) == "minimal" and limits(docker_engine, spec) == (0, 0) and fsync(url) == "off"
    with psycopg.connect(url, autocommit=True) as conn:
        # What the copy does: a table emptied in the loading transaction takes rows without WAL.
        conn.execute("CREATE TABLE public.loaded (id int PRIMARY KEY, body text)")
        with conn.transaction():
            conn.execute("TRUNCATE public.loaded")
            conn.execute("INSERT INTO public.loaded SELECT g, md5(g::text) FROM generate_series(1, 5000) g")

    usual = stacks.StackSpec(**{**spec.__dict__, "bulk_load": False})
    done = stacks.bootstrap(usual, settings)
    assert done["restarted_s"] > 0 and done["role bootstrap"] in ("ok", "changed")
    assert stacks.admin_url(usual, settings) == url  # same port, same password
    assert wal_level(url) == "logical" and limits(docker_engine, spec) == (settings.cpus, 512 * 1024 * 1024)
    # Durable from here on: the load was synced to the disk before fsync came back on.
    assert fsync(url) == "on"
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), sum(id) FROM public.loaded").fetchone() == (5000, 5000 * 5001 // 2)
        conn.execute("SELECT pg_create_logical_replication_slot('flux_bulk_check', 'pgoutput')")
        conn.execute("SELECT pg_drop_replication_slot('flux_bulk_check')")
    assert stacks.probe_only(usual, settings) == {"status": 200}
    assert stacks.observe(usual)["state"] == "Running"

    # Once out of it, bootstrap and provision leave the database running as it is.
    assert stacks.bootstrap(usual, settings)["restarted_s"] is None
    again = stacks.provision(usual, settings)
    assert again["db_port"] == provisioned["db_port"] and again["steps"]["db container"] == "ok"
    assert wal_level(url) == "logical"


def test_a_stack_made_without_bulk_load_never_restarts(settings, spec):
    usual = stacks.StackSpec(**{**spec.__dict__, "bulk_load": False})
    stacks.provision(usual, settings)
    url = stacks.admin_url(usual, settings)
    with psycopg.connect(url) as conn:
        started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
    assert wal_level(url) == "logical" and stacks.bootstrap(usual, settings)["restarted_s"] is None
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == started
