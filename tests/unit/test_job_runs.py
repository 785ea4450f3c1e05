"""Jobs as the controller sends them and the agent runs them, checked against the contract:
a fake catalog and a scripted agent behind the real wire on both sides."""

import asyncio
import dataclasses
import logging

import pytest

from agent.runtime import wire as agent_wire
from contract.failures import FailureKind
from controller.rpc import wire as controller_wire
from controller.store import Agent, Job
from controller.errors import BadRequest, Conflict, NotFound, Revoked, Timeout, Unavailable
from controller.fleet import AgentFailed, Fleet, ForeignObjects, InvalidJob, Session
from controller.secretbox import SecretBox, new_master_key
from proto import fleet_pb2 as pb


class FakeCatalog:
    """The job half of the catalog, in memory."""

    def __init__(self):
        self.jobs: dict[str, Job] = {}
        self.agents = {"db-1": Agent("db-1", ["db"], "1", None, None, None, {})}

    async def get_agent(self, name):
        return self.agents.get(name)

    async def create_job(self, job_id, agent, kind, params_sealed):
        if job_id in self.jobs:
            return self.jobs[job_id], False
        job = Job(job_id, agent, kind, params_sealed, "pending", None, None, None, None)
        self.jobs[job_id] = job
        return job, True

    async def get_job(self, job_id):
        return self.jobs.get(job_id)

    async def job_sent(self, job_id):
        if self.jobs[job_id].state == "pending":
            self.jobs[job_id] = dataclasses.replace(self.jobs[job_id], state="sent")

    async def job_progress(self, job_id, progress):
        pass

    async def abandon_job(self, job_id, error):
        job = self.jobs.get(job_id)
        if job is None or job.finished:
            return False
        self.jobs[job_id] = dataclasses.replace(job, state="failed", error=error, retryable=True,
                                                error_code=FailureKind.TIMEOUT.value)
        return True

    async def open_jobs(self, agent):
        return [j for j in self.jobs.values() if j.agent == agent and not j.finished]

    async def job_finished(self, job_id, agent, ok, output, error, retryable, failure=None):
        job = self.jobs.get(job_id)
        if job is None or job.agent != agent or job.finished:
            return None
        self.jobs[job_id] = dataclasses.replace(
            job, state="succeeded" if ok else "failed", output=output, error=None if ok else error,
            retryable=None if ok else retryable, error_code=None if ok else failure.value)
        return self.jobs[job_id]


class ScriptedAgent:
    """Answers each job the controller sends with the next scripted answer, over the real wire."""

    def __init__(self, fleet: Fleet, answers: list):
        self.fleet = fleet
        self.answers = list(answers)
        self.session = Session("db-1")
        self.received: list[agent_wire.JobRequest] = []
        fleet.attach(self.session)
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self):
        while True:
            for message in await self.session.take():
                request = agent_wire.decode(pb.ControllerMessage.FromString(message.SerializeToString()))
                if not isinstance(request, agent_wire.JobRequest):
                    continue
                self.received.append(request)
                ok, output, error, retryable, failure = self.answers.pop(0)
                answer = agent_wire.result(request.job_id, ok, output, error, retryable, failure)
                event = controller_wire.decode_agent_message(pb.AgentMessage.FromString(answer.SerializeToString()))
                await self.fleet.handle(self.session, event)


def _fleet() -> tuple[Fleet, FakeCatalog]:
    catalog = FakeCatalog()
    return Fleet(catalog, SecretBox(new_master_key())), catalog


def ok(output):
    return (True, output, "", False, None)


def failed(kind: FailureKind, retryable: bool, error: str = "it broke"):
    return (False, None, error, retryable, kind)


WAITED = {"waited_s": 0.0, "pid": 1}


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr("controller.fleet.RETRY_BACKOFF_S", 0.01)


def test_a_retryable_failure_of_a_kind_safe_to_send_again_is_sent_again_as_a_new_job(caplog):
    async def main():
        fleet, catalog = _fleet()
        agent = ScriptedAgent(fleet, [failed(FailureKind.UNAVAILABLE, True), ok(WAITED)])
        with caplog.at_level(logging.WARNING, logger="controller.fleet"):
            out = await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=5)
        assert out == WAITED
        assert len(agent.received) == 2 and agent.received[0].job_id != agent.received[1].job_id
        assert [j.state for j in catalog.jobs.values()] == ["failed", "succeeded"]
        assert "sending it again" in caplog.text

    asyncio.run(main())


def test_attempts_are_bounded():
    async def main():
        fleet, _ = _fleet()
        agent = ScriptedAgent(fleet, [failed(FailureKind.UNAVAILABLE, True, f"try {i}") for i in range(10)])
        with pytest.raises(Unavailable, match="try 2"):
            await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=5)
        assert len(agent.received) == 3

    asyncio.run(main())


