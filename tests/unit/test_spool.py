"""The job spool: results kept until acknowledged; interrupted jobs closed on restart."""

import json
import os

from agent.runtime.spool import MAX_DELIVERY_ATTEMPTS, Spool


def test_result_is_kept_until_acknowledged_and_the_record_after(tmp_path):
    spool = Spool(tmp_path)
    record = spool.start("job-1", "diag.wait")
    assert spool.get("job-1").state == "running"
    spool.finish(record, True, {"x": 1}, "", False)
    assert [r.id for r in spool.unacked_results()] == ["job-1"]
    spool.ack("job-1")
    assert spool.unacked_results() == []
    # Still known, so a repeated request does not run the job again.
    assert spool.get("job-1").state == "done" and spool.get("job-1").output == {"x": 1}


def test_jobs_left_running_by_another_process_are_closed_as_failed(tmp_path):
    spool = Spool(tmp_path)
    spool.start("mine", "diag.wait")
    stale = spool.start("theirs", "diag.wait")
    path = next(p for p in tmp_path.glob("*.json") if json.loads(p.read_text())["id"] == "theirs")
    data = json.loads(path.read_text())
    data["pid"] = os.getpid() + 100000
    path.write_text(json.dumps(data))

    interrupted = spool.recover()
    assert [r.id for r in interrupted] == [stale.id]
    theirs = spool.get("theirs")
    assert theirs.state == "done" and not theirs.ok and theirs.retryable
    assert spool.get("mine").state == "running"


def test_a_corrupt_record_is_set_aside(tmp_path):
    spool = Spool(tmp_path)
    (tmp_path / "broken.json").write_text("{")
    assert spool.records() == []
    assert (tmp_path / "broken.corrupt").exists()


def test_a_result_never_acknowledged_is_dropped_after_a_bounded_number_of_tries(tmp_path):
    spool = Spool(tmp_path)
    record = spool.finish(spool.start("job-1", "tenant.migrations"), True, {"applied": ["x"]}, "", False)
    tries = 0
    # Every restart reads the spool again: the count survives them.
    while Spool(tmp_path).attempt(Spool(tmp_path).get("job-1")):
        tries += 1
        assert tries <= MAX_DELIVERY_ATTEMPTS
    assert tries == MAX_DELIVERY_ATTEMPTS
    dropped = spool.get("job-1")
    assert dropped.dropped and dropped.output is None and not dropped.ok
    assert spool.unacked_results() == []
    # Still known, so the job is not run again if the controller sends it once more.
    assert dropped.state == "done" and record.id == dropped.id


class _Outbox:
    def __init__(self):
        self.sent = []

    def put_nowait(self, message):
        self.sent.append(message)


def _agent(tmp_path):
    from agent.runtime.config import AgentConfig, StateDir
    from agent.runtime.connection import Agent

    state = StateDir(tmp_path / "agent")
    state.save(AgentConfig(name="db-1", roles=["db"], controller="127.0.0.1:1", server_name="x"))
    agent = Agent(state, tools={})
    agent.outbox = _Outbox()
    return agent


def test_a_result_over_the_message_limit_goes_as_a_failure(tmp_path):
    from agent.runtime import wire
    from proto import fleet_pb2

    agent = _agent(tmp_path)
    files = [{"filename": f"{i:06d}_{'é' * 200}.sql", "checksum": "0" * 64} for i in range(40_000)]
    record = agent.spool.finish(agent.spool.start("big-1", "tenant.migrations"), True, {"applied": files}, "", False)
    agent._send_result(record)
    [message] = agent.outbox.sent
    assert wire.size(message) < 4096
    result = message.job_event.result
    assert not result.ok and "over the" in result.error and "limit" in result.error
    assert result.failure == fleet_pb2.FAILURE_KIND_INVALID
    # The spool holds the failure now, so a reconnect sends the same small answer.
    assert agent.spool.get("big-1").output is None and not agent.spool.get("big-1").ok


def test_a_result_is_sent_once_per_connection(tmp_path):
    agent = _agent(tmp_path)
    record = agent.spool.finish(agent.spool.start("j-1", "diag.wait"), True, {"waited_s": 1}, "", False)
    agent._send_result(record)
    agent._send_result(record)
    assert len(agent.outbox.sent) == 1 and agent.spool.get("j-1").attempts == 1


def _disk_full(monkeypatch):
    import errno

    from agent.runtime import spool as spool_module

    def full(target, data, **_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "write_atomic", full)


def test_records_the_disk_cannot_take_are_held_in_memory_and_saved_when_it_can(tmp_path, monkeypatch):
    spool = Spool(tmp_path)
    record = spool.start("job-1", "diag.wait")
    with monkeypatch.context() as patch:
        _disk_full(patch)
        spool.finish(record, True, {"x": 1}, "", False)  # does not raise
        # Asked again, or after a reconnect, the agent answers with the result it holds.
        assert spool.get("job-1").state == "done" and spool.get("job-1").output == {"x": 1}
        assert [r.id for r in spool.unacked_results()] == ["job-1"]
        assert spool.attempt(record) and spool.get("job-1").attempts == 1
        on_disk = json.loads(next(tmp_path.glob("*.json")).read_text())
        assert on_disk["state"] == "running"
    # Room again: the next look at the records saves it.
    assert [r.id for r in spool.unacked_results()] == ["job-1"]
    on_disk = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert on_disk["state"] == "done" and on_disk["output"] == {"x": 1} and on_disk["attempts"] == 1
    spool.ack("job-1")
    assert spool.unacked_results() == []


def test_a_job_that_cannot_be_recorded_is_not_started(tmp_path, monkeypatch):
    import errno

    import pytest

    spool = Spool(tmp_path)
    _disk_full(monkeypatch)
    with pytest.raises(OSError) as caught:
        spool.start("job-2", "diag.wait")
    assert caught.value.errno == errno.ENOSPC and spool.get("job-2") is None


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path):
    import pytest

    from agent.runtime.config import write_atomic

    target = tmp_path / "record.json"
    (target / "in-the-way").mkdir(parents=True)  # replacing a directory fails, as a full disk would
    with pytest.raises(OSError):
        write_atomic(target, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_why_a_write_failed_names_the_room_left_only_when_the_disk_is_full(tmp_path):
    import errno

    from agent.runtime.facts import unwritable

    full = unwritable(tmp_path, OSError(errno.ENOSPC, "No space left on device"))
    assert full.startswith("No space left on device, ") and full.endswith(" bytes free")
    assert unwritable(tmp_path, OSError(errno.EROFS, "Read-only file system")) == "Read-only file system"
