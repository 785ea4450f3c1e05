"""`flux-agent run`: keeps one stream to the controller and executes jobs sent over it.

The agent dials; it reconnects by itself with capped, jittered backoff. Results are
written to the spool before they are sent and sent again after every reconnect until
the controller acknowledges them, a bounded number of times (see spool.py).
"""

import asyncio
import dataclasses
import logging
import os
import random
import secrets
import signal
import time

import grpc
import psycopg

import observe
from contract.failures import FailureKind

from . import facts as facts_mod
from . import metrics
from . import wire
from .config import AgentConfig, StateDir
from . import settings as settings_mod
from ..errors import AgentError, Revoked
from .identity import (certificate_expired, certificate_expiry, needs_renewal, new_key_and_csr,
                       seconds_until_renewal)
from .. import handlers
from ..adapters.poolapi import PoolApi
from .spool import JobRecord, Spool
from .transfers import Transfers
from .systemd import notify

log = logging.getLogger(__name__)

# The longest wait between two tries when there are several controllers to go round.
FAILOVER_DELAY_S = 1.5
# A connected agent looks at its certificate's age at least this often, and tries a failed renewal again after:
RENEWAL_CHECK_S = 3600.0
RENEWAL_RETRY_S = 30
# How often a docker agent looks at its stacks, and resends them unchanged.
STATUS_POLL_S = 2.0
STATUS_RESEND_S = 30.0


def finish_renewal(state: StateDir) -> None:
    """Puts a renewed key and certificate in place, whichever of them is still waiting."""
    for name in ("key.pem", "cert.pem"):
        pending = state.file(name + ".new")
        if pending.exists():
            os.replace(pending, state.file(name))


# Put in a session's outbox when the session ends: its requests end with it.
_STREAM_ENDED = object()


class Backoff:
    def __init__(self, initial: float = 0.5, cap: float = 5.0, factor: float = 2.0):
        self.initial, self.cap, self.factor = initial, cap, factor
        self.attempt = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.initial * self.factor ** self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.8, 1.0)

    def reset(self) -> None:
        self.attempt = 0


