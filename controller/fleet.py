"""The agents' side of the controller: live sessions, jobs and pings (the gRPC services are in rpc/).

`Fleet` is the registry of connected agents and the one place jobs are sent from.
Jobs are checked against the contract (contract/jobs.py), recorded in the catalog
before they are sent, sent again on every reconnect until their result arrives, and
acknowledged once recorded, so a result survives a dropped connection on either side.
A result is checked against the contract when it arrives; a failure raises the error
of its kind, and `run` sends a job again, as a new one, when the failure is retryable
and its kind safe to send again.
"""

import asyncio
import json
import logging
import re
import secrets
import time
import uuid

from contract.failures import FailureKind
from contract.jobs import KINDS, job_kind, runs_on
from contract.messages import ContractError

from . import __version__, metrics
from .rpc import wire
from .store import Catalog, Job
from .errors import BadRequest, Conflict, FluxError, NotFound, Revoked, Timeout, TooLarge, Unavailable
from .secretbox import SecretBox
from .transfers import Transfers

log = logging.getLogger(__name__)

# How often the leader looks for controllers that joined or left, to tell the agents.
ANNOUNCE_EVERY_S = 5

ROLES = ("db", "docker", "gateway", "backup")
AGENT_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
PING_TIMEOUT_S = 5.0
# Catalog connections the agents' streams may hold at once (of the pool's 10): the rest stay free
# for the API and the controller's own work, and when thousands of agents connect at once, their
# hellos wait their turn here, on an open stream, instead of failing after the pool's 5 s wait.
AGENT_CATALOG_SLOTS = 6
# Heartbeats are recorded together, this often (an agent's last_seen is at most this much behind).
SEEN_EVERY_S = 2.0
# A job whose failure is retryable, of a kind safe to send again, is sent this many times at
# most, waiting RETRY_BACKOFF_S, then twice that, between attempts (all within the caller's timeout).
MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 1.0


def shown(text: str, limit: int = 64) -> str:
    """Untrusted text as it may appear in a message or a log line: quoted, escaped, bounded."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def check_agent_name(name: str) -> str:
    if not AGENT_NAME.match(name or ""):
        raise BadRequest(
            f"invalid agent name {shown(name or '')}: use 1-63 lower-case letters, digits and hyphens"
        )
    return name


def check_roles(roles: list[str]) -> list[str]:
    if not roles:
        raise BadRequest(f"at least one role is required ({', '.join(ROLES)})")
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        listed = ", ".join(role if re.fullmatch(r"[a-z0-9_-]{1,32}", role) else shown(role, 32)
                           for role in unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        raise BadRequest(f"unknown role(s) {listed}; roles are {', '.join(ROLES)}")
    return sorted(set(roles))


class Session:
    """One connected agent's stream. What is sent waits in a list until the stream takes it, with
    CLOSED last once the stream is to end: no queue and no other waiter per agent, since a
    controller holds thousands of them (an idle asyncio.Queue, four deques, is 3 KB)."""

    __slots__ = ("name", "_pending", "_waiter", "closed", "close_reason", "revoked", "pings")
    CLOSED = object()

    def __init__(self, name: str):
        self.name = name
        self._pending: list = []
        self._waiter: asyncio.Future | None = None
        self.closed = False
        self.close_reason: str | None = None
        self.revoked = False
        self.pings: dict[str, asyncio.Future] = {}

    def _put(self, message) -> None:
        self._pending.append(message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def send(self, message) -> None:
        if not self.closed:
            self._put(message)

    async def take(self) -> list:
        """What was sent since the last take, oldest first; waits while there is nothing. Only the
        stream takes."""
        while not self._pending:
            if self._waiter is not None:
                raise RuntimeError(f"session {self.name}: a second taker while one waits")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        taken, self._pending = self._pending, []
        return taken

    def close(self, reason: str | None, *, revoked: bool = False) -> None:
        """Ends the stream, with `reason` told to the agent (None: it ended by itself); the first
        reason given stands (a revocation is not turned into a step-down)."""
        if self.closed and self.close_reason is not None:
            return
        self.close_reason = reason
        self.revoked = revoked
        if not self.closed:
            self.closed = True
            self._put(self.CLOSED)


class AgentFailed(FluxError):
    """An agent ran a job and it failed for a reason none of the other kinds names."""

    status = 502


class AgentTooOld(Conflict):
    """An agent whose version predates a job's kind: it is not sent it."""


class ForeignObjects(Conflict):
    """A docker agent found another project's objects under a project's names and left them alone."""


class InvalidJob(FluxError):
    """A job off the contract: a bug in the controller, caught before the job is recorded."""


