"""The job spool: results kept until acknowledged; interrupted jobs closed on restart."""

import json
import os

from agent.spool import Spool


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
