"""What the controller and the agents show their operator: Prometheus metrics on a listener of
their own (`--metrics-listen`), and logs as text or as JSON lines (`--log-format json`) that carry
the job, migration and request they belong to."""

import asyncio
import contextvars
import json
import logging
import sys
import time

import prometheus_client

# Set around the work they name; every log record made meanwhile carries them.
JOB_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
MIGRATION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("migration_id", default=None)
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_CONTEXT = (("job", JOB_ID), ("migration", MIGRATION_ID), ("request", REQUEST_ID))

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, the ids of the
    job, migration and request it was logged in, and the exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in _CONTEXT:
            value = var.get()
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Logs to stderr (the journal, under systemd) as text or JSON lines."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def parse_listen(value: str, option: str = "--metrics-listen") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{option} must be HOST:PORT (port 0 picks a free one), not {value!r}")
    return host, int(port)


def serve_metrics(listen: str) -> str:
    """Serves the process's metrics at http://HOST:PORT/metrics from a thread of their own (a busy
    event loop does not delay a scrape); returns the address bound."""
    host, port = parse_listen(listen)
    try:
        server, _thread = prometheus_client.start_http_server(port, addr=host)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {listen}: {exc.strerror}") from None
    bound = server.server_address
    return f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"


LOOP_LAG_EVERY_S = 0.1
# While looks at the lag keep failing, the most often that is logged.
LOOP_LAG_REPORT_EVERY_S = 60.0
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


async def keep_measuring_loop_lag(histogram: "prometheus_client.Histogram", every: float = LOOP_LAG_EVERY_S,
                                  report_every: float = LOOP_LAG_REPORT_EVERY_S) -> None:
    """Observes, `every` seconds, how much later than asked the event loop woke a sleep: what
    every other coroutine of the process waited meanwhile (a stream's message, a request).
    A look that cannot be recorded is logged, with its traceback; while looks keep failing, at
    most one line every `report_every` seconds says how many did since."""
    loop = asyncio.get_running_loop()
    failed, reported_at = 0, None
    while True:
        asked = loop.time() + every
        await asyncio.sleep(every)
        try:
            histogram.observe(max(0.0, loop.time() - asked))
        except Exception:  # noqa: BLE001 - one lost look; the measuring goes on
            failed += 1
            if reported_at is None or loop.time() - reported_at >= report_every:
                logging.getLogger(__name__).exception(
                    "the event loop's lag could not be recorded (%d look%s failed since the last report)",
                    failed, "" if failed == 1 else "s")
                failed, reported_at = 0, loop.time()
