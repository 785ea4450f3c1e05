import pathlib
import secrets

import psycopg
import pytest
from psycopg import sql

from tests.support import AgentProc, Controller, remove_cluster, test_cluster


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory):
    cluster = test_cluster(tmp_path_factory.mktemp("pg"))
    yield cluster
    remove_cluster(cluster)


@pytest.fixture(scope="module")
def docker_engine():
    """A client of the machine's Docker engine; the tests that need one fail without it."""
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"these tests need a Docker engine (.ci/run starts one): {exc}")
    yield client
    client.close()


@pytest.fixture
def catalog_url(pg_cluster):
    name = f"catalog_{secrets.token_hex(4)}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield pg_cluster.url(name)
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def controller(tmp_path: pathlib.Path, catalog_url):
    ctl = Controller(tmp_path / "controller", catalog_url).start()
    yield ctl
    ctl.stop()


@pytest.fixture
def agents(tmp_path: pathlib.Path, controller):
    started: list[AgentProc] = []

    def make(name: str, roles: str = "db", start: bool = True) -> AgentProc:
        agent = AgentProc.enroll(controller, tmp_path / "agents", name, roles)
        started.append(agent)
        return agent.start() if start else agent

    yield make
    for agent in started:
        agent.stop()
