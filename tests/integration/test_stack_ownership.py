"""The docker agent's stacks on a real Docker engine: another project's objects under a
project's names are never used, started, stopped or removed, and the error names them."""

import secrets
import uuid

import docker
import pytest

from agent.adapters import stacks
from agent.errors import AgentError
from contract.failures import FailureKind
from agent.runtime.settings import DockerSettings
from tests.support import TEST_LABELS

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(docker_engine):
    return docker_engine


@pytest.fixture(scope="module")
def image(engine) -> str:
    found = [tag for i in engine.images.list("flux-local/postgres") for tag in i.tags]
    if not found:
        pytest.fail("the local postgres image is not built: run python packaging/images/build.py")
    return found[0]


@pytest.fixture
def spec(engine):
    """A project whose names another owner's objects may take; everything under them goes at the end."""
    project = stacks.StackSpec(project_id=str(uuid.uuid4()), slug=f"own-{secrets.token_hex(3)}",
                               hash=secrets.token_hex(4)[:7], postgres_password="x", authenticator_password="y",
                               jwt_secret="z" * 32)
    yield project
    for name in (project.api, project.db):
        try:
            engine.containers.get(name).remove(force=True)
        except docker.errors.NotFound:
            pass
    for collection, name in ((engine.volumes, project.volume), (engine.networks, project.network)):
        try:
            collection.get(name).remove()
        except docker.errors.NotFound:
            pass


def other_owner(spec: stacks.StackSpec, component: str, labelled: bool = True) -> dict:
    """The labels another owner's stack with the same slug and hash would carry."""
    if not labelled:
        return {}
    return {"flux.managed": "true", "flux.slug": spec.slug, "flux.hash": spec.hash,
            "flux.project": str(uuid.uuid4()), "flux.component": component}


def foreign(engine, image: str, spec: stacks.StackSpec, kind: str, labelled: bool = True, running: bool = False):
    if kind == "network":
        return engine.networks.create(spec.network, driver="bridge", labels=other_owner(spec, kind, labelled))
    if kind == "volume":
        return engine.volumes.create(spec.volume, labels=other_owner(spec, kind, labelled))
    name = spec.db if kind == "db" else spec.api
    if running:
        return engine.containers.run(image, entrypoint=["sleep", "600"], name=name, detach=True,
                                     labels=other_owner(spec, kind, labelled))
    return engine.containers.create(image, entrypoint=["true"], name=name, labels=other_owner(spec, kind, labelled))


def exists(collection, name: str) -> bool:
    try:
        collection.get(name)
        return True
    except docker.errors.NotFound:
        return False


def status(engine, name: str) -> str:
    return engine.containers.get(name).status


@pytest.mark.parametrize("kind", ["network", "volume", "db"])
@pytest.mark.parametrize("labelled", [True, False], ids=["other-project", "unlabelled"])
def test_provision_does_not_reuse_another_projects_object(engine, image, spec, kind, labelled):
    taken = foreign(engine, image, spec, kind, labelled)
    settings = DockerSettings(postgres_image=image, postgrest_image=image, labels=TEST_LABELS)
    with pytest.raises(AgentError) as refused:
        stacks.provision(spec, settings)
    name = {"network": spec.network, "volume": spec.volume, "db": spec.db}[kind]
    assert refused.value.kind is FailureKind.FOREIGN
    assert name in refused.value.message and "not this project's" in refused.value.message
    taken.reload()
    assert taken.id == (engine.networks if kind == "network" else engine.volumes if kind == "volume"
                        else engine.containers).get(name).id
    if kind == "db":
        assert taken.status == "created", "another project's container was started"
        # Nothing of this project's runs with another's volume either.
        assert not exists(engine.containers, spec.api)


def test_remove_leaves_another_projects_objects_and_names_them(engine, image, spec):
    """The undo of a failed provision removes what is the project's own and nothing else."""
    network = foreign(engine, image, spec, "network")
    volume = foreign(engine, image, spec, "volume")
    db = foreign(engine, image, spec, "db", running=True)
    api = foreign(engine, image, spec, "api", labelled=False)
    with pytest.raises(AgentError) as refused:
        stacks.remove(spec)
    assert refused.value.kind is FailureKind.FOREIGN
    for name in (spec.network, spec.volume, spec.db, spec.api):
        assert name in refused.value.message
    assert exists(engine.networks, spec.network) and engine.networks.get(spec.network).id == network.id
    assert exists(engine.volumes, spec.volume) and volume.name == spec.volume
    assert status(engine, spec.db) == "running" and engine.containers.get(spec.db).id == db.id
    assert status(engine, spec.api) == "created" and engine.containers.get(spec.api).id == api.id


def test_remove_takes_the_projects_own_objects_and_keeps_the_rest(engine, image, spec):
    engine.networks.create(spec.network, driver="bridge", labels=spec.labels("network"))
    engine.volumes.create(spec.volume, labels=spec.labels("volume"))
    foreign(engine, image, spec, "db")
    with pytest.raises(AgentError) as refused:
        stacks.remove(spec)
    assert spec.db in refused.value.message and spec.network not in refused.value.message
    assert not exists(engine.networks, spec.network) and not exists(engine.volumes, spec.volume)
    assert status(engine, spec.db) == "created"
    # With nothing of its own left, the next run changes nothing and says why again.
    with pytest.raises(AgentError, match=spec.db):
        stacks.remove(spec)


def test_stop_start_and_connect_refuse_another_projects_containers(engine, image, spec):
    foreign(engine, image, spec, "db", running=True)
    foreign(engine, image, spec, "api")
    settings = DockerSettings(postgres_image=image, postgrest_image=image, labels=TEST_LABELS)
    with pytest.raises(AgentError, match=spec.api):
        stacks.stop(spec)
    assert status(engine, spec.db) == "running"
    with pytest.raises(AgentError, match=spec.db):
        stacks.start(spec, settings)
    assert status(engine, spec.api) == "created"
    # The project's Postgres password is never sent to a container that is not the project's.
    with pytest.raises(AgentError, match=spec.db):
        stacks.admin_url(spec, settings)
    with pytest.raises(AgentError, match=spec.api):
        stacks.probe_only(spec, settings)
    observed = stacks.observe(spec)
    assert observed["state"] == "Drift" and set(observed["foreign"]) == {spec.db, spec.api}


def test_an_engine_out_of_address_pools_is_named_with_what_to_do(engine, image, spec):
    # Each project's network takes one of the engine's address pools (about 30 by default): take
    # the rest, as that many projects would.
    filler = f"flux-tests-pools-{secrets.token_hex(3)}"
    taken = []
    try:
        for i in range(300):
            try:
                taken.append(engine.networks.create(f"{filler}-{i}", driver="bridge", labels=TEST_LABELS))
            except docker.errors.APIError as exc:
                assert "address pool" in str(exc), exc
                break
        else:
            pytest.fail("the engine gave 300 networks an address pool each; this test expects fewer")
        settings = DockerSettings(postgres_image=image, postgrest_image=image, labels=TEST_LABELS)
        with pytest.raises(AgentError) as refused:
            stacks.provision(spec, settings)
        message = refused.value.message
        assert spec.prefix in message and "address pool" in message
        assert "default-address-pools in /etc/docker/daemon.json" in message
    finally:
        for network in taken:
            network.remove()
    assert not exists(engine.networks, spec.network)