class Agent:
    def __init__(self, state: StateDir, tools: dict[str, str] | None = None):
        self.state = state
        self.config: AgentConfig = state.load()
        finish_renewal(state)
        self.spool = Spool(state.spool)
        self.tools = facts_mod.tool_versions() if tools is None else tools
        self.settings = settings_mod.load(state)
        # The pooled API, when this db agent runs it (settings db.pool_api).
        self.pool_api: PoolApi | None = None
        # Each role's code is imported by agents of that role only (handlers.load): a db agent
        # never loads the Docker SDK, a gateway agent neither that nor the tenants' SQL.
        handlers.load(self.config.roles)
        self.gateway = None
        if "gateway" in self.config.roles and "gateway" in self.settings:
            from ..adapters.caddy import Gateway
            self.gateway = Gateway(state.path, self.settings["gateway"])
        # A db agent's write guards (migrations) and online syncs, for as long as it runs.
        self.owned: dict = {}
        if "db" in self.config.roles:
            from ..adapters.changes import Syncs
            from ..adapters.guards import WriteGuards
            self.owned = {"guards": WriteGuards(), "syncs": Syncs()}
        # Files sent to or read from the controller by jobs, over the current connection.
        self.transfers = Transfers()
        self.outbox: asyncio.Queue | None = None
        # Lease requests not answered yet: nonce to when it was sent (monotonic).
        self.lease_requests: dict[str, float] = {}
        # Results sent on the current stream: each goes once per connection.
        self.sent_on_stream: set[str] = set()
        self.running: dict[str, asyncio.Task] = {}
        self.heartbeat_seconds = 10
        # Set when the stacks may have changed (a job ended): a docker agent reports them at once.
        self.report_now = asyncio.Event()
        # Which of the controllers' addresses the next connection tries (see addresses()).
        self.attempt = 0

    def addresses(self) -> list[str]:
        """The controller it enrolled through first, then every other one it was told of."""
        return [self.config.controller, *(a for a in self.config.controllers if a != self.config.controller)]

    def facts(self) -> wire.Facts:
        return wire.Facts(
            hostname=facts_mod.hostname(), agent_version=facts_mod.agent_version(),
            tools=self.tools, spool_free_bytes=facts_mod.free_bytes(self.state.spool),
            roles=list(self.config.roles),
        )

    def collect_facts(self) -> dict:
        self.tools = facts_mod.tool_versions()
        f = self.facts()
        return {"hostname": f.hostname, "agent_version": f.agent_version, "tools": f.tools,
                "spool_free_bytes": f.spool_free_bytes, "roles": f.roles}

    def send(self, message) -> None:
        """Queues a message for the current stream; dropped while disconnected (the spool keeps results)."""
        if self.outbox is not None:
            self.outbox.put_nowait(message)

    # jobs

    def on_job(self, request: wire.JobRequest) -> None:
        record = self.spool.get(request.job_id)
        if record is not None:
            log.info("job %s (%s) received again while %s; not run twice",
                     record.id, record.kind, record.state)
            if record.state == "done":
                self._send_result(record)
            return
        try:
            record = self.spool.start(request.job_id, request.kind)
        except OSError as exc:
            # Not run: a job the agent cannot record could run twice. Space may come back, so the
            # controller may send it again.
            where = self.spool.directory
            why = f"the agent cannot record the job in {where} ({facts_mod.unwritable(where, exc)})"
            log.error("job %s (%s) refused: %s", request.job_id, request.kind, why)
            self.send(wire.result(request.job_id, False, None, why, True, FailureKind.UNAVAILABLE))
            return
        log.info("job %s (%s) started", record.id, record.kind)
        self.running[record.id] = asyncio.create_task(self._run(record, request))

    async def _run(self, record: JobRecord, request: wire.JobRequest) -> None:
        def progress(phase: str, done: int, total: int, unit: str, message: str) -> None:
            self.send(wire.progress(record.id, phase, done, total, unit, message))

        observe.JOB_ID.set(record.id)  # this task's log lines carry it
        started = time.monotonic()
        metrics.JOBS_RUNNING.inc()
        try:
            result = await handlers.run(request.kind, request.params, job_id=record.id, progress=progress,
                                        collect_facts=self.collect_facts, settings=self.settings,
                                        gateway=self.gateway, state_dir=self.state.path,
                                        transfers=self.transfers, **self.owned)
            self.spool.finish(record, True, result.to_wire(), "", False)
        except AgentError as exc:
            self.spool.finish(record, False, None, exc.message, exc.retryable, exc.kind)
        except Exception as exc:
            log.exception("job %s (%s) failed unexpectedly", record.id, request.kind)
            self.spool.finish(record, False, None, f"{type(exc).__name__}: {exc}", False, FailureKind.INTERNAL)
        finally:
            self.running.pop(record.id, None)
            metrics.JOBS_RUNNING.dec()
            metrics.JOBS.labels(request.kind, "succeeded" if record.ok else "failed").inc()
            metrics.JOB_SECONDS.labels(request.kind).observe(time.monotonic() - started)
        log.info("job %s (%s) finished: %s", record.id, record.kind, "ok" if record.ok else record.error)
        self._send_result(record)
        self.report_now.set()
        if request.kind == "gateway.sync" and record.ok:
            self.request_lease()

    def _send_result(self, record: JobRecord) -> None:
        """Sends a spooled result, unless it was tried too often; a result too large goes as a failure."""
        if self.outbox is None or record.id in self.sent_on_stream:
            return
        self.sent_on_stream.add(record.id)
        if not record.dropped and not self.spool.attempt(record):
            log.error("job %s (%s): result dropped from the spool after %d delivery attempts without "
                      "an acknowledgement", record.id, record.kind, record.attempts)
        if record.dropped:
            # Small enough to go through whatever stopped the result itself.
            self.send(wire.result(record.id, False, None, f"the agent dropped this job's result after "
                                  f"{record.attempts} delivery attempts", False, FailureKind.INTERNAL))
            return
        message = wire.result(record.id, record.ok, record.output, record.error, record.retryable,
                              record.failure)
        size = wire.size(message)
        if size > wire.MAX_MESSAGE_BYTES:
            log.error("job %s (%s): result of %d bytes is over the message limit; reporting a failure",
                      record.id, record.kind, size)
            self.spool.replace_result(record, f"the job's result is {size} bytes, over the "
                                      f"{wire.MAX_MESSAGE_BYTES}-byte limit of a message to the controller",
                                      FailureKind.INVALID)
            message = wire.result(record.id, False, None, record.error, False, record.failure)
        self.send(message)

    async def _renew_in_time(self, channel, call) -> None:
        """Renews the certificate while connected, once two thirds of its lifetime are gone, then
        ends the stream: the next connection is made with the new certificate."""
        while True:
            wait = seconds_until_renewal(self.state.read("cert.pem"))
            if wait > 0:
                await asyncio.sleep(min(wait, RENEWAL_CHECK_S))
                continue
            try:
                await self._renew(channel)
            except (AgentError, grpc.RpcError) as exc:
                message = exc.message if isinstance(exc, AgentError) else str(exc.details() or exc.code())
                log.warning("renewing this agent's certificate failed (tried again in %ds): %s",
                            RENEWAL_RETRY_S, message)
                await asyncio.sleep(RENEWAL_RETRY_S)
                continue
            log.info("reconnecting with the renewed certificate")
            call.cancel()
            return

    async def _renew(self, channel) -> None:
        key_pem, csr_pem = new_key_and_csr(self.config.name)
        cert_pem = await wire.renew(channel, csr_pem)
        # Both new files are complete before either replaces the old one; a crash in between
        # is finished by `finish_renewal` when the agent starts again.
        try:
            self.state.write("key.pem.new", key_pem, secret=True)
            self.state.write("cert.pem.new", cert_pem)
        except OSError as exc:
            raise AgentError(f"the renewed certificate could not be saved in {self.state.path} "
                             f"({facts_mod.unwritable(self.state.path, exc)})", retryable=True) from None
        finish_renewal(self.state)
        log.info("renewed this agent's certificate until %s", certificate_expiry(cert_pem))

    def _bootstrap_shared_cluster(self) -> None:
        """Prepares the shared cluster at start so the pooled PostgREST can log in before any tenant exists."""
        from ..adapters import tenants

        try:
            with tenants.connect(self.settings["db"]) as conn:
                tenants.bootstrap(conn, self.settings["db"])
        except (AgentError, psycopg.Error) as exc:
            log.warning("shared cluster bootstrap failed (retried with the first tenant job): %s", exc)

    # the stream

    async def _requests(self, outbox: asyncio.Queue):
        yield wire.hello(self.facts())
        while (message := await outbox.get()) is not _STREAM_ENDED:
            yield message

    async def _leases(self) -> None:
        """A gateway asks for its lease again a few times per lease, and every second while it has
        none or was refused one: the interval is looked at each second, since the answer to a
        request comes after it was sent."""
        while True:
            self.request_lease()
            asked = time.monotonic()
            await asyncio.sleep(1.0)
            while time.monotonic() - asked < self.gateway.renew_interval():
                await asyncio.sleep(1.0)

    def request_lease(self) -> None:
        if self.gateway is None or self.outbox is None:
            return
        nonce = secrets.token_hex(8)
        # Only the latest few requests can still be answered usefully.
        if len(self.lease_requests) > 16:
            self.lease_requests.clear()
        self.lease_requests[nonce] = time.monotonic()
        self.send(wire.lease_request(nonce))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            self.send(wire.heartbeat(self.facts()))

    def _know_controllers(self, addresses) -> None:
        """Keeps every controller's address, to go round them when the one it uses goes away (none
        when there is one controller)."""
        if list(addresses) != self.config.controllers:
            self.config = dataclasses.replace(self.config, controllers=list(addresses))
            log.info("controllers on this fleet: %s", ", ".join(addresses) or "one")
            try:
                self.state.save(self.config)
            except OSError as exc:  # known for this run; saved with the next change
                log.error("the controllers' addresses could not be saved in %s (%s)", self.state.path,
                          facts_mod.unwritable(self.state.path, exc))

    async def _status_reports(self) -> None:
        """A docker agent's stacks: sent once per connection at its start, then whenever they change
        (looked at every STATUS_POLL_S, and at once after a job), and every STATUS_RESEND_S anyway so
        the controller knows how fresh they are."""
        from ..adapters import stacks

        last, sent_at = None, 0.0
        while True:
            self.report_now.clear()
            try:
                report = (await asyncio.to_thread(stacks.report), "")
            except AgentError as exc:
                report = ({}, exc.message)
            except Exception as exc:  # whatever the engine's client raises, the controller hears of it
                report = ({}, f"cannot ask the Docker engine: {type(exc).__name__}: {exc}")
            if report != last or time.monotonic() - sent_at >= STATUS_RESEND_S:
                self.send(wire.status_report(*report))
                last, sent_at = report, time.monotonic()
            try:
                await asyncio.wait_for(self.report_now.wait(), STATUS_POLL_S)
            except asyncio.TimeoutError:
                pass

    async def session(self, backoff: Backoff) -> None:
        """One connection, until it ends; raises AgentError saying why."""
        addresses = self.addresses()
        host_port = addresses[self.attempt % len(addresses)]
        if certificate_expired(self.state.read("cert.pem")):
            raise AgentError(
                f"this agent's certificate expired at {certificate_expiry(self.state.read('cert.pem'))}: it was "
                f"away longer than it could renew; enroll it again with a join token made for it (flux agents "
                f"token --name {self.config.name}) and "
                f"the same --name {self.config.name} and --state-dir {self.state.path}, which keeps its spool "
                "and settings; it connects as soon as that is done", retryable=True)
        channel = wire.mtls_channel(
            host_port, self.state.read("ca.pem"), self.state.read("key.pem"),
            self.state.read("cert.pem"), self.config.server_name,
        )
        outbox: asyncio.Queue = asyncio.Queue()
        heartbeats = leases = reports = renewal = None
        try:
            call = wire.open_stream(channel, self._requests(outbox))
            self.transfers.bind(channel, asyncio.get_running_loop())
            self.outbox = outbox
            self.sent_on_stream = set()
            async for message in call:
                event = wire.decode(message)
                if isinstance(event, wire.Welcome):
                    log.info("connected to the controller at %s as %s", host_port, self.config.name)
                    metrics.CONNECTED.set(1)
                    backoff.reset()
                    self._know_controllers(event.controllers)
                    if needs_renewal(self.state.read("cert.pem")):
                        await self._renew(channel)
                        raise AgentError("certificate renewed; reconnecting with it", retryable=True)
                    self.heartbeat_seconds = event.heartbeat_seconds
                    # Once the stream is up, so that an attempt counts only when one was possible.
                    for record in self.spool.unacked_results():
                        self._send_result(record)
                    if heartbeats is None:
                        heartbeats = asyncio.create_task(self._heartbeats())
                    if leases is None and self.gateway is not None:
                        leases = asyncio.create_task(self._leases())
                    if reports is None and "docker" in self.config.roles:
                        reports = asyncio.create_task(self._status_reports())
                    if renewal is None:
                        renewal = asyncio.create_task(self._renew_in_time(channel, call))
                elif isinstance(event, wire.ControllerList):
                    self._know_controllers(event.addresses)
                elif isinstance(event, wire.JobRequest):
                    self.on_job(event)
                elif isinstance(event, wire.Ping):
                    self.send(wire.pong(event.nonce))
                elif isinstance(event, wire.Ack):
                    self.spool.ack(event.job_id)
                elif isinstance(event, wire.LeaseGrant):
                    asked = self.lease_requests.pop(event.nonce, None)
                    if asked is not None and self.gateway is not None:
                        self.gateway.lease(asked, event.seconds)
            raise AgentError("the controller closed the stream", retryable=True)
        except grpc.RpcError as exc:
            raise wire.translate(exc, f"connection to {host_port}") from None
        except asyncio.CancelledError:
            # The stream, not this task, was cancelled: the certificate was renewed under it.
            if renewal is not None and renewal.done() and not asyncio.current_task().cancelling():
                raise AgentError("certificate renewed; reconnecting with it", retryable=True) from None
            raise
        finally:
            metrics.CONNECTED.set(0)
            self.outbox = None
            # gRPC reads the requests in a task of its own that it cancels only when the call is
            # cancelled, not when the stream ends: ended here, it finishes before the channel
            # closes, instead of being destroyed pending (an asyncio error in the log).
            outbox.put_nowait(_STREAM_ENDED)
            self.transfers.bind(None, None)
            for task in (heartbeats, leases, reports, renewal):
                if task is not None:
                    task.cancel()
            await channel.close()

    async def run(self) -> None:
        for record in self.spool.recover():
            log.warning("job %s (%s) was interrupted by a restart; reporting it failed",
                        record.id, record.kind)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if "db" in self.settings:
            await asyncio.to_thread(self._bootstrap_shared_cluster)
            pool_api = self.settings["db"].pool_api
            if pool_api is not None:
                self.pool_api = PoolApi(self.state.path, pool_api["command"], pool_api.get("env", {}))
                await self.pool_api.start()
        if self.gateway is not None:
            await self.gateway.start()
        notify("READY=1")
        lag = asyncio.create_task(observe.keep_measuring_loop_lag(metrics.LOOP_LAG_SECONDS))
        backoff = Backoff()
        while not stop.is_set():
            session = asyncio.create_task(self.session(backoff))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                session.cancel()
                break
            stopper.cancel()
            try:
                session.result()
            except Revoked:
                raise
            except AgentError as exc:
                delay = backoff.next_delay()
                # The next controller, if there are several: this one is away or does not lead. A
                # new leader takes over within seconds: the agent goes round them quickly.
                self.attempt += 1
                if len(self.addresses()) > 1:
                    delay = min(delay, FAILOVER_DELAY_S)
                log.warning("%s; reconnecting in %.1fs", exc.message, delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        lag.cancel()
        for task in list(self.running.values()):
            task.cancel()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.pool_api is not None:
            await self.pool_api.stop()
        for owned in self.owned.values():
            owned.close()
        log.info("agent stopped")
