"""A docker agent runs the jobs that make, change or remove one stack one at a time, in the order
they came: a controller that restarted mid-provision and rolls the migration back sends
stack.remove while the stack.provision its predecessor sent still runs on the agent."""

import asyncio
import secrets
import threading
import uuid

import docker
import pytest

from agent import handlers
from agent.adapters import stacks
from tests.integration.test_bulk_load import settings  # noqa: F401 (the images' fixture)

pytestmark = pytest.mark.integration


def test_a_remove_sent_while_its_stack_is_provisioned_waits_for_it_and_leaves_nothing(
        docker_engine, settings):  # noqa: F811 (the fixture)
    ref = {"project_id": str(uuid.uuid4()), "slug": f"order-{secrets.token_hex(3)}",
           "hash": secrets.token_hex(4)[:7], "api_schema": "api", "app_role": None}
    spec = stacks.StackSpec(**ref)
    secrets_ = {"jwt_secret": secrets.token_hex(32), "postgres_password": secrets.token_urlsafe(12),
                "authenticator_password": secrets.token_urlsafe(12), "api_port": None, "db_port": None}
    provisioning = threading.Event()  # set from the provision's thread, at its first step

    def job(kind: str, params: dict, progress=lambda *a: None):
        return handlers.run(kind, params, job_id=f"job-{kind}", progress=progress, collect_facts=dict,
                            settings={"docker": settings}, gateway=None)

    async def scenario():
        provision = asyncio.create_task(job("stack.provision", {**ref, **secrets_},
                                            progress=lambda *a: provisioning.set()))
        assert await asyncio.to_thread(provisioning.wait, 60), "the provision did not start"
        remove = asyncio.create_task(job("stack.remove", ref))
        return await asyncio.gather(provision, remove)

    try:
        provisioned, removed = asyncio.run(scenario())
        assert provisioned.to_wire()["db_port"] > 0
        # The remove ran after the provision ended: it found (and removed) all that was made.
        assert set(removed.to_wire()["removed"]) == {spec.api, spec.db, spec.volume, spec.network}
        for collection, name in ((docker_engine.containers, spec.api), (docker_engine.containers, spec.db),
                                 (docker_engine.volumes, spec.volume), (docker_engine.networks, spec.network)):
            with pytest.raises(docker.errors.NotFound):
                collection.get(name)
    finally:
        stacks.remove(spec)
