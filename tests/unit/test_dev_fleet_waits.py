"""`flux dev up` waits for what it started: a process that exited ends the wait at once."""
import sys

import pytest

from devtools.fleet import CliError, spawn, terminate, wait_for


def test_a_process_that_exited_ends_the_wait_with_its_log_named(tmp_path):
    log = tmp_path / "thing.log"
    pid = spawn([sys.executable, "-c", "print('bad setting'); raise SystemExit(3)"], log)
    with pytest.raises(CliError, match=r"^the thing exited before it came up; see .*thing\.log$"):
        wait_for(lambda: False, 60, "the thing", log, pid)
    assert "bad setting" in log.read_text()


def test_a_running_process_is_waited_for_until_the_timeout(tmp_path):
    log = tmp_path / "slow.log"
    pid = spawn([sys.executable, "-c", "import time; time.sleep(60)"], log)
    try:
        with pytest.raises(CliError, match=r"^the slow thing did not come up within 0\.5s"):
            wait_for(lambda: False, 0.5, "the slow thing", log, pid)
        calls = []
        assert wait_for(lambda: calls.append(1) or len(calls) > 2 and "up", 30, "the slow thing", log, pid) == "up"
    finally:
        terminate(pid)