@pytest.mark.parametrize("kind, params, answer", [
    # Not retryable: sending it again cannot help.
    ("diag.wait", {"seconds": 0}, failed(FailureKind.CONFLICT, False)),
    # Retryable, but the kind is not safe to send again: its caller decides what comes next.
    ("gateway.sync", {"version": 2, "base_version": None, "part": 0, "parts": 1, "upsert": [], "remove": []},
     failed(FailureKind.UNAVAILABLE, True)),
])
def test_other_failures_raise_at_once(kind, params, answer):
    async def main():
        fleet, _ = _fleet()
        agent = ScriptedAgent(fleet, [answer, ok(WAITED)])
        with pytest.raises((Conflict, Unavailable)):
            await fleet.run("db-1", kind, params, timeout=5)
        assert len(agent.received) == 1

    asyncio.run(main())


def test_no_retry_outlives_the_callers_timeout(monkeypatch):
    monkeypatch.setattr("controller.fleet.RETRY_BACKOFF_S", 5)

    async def main():
        fleet, _ = _fleet()
        agent = ScriptedAgent(fleet, [failed(FailureKind.UNAVAILABLE, True), ok(WAITED)])
        with pytest.raises(Unavailable):
            await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=2)
        assert len(agent.received) == 1

    asyncio.run(main())


@pytest.mark.parametrize("failure, error_class", [
    (FailureKind.REVOKED, Revoked), (FailureKind.NOT_FOUND, NotFound), (FailureKind.CONFLICT, Conflict),
    (FailureKind.TIMEOUT, Timeout), (FailureKind.UNAVAILABLE, Unavailable), (FailureKind.INVALID, BadRequest),
    (FailureKind.INTERNAL, AgentFailed), (FailureKind.FOREIGN, ForeignObjects),
])
def test_each_failure_kind_raises_its_error(failure, error_class):
    async def main():
        fleet, _ = _fleet()
        ScriptedAgent(fleet, [failed(failure, False, "the reason")])
        with pytest.raises(error_class) as raised:
            await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=5)
        assert raised.value.message == "the reason (agent db-1)" and raised.value.retryable is False
        # The kind decides, not the words: a failure saying "revoked" of kind invalid is a bad request.
        ScriptedAgent(fleet, [failed(FailureKind.INVALID, False, "agent db-1 is revoked")])
        with pytest.raises(BadRequest):
            await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=5)

    asyncio.run(main())


def test_every_failure_kind_has_an_error():
    from controller.fleet import FAILURES

    assert set(FAILURES) == set(FailureKind)


@pytest.mark.parametrize("params, key", [
    ({"seconds": 0, "surplus": 1}, "surplus"),
    ({"project_id": "0b5f3a9e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"}, "short_id"),
])
def test_the_sender_refuses_params_off_the_contract_before_recording_them(params, key):
    kind = "diag.wait" if "seconds" in params else "tenant.create"

    async def main():
        fleet, catalog = _fleet()
        with pytest.raises(InvalidJob, match=rf"{kind} params: {key}: "):
            await fleet.run("db-1", kind, params, timeout=5)
        with pytest.raises(InvalidJob, match="unknown job kind"):
            await fleet.submit("db-1", "tenant.explode", {})
        assert catalog.jobs == {}

    asyncio.run(main())


def test_what_is_recorded_and_sent_is_the_checked_params():
    async def main():
        fleet, catalog = _fleet()
        agent = ScriptedAgent(fleet, [ok(WAITED)])
        await fleet.run("db-1", "diag.wait", {}, timeout=5)
        assert agent.received[0].params == {"seconds": 1, "pad": ""}

    asyncio.run(main())


@pytest.mark.parametrize("output, problem", [
    ({"waited_s": "soon", "pid": 1}, "diag.wait result: waited_s: expected a number, got a string"),
    ({"waited_s": 0.1, "pid": 1, "extra": True}, "diag.wait result: extra: unknown key"),
    (None, "diag.wait result: expected an object, got null"),
])
def test_a_malformed_result_fails_the_job_as_internal(output, problem):
    async def main():
        fleet, catalog = _fleet()
        ScriptedAgent(fleet, [ok(output), ok(WAITED)])
        with pytest.raises(AgentFailed, match=problem):
            await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=5)
        [job] = catalog.jobs.values()
        assert (job.state, job.error_code, job.retryable, job.output) == ("failed", "internal", False, None)

    asyncio.run(main())


# The agent's side.

def _context(**settings):
    return dict(job_id="job-1", progress=lambda *a: None, collect_facts=dict, settings=settings)


