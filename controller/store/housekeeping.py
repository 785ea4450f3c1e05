"""What the catalog keeps for a while and then forgets: finished jobs, operations, dashboard
sessions, join tokens and controllers that stopped long ago. Nothing else in it grows without
an end of its own (projects, agents, users and tokens are removed by their owners; migrations,
backups and dump files have their own retention)."""

from dataclasses import dataclass

from .base import Store

# Rows go in batches this big: no delete holds its locks for long.
BATCH = 5000


@dataclass(frozen=True)
class Retention:
    # A finished job's row (its result and error; its parameters are sealed) after it finished.
    jobs_days: float = 30
    # The dashboard's record of a project's operations after each ran.
    operations_days: float = 90
    # A join token after it expired (used ones too: who enrolled with which, for a while).
    join_tokens_days: float = 30
    # A controller that has not been seen since (agents are told only of those seen in the last week).
    controllers_days: float = 30


_PRUNE = {
    "jobs": "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN ('succeeded', 'failed')"
            " AND finished_at < now() - make_interval(secs => %(secs)s) LIMIT %(batch)s)",
    "operations": "DELETE FROM operations WHERE id IN (SELECT id FROM operations"
                  " WHERE at < now() - make_interval(secs => %(secs)s) LIMIT %(batch)s)",
    # Expired sessions are of no use: they go at once.
    "sessions": "DELETE FROM sessions WHERE id_hash IN (SELECT id_hash FROM sessions WHERE expires_at < now()"
                " LIMIT %(batch)s)",
    "join_tokens": "DELETE FROM join_tokens WHERE token_hash IN (SELECT token_hash FROM join_tokens"
                   " WHERE expires_at < now() - make_interval(secs => %(secs)s) LIMIT %(batch)s)",
    # Never the one that holds the lease, however long ago it renewed it.
    "controllers": "DELETE FROM controllers WHERE id IN (SELECT id FROM controllers"
                   " WHERE seen_at < now() - make_interval(secs => %(secs)s)"
                   " AND id IS DISTINCT FROM (SELECT holder FROM controller_lease WHERE id = 1) LIMIT %(batch)s)",
}


class HousekeepingStore(Store):
    async def prune(self, retention: Retention) -> dict[str, int]:
        """Deletes what outlived its retention; the rows deleted, by table."""
        days = {"jobs": retention.jobs_days, "operations": retention.operations_days, "sessions": 0,
                "join_tokens": retention.join_tokens_days, "controllers": retention.controllers_days}
        deleted = {}
        for table, query in _PRUNE.items():
            deleted[table] = 0
            while True:
                async with self._connection() as conn:
                    cursor = await conn.execute(query, {"secs": days[table] * 86400, "batch": BATCH})
                deleted[table] += cursor.rowcount
                if cursor.rowcount < BATCH:
                    break
        return deleted