def _check_size(message, agent: str, kind: str) -> None:
    size = wire.size(message)
    if size > wire.MAX_MESSAGE_BYTES:
        raise TooLarge(f"job {kind} for agent {agent} is {size} bytes, over the "
                       f"{wire.MAX_MESSAGE_BYTES}-byte limit of a message to an agent; it was not sent")


FAILURES: dict[FailureKind, type[FluxError]] = {
    FailureKind.REVOKED: Revoked,
    FailureKind.NOT_FOUND: NotFound,
    FailureKind.CONFLICT: Conflict,
    FailureKind.TIMEOUT: Timeout,
    FailureKind.UNAVAILABLE: Unavailable,
    FailureKind.INVALID: BadRequest,
    FailureKind.INTERNAL: AgentFailed,
    FailureKind.FOREIGN: ForeignObjects,
}


def failure_error(job: Job) -> FluxError:
    """The error of a failed job, by its kind of failure."""
    return FAILURES[job.failure or FailureKind.INTERNAL](f"{job.error} (agent {job.agent})",
                                                         retryable=bool(job.retryable))


class Fleet:
    def __init__(self, catalog: Catalog, box: SecretBox, heartbeat_seconds: int = 10):
        self.catalog = catalog
        # Files on their way between hosts, relayed by this controller (transfers.py).
        self.transfers = Transfers()
        self.box = box
        self.heartbeat_seconds = heartbeat_seconds
        self.sessions: dict[str, Session] = {}
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._progress_listeners: dict[str, list] = {}
        # Told the name of every agent that says hello (a new connection).
        self.hello_listeners: list = []
        # Awaited with the agent's name and each StatusReport it sends.
        self.report_listeners: list = []
        # Seconds of lease for a gateway that asks for one; 0 refuses (see gateways.py).
        self.lease_granter = lambda name: 0
        # Which controller leads when several share the catalog (leader.py); None: this one, alone.
        self.leadership = None
        # The controllers' addresses as last announced to agents (keep_announcing_controllers).
        self._controllers: list[str] | None = None
        # Held around the catalog work an agent's stream asks for (its hello, heartbeats).
        self.agent_catalog_slots = asyncio.Semaphore(AGENT_CATALOG_SLOTS)
        # Agents whose heartbeat came since the last write, with their latest facts as JSON text
        # (keep_recording_seen). Text, not dicts: a string is nothing to Python's cyclic collector,
        # whereas thousands of agents' facts held for a round reached its oldest generation and
        # brought its next full collection nearer (memory.py).
        self._seen: dict[str, str | None] = {}
        # Agents whose facts the catalog refused: their heartbeats' facts are left out until they
        # connect again, so that one such agent does not cost every round a write per agent.
        self._facts_refused: set[str] = set()

    def leading(self) -> bool:
        """Agents connect to, and jobs are run by, the leading controller only."""
        return self.leadership is None or self.leadership.leading

    def connected(self, name: str) -> bool:
        return name in self.sessions

    # sessions

    def attach(self, session: Session) -> None:
        previous = self.sessions.get(session.name)
        if previous is not None:
            previous.close("replaced by a newer connection from the same agent")
        self.sessions[session.name] = session

    def detach(self, session: Session) -> None:
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
            if self.leadership is not None:
                asyncio.get_running_loop().create_task(self._disconnected(session.name))
        for future in session.pings.values():
            if not future.done():
                future.set_exception(Unavailable(f"agent {session.name} disconnected"))

    async def keep_announcing_controllers(self) -> None:
        """Tells connected agents of every controller on the catalog when one joins or leaves (new
        connections hear of them in their welcome)."""
        told = None
        while True:
            try:
                addresses = await self.catalog.controller_addresses()
            except FluxError:
                addresses = told
            if addresses != told:
                for session in list(self.sessions.values()):
                    session.send(wire.controller_list(addresses))
                told = self._controllers = addresses
            await asyncio.sleep(ANNOUNCE_EVERY_S)

    async def keep_recording_seen(self) -> None:
        """Writes the heartbeats heard since the last round, every SEEN_EVERY_S."""
        while True:
            await asyncio.sleep(SEEN_EVERY_S)
            seen, self._seen = self._seen, {}
            try:
                for name in await self.catalog.agents_seen(seen):
                    log.warning("agent %s reported facts the catalog cannot store; its earlier ones are kept"
                                " until it connects again", name)
                    self._facts_refused.add(name)
            except FluxError as exc:  # the next heartbeats come soon
                log.warning("cannot record %d agents' heartbeats: %s", len(seen), exc.message)

    async def controllers(self) -> list[str]:
        """Every controller's address for an agent's welcome: as last announced, or from the catalog
        until the first announcement (one query per connection is too many when thousands connect)."""
        if self.leadership is None:
            return []
        if self._controllers is None:
            return await self.catalog.controller_addresses()
        return self._controllers

    async def wait_connected(self, names: list[str], timeout: float) -> bool:
        """Waits until every one of the agents is connected, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not all(self.connected(name) for name in names):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)
        return True

    async def _disconnected(self, name: str) -> None:
        try:
            async with self.agent_catalog_slots:
                await self.catalog.agent_connected(name, None, was=self.leadership.id)
        except FluxError as exc:
            log.warning("cannot record that agent %s disconnected: %s", name, exc.message)

    def revoke(self, name: str) -> None:
        session = self.sessions.get(name)
        if session is not None:
            session.close(f"agent {name} is revoked", revoked=True)

    async def handle(self, session: Session, event: wire.AgentEvent) -> None:
        if isinstance(event, wire.Hello):
            self._facts_refused.discard(session.name)
            async with self.agent_catalog_slots:
                await self.catalog.agent_hello(session.name, event.facts.as_dict(),
                                               self.leadership.id if self.leadership is not None else None)
                jobs = await self.catalog.open_jobs(session.name)
            for job in jobs:
                await self._send_job(session, job)
            for listener in self.hello_listeners:
                listener(session.name)
        elif isinstance(event, wire.StatusReport):
            for listener in self.report_listeners:
                await listener(session.name, event)
        elif isinstance(event, wire.LeaseRequest):
            session.send(wire.lease_grant(event.nonce, self.lease_granter(session.name)))
        elif isinstance(event, wire.Heartbeat):
            metrics.HEARTBEATS.inc()
            facts = (json.dumps(event.facts.as_dict())
                     if event.facts and session.name not in self._facts_refused else None)
            self._seen[session.name] = facts if facts is not None else self._seen.get(session.name)
        elif isinstance(event, wire.Pong):
            future = session.pings.pop(event.nonce, None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())
        elif isinstance(event, wire.JobProgress):
            await self.catalog.job_progress(event.job_id, event.as_dict())
            for listener in self._progress_listeners.get(event.job_id, []):
                listener(event.as_dict())
        elif isinstance(event, wire.JobResult):
            await self._record_result(session, event)
            session.send(wire.ack(event.job_id))
            self._wake(event.job_id)

    async def _record_result(self, session: Session, event: wire.JobResult) -> None:
        """Records a job's result; output off its kind's result type fails the job as internal."""
        if not event.ok:
            await self.catalog.job_finished(event.job_id, session.name, False, None, event.error,
                                            event.retryable, event.failure)
            return
        job = await self.catalog.get_job(event.job_id)
        if job is None or job.agent != session.name:
            return
        try:
            if event.output_problem:
                raise ContractError(f"{job.kind} result", None, event.output_problem)
            output = job_kind(job.kind).parse_result(event.output).to_wire()
        except ContractError as exc:
            log.error("agent %s: job %s (%s): malformed result: %s", session.name, job.id, job.kind, exc)
            await self.catalog.job_finished(job.id, session.name, False, None,
                                            f"the agent's result does not match the contract: {exc}", False,
                                            FailureKind.INTERNAL)
            return
        await self.catalog.job_finished(job.id, session.name, True, output, "", False)

    # jobs

    async def submit(self, agent: str, kind: str, params: dict, job_id: str | None = None) -> Job:
        """Records a job and sends it if the agent is connected; a known id is not sent again.

        `params` must match the contract of `kind`: what is recorded and sent is them as it reads them.
        """
        try:
            params = job_kind(kind).parse_params(params).to_wire()
        except ContractError as exc:
            raise InvalidJob(f"job not sent to agent {agent}: {exc}") from None
        job_id = job_id or str(uuid.uuid4())
        known = await self.catalog.get_agent(agent)
        if known is None:
            raise NotFound(f"no agent named {agent}")
        if known.revoked_at is not None:
            raise Revoked(f"agent {agent} is revoked")
        reported = known.facts.get("agent_version") or ""
        if not runs_on(KINDS[kind], reported):
            raise AgentTooOld(f"agent {agent} runs flux-agent {reported}, which cannot run {kind}: that needs "
                              f"flux-agent {KINDS[kind].since} or later (this controller is {__version__}); "
                              "upgrade the agent's package")
        # Refused here, before it is recorded: an agent could never take it, and it would be
        # sent again on every reconnect.
        _check_size(wire.job_request(job_id, kind, params), agent, kind)
        sealed = self.box.seal(json.dumps(params).encode(), f"job:{job_id}")
        job, created = await self.catalog.create_job(job_id, agent, kind, sealed)
        session = self.sessions.get(agent)
        if created and session is not None:
            await self._send_job(session, job)
        return job

    async def _send_job(self, session: Session, job: Job) -> None:
        params = json.loads(self.box.open(job.params_sealed, f"job:{job.id}"))
        message = wire.job_request(job.id, job.kind, params)
        try:
            _check_size(message, session.name, job.kind)
        except TooLarge as exc:
            # A job recorded before the limit was checked: failed once, never sent.
            log.warning("job %s not sent: %s", job.id, exc.message)
            await self.catalog.job_finished(job.id, session.name, False, None, exc.message, False,
                                            FailureKind.INVALID)
            self._wake(job.id)
            return
        session.send(message)
        await self.catalog.job_sent(job.id)

    async def run(self, agent: str, kind: str, params: dict, timeout: float = 60, on_progress=None) -> dict:
        """Runs a job to its end and returns its output (its kind's result, as a dict); a failure
        raises the error of its kind.

        A retryable failure of a kind the contract marks safe to send again sends the job again,
        as a new job, up to MAX_ATTEMPTS times within `timeout`. `on_progress(dict)` hears the
        job's progress events as the agent streams them.
        """
        started = time.monotonic()
        outcome = "failed"
        try:
            output = await self._run(agent, kind, params, timeout, on_progress)
            outcome = "succeeded"
            return output
        except Timeout:
            outcome = "timeout"
            raise
        finally:
            metrics.JOBS.labels(kind, outcome).inc()
            metrics.JOB_SECONDS.labels(kind).observe(time.monotonic() - started)

    async def _run(self, agent: str, kind: str, params: dict, timeout: float, on_progress) -> dict:
        deadline = time.monotonic() + timeout
        again = kind in KINDS and KINDS[kind].idempotent
        attempt = 1
        while True:
            done = await self._run_once(agent, kind, params, deadline - time.monotonic(), on_progress)
            if not done.finished:
                message = f"agent {agent} did not finish {kind} within {timeout:g}s (job {done.id})"
                # Given up on: never sent again on a reconnect, where it could run long after its caller
                # moved on (a write guard taken after the rollback that released it).
                if await self.catalog.abandon_job(done.id, message):
                    raise Timeout(message)
                done = await self.catalog.get_job(done.id)
            if done.state != "failed":
                if kind in KINDS and not KINDS[kind].keeps_output:
                    await self.catalog.forget_job_output(done.id)
                return done.output
            error = failure_error(done)
            delay = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            if not (error.retryable and again and attempt < MAX_ATTEMPTS
                    and time.monotonic() + delay < deadline):
                raise error
            log.warning("job %s (%s) on agent %s failed, sending it again in %.1fs (attempt %d of %d): %s",
                        done.id, kind, agent, delay, attempt + 1, MAX_ATTEMPTS, done.error)
            await asyncio.sleep(delay)
            attempt += 1

    async def _run_once(self, agent: str, kind: str, params: dict, timeout: float, on_progress) -> Job:
        job_id = str(uuid.uuid4())
        if on_progress is not None:
            self._progress_listeners.setdefault(job_id, []).append(on_progress)
        try:
            job = await self.submit(agent, kind, params, job_id)
            return await self.wait(job.id, timeout)
        finally:
            self._progress_listeners.pop(job_id, None)

    async def wait(self, job_id: str, timeout: float) -> Job:
        """The job once finished, or as it stands when `timeout` runs out."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(future)
        try:
            job = await self.catalog.get_job(job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            if job.finished or timeout <= 0:
                return job
            try:
                await asyncio.wait_for(future, timeout)
            except asyncio.TimeoutError:
                pass
            return await self.catalog.get_job(job_id)
        finally:
            waiters = self._waiters.get(job_id, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(job_id, None)

    def _wake(self, job_id: str) -> None:
        for future in self._waiters.get(job_id, []):
            if not future.done():
                future.set_result(None)

    async def ping(self, name: str) -> float:
        session = self.sessions.get(name)
        if session is None:
            if await self.catalog.get_agent(name) is None:
                raise NotFound(f"no agent named {name}")
            raise Unavailable(f"agent {name} is not connected")
        nonce = secrets.token_hex(8)
        future = asyncio.get_running_loop().create_future()
        session.pings[nonce] = future
        started = time.perf_counter()
        session.send(wire.ping(nonce))
        try:
            answered = await asyncio.wait_for(future, PING_TIMEOUT_S)
        except asyncio.TimeoutError:
            session.pings.pop(nonce, None)
            raise Unavailable(f"agent {name} did not answer within {PING_TIMEOUT_S:g}s") from None
        return (answered - started) * 1000