def test_the_agent_refuses_params_off_the_contract_as_invalid_naming_the_key():
    from agent import handlers as jobs
    from agent.errors import AgentError

    with pytest.raises(AgentError) as refused:
        asyncio.run(jobs.run("diag.wait", {"seconds": 0, "bogus": 1}, **_context()))
    assert refused.value.kind is FailureKind.INVALID and "diag.wait params: bogus: unknown key" in refused.value.message
    with pytest.raises(AgentError) as refused:
        asyncio.run(jobs.run("tenant.dump", {"project_id": "x", "short_id": "y"}, **_context()))
    assert refused.value.kind is FailureKind.INVALID and "expected_bytes: missing required key" in refused.value.message
    with pytest.raises(AgentError) as unknown:
        asyncio.run(jobs.run("tenant.explode", {}, **_context()))
    assert unknown.value.kind is FailureKind.INVALID and "tenant.explode" in unknown.value.message


def test_the_agent_hands_typed_params_in_and_checks_the_result(monkeypatch):
    from agent import handlers as jobs
    from agent.errors import AgentError
    from agent.handlers import diag
    from contract.diagnostics import DiagWaited, DiagWaitParams

    result = asyncio.run(jobs.run("diag.wait", {"seconds": 0}, **_context()))
    assert isinstance(result, DiagWaited) and result.waited_s >= 0

    seen = []

    async def sloppy(ctx):
        seen.append(ctx.params)
        return {"waited_s": 0, "pid": "me"}

    monkeypatch.setitem(diag.HANDLERS, "diag.wait", sloppy)
    with pytest.raises(AgentError) as refused:
        asyncio.run(jobs.run("diag.wait", {"seconds": 2}, **_context()))
    assert seen == [DiagWaitParams(seconds=2)]
    assert refused.value.kind is FailureKind.INTERNAL
    assert "diag.wait result: pid: expected an integer" in refused.value.message


def test_a_revoked_stream_is_told_by_its_kind_not_its_words():
    import grpc

    from agent.errors import Revoked

    class Refusal(grpc.RpcError):
        def __init__(self, detail, metadata):
            self.detail, self.metadata = detail, metadata

        def code(self):
            return grpc.StatusCode.PERMISSION_DENIED

        def details(self):
            return self.detail

        def trailing_metadata(self):
            return self.metadata

    revoked = agent_wire.translate(Refusal("agent db-1 is revoked", controller_wire.failure_metadata(
        FailureKind.REVOKED)), "connection")
    assert isinstance(revoked, Revoked) and revoked.kind is FailureKind.REVOKED
    other = agent_wire.translate(Refusal("certificate is not current (not revoked)", ()), "connection")
    assert not isinstance(other, Revoked)


def test_a_job_its_caller_gave_up_on_is_never_sent_again_and_its_late_result_changes_nothing():
    async def main():
        fleet, catalog = _fleet()
        session = Session("db-1")
        fleet.attach(session)  # connected, but never answers
        with pytest.raises(Timeout, match="did not finish diag.wait within 0.3s"):
            await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=0.3)
        [job] = catalog.jobs.values()
        assert job.state == "failed" and job.failure == FailureKind.TIMEOUT
        assert await catalog.open_jobs("db-1") == []
        late = agent_wire.result(job.id, True, WAITED, "", False, None)
        await fleet.handle(session, controller_wire.decode_agent_message(
            pb.AgentMessage.FromString(late.SerializeToString())))
        assert catalog.jobs[job.id].state == "failed"

    asyncio.run(main())


def test_an_agent_older_than_a_kind_is_not_sent_it_and_the_error_names_both_versions():
    from contract.jobs import FIRST_VERSION, KINDS, parse_version, runs_on

    async def main():
        fleet, catalog = _fleet()
        catalog.agents["db-1"] = dataclasses.replace(catalog.agents["db-1"], facts={"agent_version": "0.0.9"})
        agent = ScriptedAgent(fleet, [ok(WAITED)])
        with pytest.raises(Conflict) as refused:
            await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=5)
        assert "flux-agent 0.0.9" in refused.value.message and f"flux-agent {FIRST_VERSION} or later" in refused.value.message
        assert agent.received == [] and catalog.jobs == {}  # neither sent nor recorded
        # Once it reports a version that runs the kind, it is sent it.
        catalog.agents["db-1"] = dataclasses.replace(catalog.agents["db-1"], facts={"agent_version": FIRST_VERSION})
        assert await fleet.run("db-1", "diag.wait", {"seconds": 0}, timeout=5) == WAITED

    asyncio.run(main())
    newer = dataclasses.replace(KINDS["diag.wait"], since="1.2.0")
    assert not runs_on(newer, "1.1.9") and runs_on(newer, "1.2.0") and runs_on(newer, "1.10.0")
    # An agent run from a source tree does not know its version: it is trusted.
    assert parse_version("0+source") is None and runs_on(newer, "0+source")
