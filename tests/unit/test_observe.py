"""Logs as JSON lines carry the ids of their work; the gateway follows Caddy's access log."""

import asyncio
import json
import logging
import os

import pytest

import observe
from agent.adapters.caddy import AccessLogReader


def _record(message: str, *args) -> logging.LogRecord:
    return logging.LogRecord("controller.migrate", logging.WARNING, __file__, 1, message, args, None)


def test_a_json_line_carries_the_job_migration_and_request_it_was_logged_in():
    formatter = observe.JsonLines()

    async def in_a_job():
        observe.JOB_ID.set("j-1")
        observe.MIGRATION_ID.set("m-2")
        return formatter.format(_record("step %s took %.1fs", "copy", 2.5))

    line = json.loads(asyncio.run(in_a_job()))
    assert line["message"] == "step copy took 2.5s"
    assert line["level"] == "warning" and line["logger"] == "controller.migrate"
    assert line["job"] == "j-1" and line["migration"] == "m-2" and "request" not in line
    assert line["ts"].endswith("Z")
    # Outside that task, nothing of it leaks into the next line.
    assert "job" not in json.loads(formatter.format(_record("idle")))


def test_a_json_line_holds_the_exception_on_one_line():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("agent", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    text = observe.JsonLines().format(record)
    assert "\n" not in text and "ValueError: bad\\nvalue" in text


def test_a_log_format_or_metrics_address_that_is_wrong_is_named():
    with pytest.raises(ValueError, match="--log-format must be one of text, json"):
        observe.configure_logging("info", "xml")
    for bad in ("9100", "localhost:", "localhost:http", "host:70000"):
        with pytest.raises(ValueError, match="--metrics-listen must be HOST:PORT"):
            observe.parse_listen(bad)
    assert observe.parse_listen("[::1]:0") == ("::1", 0)


def _entry(host: str, status: int, duration: float) -> bytes:
    return json.dumps({"request": {"host": host}, "status": status, "duration": duration}).encode() + b"\n"


def test_the_access_log_reader_counts_each_request_once_across_partial_lines_and_rollover(tmp_path):
    log = tmp_path / "access.log"
    log.write_bytes(_entry("old.localhost", 200, 0.1))
    reader = AccessLogReader(log)
    assert reader.new_entries() == []  # what was there before is not counted
    line = _entry("a.localhost:443", 201, 0.002)
    with open(log, "ab") as handle:
        handle.write(line[:10])
    assert reader.new_entries() == []  # half a line waits for its end
    with open(log, "ab") as handle:
        handle.write(line[10:] + b"not json\n" + _entry("B.localhost", 503, 0.5))
    assert reader.new_entries() == [("a.localhost", "201", 0.002), ("b.localhost", "503", 0.5)]
    assert reader.new_entries() == []
    os.rename(log, tmp_path / "access-1.log")  # Caddy rolls the file over
    log.write_bytes(_entry("c.localhost", 404, 0.01))
    assert reader.new_entries() == [("c.localhost", "404", 0.01)]


def test_the_loop_lag_histogram_shows_the_time_the_event_loop_was_held():
    """A callback that holds the loop for 0.3 s shows as a wake-up at least 0.2 s late."""
    import time

    import prometheus_client

    lag = prometheus_client.Histogram("lag_seconds", "test", buckets=(0.05, 0.2, 1),
                                      registry=prometheus_client.CollectorRegistry())

    async def scenario():
        measuring = asyncio.create_task(observe.keep_measuring_loop_lag(lag, every=0.05))
        await asyncio.sleep(0.3)
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)
        await asyncio.sleep(0.6)
        measuring.cancel()

    asyncio.run(scenario())
    samples = {(s.name, s.labels.get("le")): s.value for metric in lag.collect() for s in metric.samples}
    observed = samples[("lag_seconds_count", None)]
    assert observed >= 5
    assert observed - samples[("lag_seconds_bucket", "0.2")] >= 1, samples


def test_a_look_at_the_loop_lag_that_fails_to_be_recorded_does_not_stop_the_measuring(caplog):
    class Flaky:
        def __init__(self):
            self.seen = 0

        def observe(self, value):
            self.seen += 1
            if self.seen == 1:
                raise ValueError("the first look fails")

    flaky = Flaky()

    async def scenario():
        measuring = asyncio.create_task(observe.keep_measuring_loop_lag(flaky, every=0.01))
        await asyncio.sleep(0.2)
        assert not measuring.done()
        measuring.cancel()

    asyncio.run(scenario())
    assert flaky.seen >= 5
    assert "the event loop's lag could not be recorded" in caplog.text


def test_the_benchmarks_count_the_wake_ups_later_than_a_bucket_bound_from_two_scrapes():
    """Buckets count wake-ups at or under their bound: those more than 25 ms late are the total
    less the 25 ms bucket (not the one below it); a bound the buckets lack is refused."""
    import math

    from tests.support import lag_figures

    before = {0.005: 5, 0.025: 5, 0.05: 5, math.inf: 5}
    after = {0.005: 65, 0.025: 95, 0.05: 100, math.inf: 105}  # 100 more: 60, 30, 5 and 5 by bucket
    assert lag_figures(before, after, late_ms=25) == {
        "loop_lag_samples": 100, "loop_lag_p99_under_ms": None, "loop_lags_over_25ms": 10}
    assert lag_figures(before, after)["loop_lags_over_50ms"] == 5
    assert lag_figures(before, {**after, math.inf: 100})["loop_lag_p99_under_ms"] == 50.0
    with pytest.raises(ValueError, match="30 ms is not a bound"):
        lag_figures(before, after, late_ms=30)


def test_the_benchmarks_tell_the_share_of_cpu_time_the_hypervisor_took():
    """Steal is /proc/stat's eighth state; guest time (ninth and tenth) is in user's already."""
    from tests.support import cpu_times, steal_percent

    before = [100, 0, 50, 800, 0, 0, 0, 50, 0, 0]
    after = [300, 0, 100, 1450, 0, 0, 0, 150, 40, 0]  # 1,000 ticks more, 100 of them stolen
    assert steal_percent(before, after) == 10.0
    assert steal_percent(before, before) == 0.0
    now = cpu_times()
    assert len(now) >= 8 and 0.0 <= steal_percent(now, cpu_times()) <= 100.0


def test_looks_at_the_loop_lag_that_keep_failing_are_logged_once_a_period_with_their_count(caplog):
    """Ten failed looks a second logged each with its traceback would flood the log: the first is
    logged, then one line a period says how many failed since."""
    class Broken:
        seen = 0

        def observe(self, value):
            self.seen += 1
            raise ValueError("every look fails")

    broken = Broken()

    async def scenario():
        measuring = asyncio.create_task(observe.keep_measuring_loop_lag(broken, every=0.005, report_every=0.25))
        await asyncio.sleep(0.6)
        measuring.cancel()

    with caplog.at_level(logging.ERROR, logger="observe"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records if "could not be recorded" in r.getMessage()]
    assert broken.seen >= 20
    assert 2 <= len(lines) <= 4, lines
    assert "(1 look failed since the last report)" in lines[0]
    assert int(lines[1].split("(")[1].split()[0]) > 1, lines
