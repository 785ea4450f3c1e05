"""Jobs sent to agents: recorded before they are sent, finished once."""

import json
from dataclasses import dataclass

from contract.failures import FailureKind

from ..errors import Conflict
from .base import Store


@dataclass(frozen=True)
class Job:
    id: str
    agent: str
    kind: str
    params_sealed: str
    state: str
    output: dict | None
    error: str | None
    retryable: bool | None
    progress: dict | None
    # The FailureKind's value of a failed job.
    error_code: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed")

    @property
    def failure(self) -> FailureKind | None:
        return FailureKind.parse(self.error_code) if self.state == "failed" else None

def _job(row: dict) -> Job:
    return Job(
        id=row["id"], agent=row["agent"], kind=row["kind"], params_sealed=row["params_sealed"],
        state=row["state"], output=row["output"], error=row["error"],
        retryable=row["retryable"], progress=row["progress"], error_code=row.get("error_code"),
    )


class JobStore(Store):
    async def create_job(self, job_id: str, agent: str, kind: str, params_sealed: str) -> tuple[Job, bool]:
        """Records a job once; returns (job, created). A known id returns the existing job."""
        row = await self._one(
            "INSERT INTO jobs (id, agent, kind, params_sealed) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING *",
            (job_id, agent, kind, params_sealed),
        )
        if row is not None:
            return _job(row), True
        existing = await self.get_job(job_id)
        if existing.agent != agent or existing.kind != kind:
            raise Conflict(f"job {job_id} already exists for another agent or kind")
        return existing, False

    async def get_job(self, job_id: str) -> Job | None:
        row = await self._one("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return _job(row) if row else None

    async def open_jobs(self, agent: str) -> list[Job]:
        rows = await self._all(
            "SELECT * FROM jobs WHERE agent = %s AND state IN ('pending', 'sent') ORDER BY created_at",
            (agent,),
        )
        return [_job(r) for r in rows]

    async def job_sent(self, job_id: str) -> None:
        await self._one(
            "UPDATE jobs SET state = 'sent', updated_at = now()"
            " WHERE id = %s AND state = 'pending' RETURNING 1",
            (job_id,),
        )

    async def abandon_jobs(self, agent: str, kind: str, error: str) -> list[str]:
        """Closes an agent's open jobs of one kind as failed, so no reconnect sends them again."""
        rows = await self._all(
            "UPDATE jobs SET state = 'failed', error = %s, retryable = true, error_code = %s,"
            " updated_at = now(), finished_at = now()"
            " WHERE agent = %s AND kind = %s AND state IN ('pending', 'sent') RETURNING id",
            (error, FailureKind.UNAVAILABLE.value, agent, kind),
        )
        return [r["id"] for r in rows]

    async def forget_job_output(self, job_id: str) -> None:
        """Drops a finished job's output (its kind's results are not kept once delivered)."""
        await self._one("UPDATE jobs SET output = NULL WHERE id = %s RETURNING 1", (job_id,))

    async def abandon_job(self, job_id: str, error: str) -> bool:
        """Closes one open job as failed (its caller gave up on it), so no reconnect sends it again and
        a late result changes nothing; False when it had already finished."""
        row = await self._one(
            "UPDATE jobs SET state = 'failed', error = %s, retryable = true, error_code = %s,"
            " updated_at = now(), finished_at = now() WHERE id = %s AND state IN ('pending', 'sent') RETURNING id",
            (error, FailureKind.TIMEOUT.value, job_id))
        return row is not None

    async def job_progress(self, job_id: str, progress: dict) -> None:
        await self._one(
            "UPDATE jobs SET progress = %s, updated_at = now()"
            " WHERE id = %s AND state IN ('pending', 'sent') RETURNING 1",
            (json.dumps(progress), job_id),
        )

    async def job_finished(
        self, job_id: str, agent: str, ok: bool, output: dict | None, error: str, retryable: bool,
        failure: FailureKind | None = None,
    ) -> Job | None:
        """Records a result once; a repeated result for a finished job changes nothing."""
        row = await self._one(
            "UPDATE jobs SET state = %s, output = %s, error = %s, retryable = %s, error_code = %s,"
            " updated_at = now(), finished_at = now()"
            " WHERE id = %s AND agent = %s AND state IN ('pending', 'sent') RETURNING *",
            ("succeeded" if ok else "failed", json.dumps(output) if output is not None else None,
             None if ok else error, None if ok else retryable, 
             None if ok else (failure or FailureKind.INTERNAL).value,
             job_id, agent),
        )
        return _job(row) if row else None
