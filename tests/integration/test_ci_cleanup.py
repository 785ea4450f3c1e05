""".ci/clean-test-stacks removes what runs of the tests stopped halfway left in the engine, and
nothing else."""

import pathlib
import secrets
import subprocess

import docker
import pytest

pytestmark = pytest.mark.integration

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / ".ci" / "clean-test-stacks"


def _gone(collection, name: str) -> bool:
    try:
        collection.get(name)
        return False
    except docker.errors.NotFound:
        return True


def test_the_tests_leftovers_go_and_a_projects_stopped_stack_stays(docker_engine):
    engine = docker_engine
    image = next((tag for i in engine.images.list("flux-local/postgres") for tag in i.tags), None)
    if image is None:
        pytest.fail("the local postgres image is not built: run python packaging/images/build.py")
    # A label of this test's own, so that no other test's stack is touched.
    label = f"flux-tests-clean-{secrets.token_hex(3)}"
    left = f"flux-tests-left-{secrets.token_hex(3)}"
    kept = f"flux-tests-kept-{secrets.token_hex(3)}"
    flux = {"flux.managed": "true"}
    made = []
    try:
        made.append(engine.networks.create(f"{left}-net", driver="bridge", labels={**flux, label: "true"}))
        made.append(engine.volumes.create(f"{left}-db-data", labels={**flux, label: "true"}))
        made.append(engine.containers.run(image, entrypoint=["sleep", "600"], name=f"{left}-db", detach=True,
                                          network=f"{left}-net", labels={**flux, label: "true"},
                                          volumes={f"{left}-db-data": {"bind": "/data", "mode": "rw"}}))
        # A project's stack, stopped (as `flux stop` leaves it): its network has a container on it.
        made.append(engine.networks.create(f"{kept}-net", driver="bridge", labels=flux))
        made.append(engine.containers.create(image, entrypoint=["true"], name=f"{kept}-db",
                                             network=f"{kept}-net", labels=flux))
        # And a network of flux's that nothing is attached to any more.
        made.append(engine.networks.create(f"{left}-orphan-net", driver="bridge", labels=flux))

        done = subprocess.run(["bash", str(SCRIPT), label], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr

        assert _gone(engine.containers, f"{left}-db")
        assert _gone(engine.volumes, f"{left}-db-data")
        assert _gone(engine.networks, f"{left}-net")
        assert _gone(engine.networks, f"{left}-orphan-net")
        assert not _gone(engine.containers, f"{kept}-db") and not _gone(engine.networks, f"{kept}-net")
    finally:
        for item in reversed(made):
            try:
                item.remove(force=True) if isinstance(item, docker.models.containers.Container) else item.remove()
            except docker.errors.NotFound:
                pass
