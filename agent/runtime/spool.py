"""The job spool: one file per job, so results outlive connections and restarts.

A job is recorded as `running` before it starts and `done` with its result when it
ends; the file stays after the controller acknowledges the result, so a job sent
twice runs once. A `running` record left by an earlier process is a job that was
interrupted: it is closed as failed (retryable) when the agent starts.

A result is sent again after every reconnect until acknowledged, but not forever: after
MAX_DELIVERY_ATTEMPTS the record is dropped (its output discarded) and the agent reports it.
"""

import hashlib
import json
import logging
import os
import pathlib
import time
from dataclasses import asdict, dataclass

from contract.failures import FailureKind

from .config import write_atomic
from .facts import unwritable

log = logging.getLogger(__name__)

KEEP_ACKED_S = 7 * 24 * 3600
MAX_DELIVERY_ATTEMPTS = 10


@dataclass
class JobRecord:
    id: str
    kind: str
    state: str  # running | done
    pid: int
    started_at: float
    ok: bool = False
    output: dict | None = None
    error: str = ""
    retryable: bool = False
    # The FailureKind's value of a failed job.
    error_code: str = ""
    acked: bool = False
    finished_at: float | None = None
    attempts: int = 0
    dropped: bool = False

    @property
    def failure(self) -> FailureKind | None:
        return None if self.ok else FailureKind.parse(self.error_code)


class Spool:
    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Records changed while the disk was full: newer than their files.
        self._unsaved: dict[str, JobRecord] = {}

    def _path(self, job_id: str) -> pathlib.Path:
        return self.directory / (hashlib.sha256(job_id.encode()).hexdigest()[:40] + ".json")

    def _save(self, record: JobRecord) -> None:
        write_atomic(self._path(record.id), json.dumps(asdict(record)).encode())

    def _keep(self, record: JobRecord) -> bool:
        """Saves a record, or holds it in memory while the disk takes no more (saved with its next
        change): the agent goes on, its result is still sent, only not after a restart."""
        try:
            self._save(record)
        except OSError as exc:
            if record.id not in self._unsaved:
                log.error("job %s (%s): its record could not be written to %s (%s); held in memory",
                          record.id, record.kind, self.directory, unwritable(self.directory, exc))
            self._unsaved[record.id] = record
            return False
        self._unsaved.pop(record.id, None)
        return True

    def get(self, job_id: str) -> JobRecord | None:
        if job_id in self._unsaved:
            return self._unsaved[job_id]
        try:
            return JobRecord(**json.loads(self._path(job_id).read_bytes()))
        except FileNotFoundError:
            return None

    def records(self) -> list[JobRecord]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(JobRecord(**json.loads(path.read_bytes())))
            except (ValueError, TypeError):
                path.rename(path.with_suffix(".corrupt"))
        newer = dict(self._unsaved)
        for record in newer.values():
            self._keep(record)  # the disk may have room again
        return [newer.pop(r.id, r) for r in found] + list(newer.values())

    def start(self, job_id: str, kind: str) -> JobRecord:
        record = JobRecord(id=job_id, kind=kind, state="running", pid=os.getpid(),
                           started_at=time.time())
        self._save(record)
        return record

    def finish(self, record: JobRecord, ok: bool, output: dict | None, error: str,
               retryable: bool, failure: FailureKind | None = None) -> JobRecord:
        record.state = "done"
        record.ok, record.output, record.error, record.retryable = ok, output, error, retryable
        record.error_code = failure.value if failure else ""
        record.finished_at = time.time()
        self._keep(record)
        return record

    def ack(self, job_id: str) -> None:
        record = self.get(job_id)
        if record is not None and record.state == "done" and not record.acked:
            record.acked = True
            self._keep(record)

    def unacked_results(self) -> list[JobRecord]:
        return [r for r in self.records() if r.state == "done" and not r.acked and not r.dropped]

    def attempt(self, record: JobRecord) -> bool:
        """Counts one delivery attempt of a result; False (and the record dropped) past the bound."""
        if record.dropped or record.attempts >= MAX_DELIVERY_ATTEMPTS:
            record.dropped, record.output, record.ok = True, None, False
            self._keep(record)
            return False
        record.attempts += 1
        self._keep(record)
        return True

    def replace_result(self, record: JobRecord, error: str, failure: FailureKind) -> JobRecord:
        """Turns a result that cannot be delivered into a failure that can."""
        record.ok, record.output, record.error, record.retryable = False, None, error, False
        record.error_code = failure.value
        self._keep(record)
        return record

    def recover(self) -> list[JobRecord]:
        """Closes jobs an earlier process left running and forgets old acknowledged ones."""
        interrupted = []
        now = time.time()
        for record in self.records():
            if record.state == "running" and record.pid != os.getpid():
                # Sent again, a job of a kind that is safe to send again finishes what this one started.
                interrupted.append(self.finish(
                    record, False, None,
                    "the agent stopped while this job was running; it may have been partly done",
                    True, FailureKind.UNAVAILABLE))
            elif record.acked and record.finished_at and now - record.finished_at > KEEP_ACKED_S:
                self._path(record.id).unlink(missing_ok=True)
        return interrupted
