"""Agents, join tokens and enrollment."""

import datetime
import json
from dataclasses import dataclass

import psycopg

from ..errors import Conflict, NotFound
from .base import Store


@dataclass(frozen=True)
class Agent:
    name: str
    roles: list[str]
    cert_serial: str
    cert_expires_at: datetime.datetime
    revoked_at: datetime.datetime | None
    last_seen: datetime.datetime | None
    facts: dict

def _agent(row: dict) -> Agent:
    return Agent(
        name=row["name"], roles=list(row["roles"]), cert_serial=row["cert_serial"],
        cert_expires_at=row["cert_expires_at"], revoked_at=row["revoked_at"],
        last_seen=row["last_seen"], facts=row["facts"] or {},
    )


class AgentStore(Store):
    async def create_join_token(
        self, token_hash: str, roles: list[str], expires_at: datetime.datetime, user_id: int,
        agent_name: str | None = None,
    ) -> None:
        await self._one(
            "INSERT INTO join_tokens (token_hash, roles, expires_at, created_by, agent_name)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING 1",
            (token_hash, roles, expires_at, user_id, agent_name),
        )

    async def enroll(
        self, token_hash: str, name: str, roles: list[str], register
    ) -> Agent:
        """Consumes a join token and records the agent, in one transaction.

        `register()` signs the certificate and returns (serial, not_after); it runs
        only once the token and the name have been checked.
        """
        async with self._connection() as conn, conn.transaction():
            token = await (await conn.execute(
                "SELECT roles, expires_at, used_at, expires_at < now() AS expired, agent_name"
                " FROM join_tokens WHERE token_hash = %s FOR UPDATE",
                (token_hash,),
            )).fetchone()
            if token is None:
                raise NotFound("join token is not known to this controller")
            if token["used_at"] is not None:
                raise Conflict("join token was already used")
            if token["expired"]:
                raise Conflict("join token has expired")
            extra = sorted(set(roles) - set(token["roles"]))
            if extra:
                raise Conflict(
                    f"join token does not grant role(s) {', '.join(extra)}"
                    f" (it grants {', '.join(token['roles'])})"
                )
            existing = await (await conn.execute(
                "SELECT revoked_at, cert_expires_at, cert_expires_at < now() AS expired"
                " FROM agents WHERE name = %s FOR UPDATE", (name,)
            )).fetchone()
            if token["agent_name"] is not None and token["agent_name"] != name:
                raise Conflict(f"join token was made for agent {token['agent_name']}, not {name}")
            if existing is not None and existing["revoked_at"] is None:
                if not existing["expired"]:
                    raise Conflict(f"an agent named {name} is already enrolled (its certificate is valid until "
                                   f"{existing['cert_expires_at']:%Y-%m-%d %H:%M:%S} UTC); revoke it first")
                # Its certificate ran out (it was away longer than its lifetime): it enrolls again
                # under its name, with a token made for that name only; no other host takes it over.
                if token["agent_name"] != name:
                    raise Conflict(f"agent {name} is enrolled and its certificate expired; enroll it again with "
                                   f"a join token made for it (flux agents token --name {name})")
            serial, not_after = register()
            row = await (await conn.execute(
                "INSERT INTO agents (name, roles, cert_serial, cert_expires_at)"
                " VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET roles = EXCLUDED.roles,"
                "  cert_serial = EXCLUDED.cert_serial, cert_expires_at = EXCLUDED.cert_expires_at,"
                "  enrolled_at = now(), revoked_at = NULL, facts = '{}'"
                " RETURNING *",
                (name, sorted(set(roles)), str(serial), not_after),
            )).fetchone()
            await conn.execute(
                "UPDATE join_tokens SET used_at = now(), used_by = %s WHERE token_hash = %s",
                (name, token_hash),
            )
        return _agent(row)

    async def get_agent(self, name: str) -> Agent | None:
        row = await self._one("SELECT * FROM agents WHERE name = %s", (name,))
        return _agent(row) if row else None

    async def list_agents(self) -> list[Agent]:
        return [_agent(r) for r in await self._all("SELECT * FROM agents ORDER BY name")]

    async def renew_agent(self, name: str, old_serial: str, new_serial: str,
                          not_after: datetime.datetime) -> bool:
        """Swaps an agent's certificate; False if the presented one is no longer its current one."""
        row = await self._one(
            "UPDATE agents SET cert_serial = %s, cert_expires_at = %s"
            " WHERE name = %s AND cert_serial = %s AND revoked_at IS NULL RETURNING 1",
            (new_serial, not_after, name, old_serial))
        return row is not None

    async def revoke_agent(self, name: str) -> bool:
        row = await self._one(
            "UPDATE agents SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s RETURNING 1",
            (name,),
        )
        return row is not None

    async def agent_hello(self, name: str, facts: dict, controller_id: str | None) -> None:
        """An agent connected (again), to `controller_id` when controllers share the catalog: it is
        seen, with its facts; what it reported of its stacks before is not current until it reports."""
        await self._one(
            "UPDATE agents SET last_seen = now(), facts = %s, stacks_reported_at = NULL,"
            " connected_to = coalesce(%s, connected_to) WHERE name = %s RETURNING 1",
            (json.dumps(facts), controller_id, name))

    async def stacks_reported(self, name: str, statuses: dict[str, str], engine_error: str) -> list[str]:
        """Records a docker agent's report of its stacks. With its engine reachable, each of its active
        dedicated projects takes the status reported for it (`missing` when absent); returns the ids
        of those whose status changed."""
        await self._one("UPDATE agents SET stacks_reported_at = now(), engine_error = %s WHERE name = %s"
                        " RETURNING 1", (engine_error, name))
        if engine_error:
            return []
        reported = json.dumps(statuses)
        rows = await self._all(
            "UPDATE projects SET observed_status = coalesce(%s::jsonb ->> id::text, 'missing')"
            " WHERE docker_agent = %s AND mode = 'v1_dedicated' AND lifecycle = 'active'"
            " AND observed_status IS DISTINCT FROM coalesce(%s::jsonb ->> id::text, 'missing')"
            " RETURNING id::text", (reported, name, reported))
        return [r["id"] for r in rows]

    async def stack_reports(self) -> dict[str, tuple[datetime.datetime | None, str, str | None]]:
        """Each docker agent's last report: when (None: not since it connected), its engine error, and
        the controller its stream is open to."""
        rows = await self._all("SELECT name, stacks_reported_at, engine_error, connected_to FROM agents"
                               " WHERE 'docker' = ANY(roles)")
        return {r["name"]: (r["stacks_reported_at"], r["engine_error"], r["connected_to"]) for r in rows}

    async def agents_seen(self, seen: dict[str, str | None]) -> list[str]:
        """Agents heard from (their heartbeats), each with its latest facts as JSON text (None: as
        they were), in one statement: thousands of agents' heartbeats are one write every few
        seconds. Returns the agents whose facts the catalog cannot hold (a NUL in a string): they
        are seen, facts as were, and no other agent's heartbeat is lost for them."""
        if not seen:
            return []
        try:
            await self._write_seen(seen)
            return []
        except psycopg.DataError:
            refused = []
            for name, facts in seen.items():
                try:
                    await self._write_seen({name: facts})
                except psycopg.DataError:
                    refused.append(name)
                    await self._write_seen({name: None})
            return refused

    async def _write_seen(self, seen: dict[str, str | None]) -> None:
        # The arrays go in binary (%b): in text, psycopg escapes every quote of every agent's facts
        # in Python, 27 ms for a round of 1,000 heartbeats with the event loop stopped (0.5 ms so).
        await self._one(
            "UPDATE agents SET last_seen = now(), facts = coalesce(seen.facts, agents.facts)"
            " FROM unnest(%b::text[], %b::jsonb[]) AS seen(name, facts) WHERE agents.name = seen.name"
            " RETURNING 1", (list(seen), list(seen.values())))
