"""`flux-controller run`, the composition root: builds the catalog, the fleet, the services, and
the HTTP and gRPC servers, and runs them in one asyncio loop."""

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

import uvicorn

import observe

from . import memory, metrics
from .http import create_app
from .store import Catalog, Retention
from .config import ConfigError, StateDir
from .backups import Backups
from .dumpfiles import DumpFiles
from .fleet import Fleet
from .gateways import LEASE_S, Gateways
from .leader import Leadership
from .pki import CertificateAuthority, certificate_authority, due_for_renewal, not_after, server_names
from .migrate import Migrations
from .projects import Projects
from .rpc.server import RpcServers
from .secretbox import SecretBox
from .systemd import notify

# How often the leader deletes what outlived its retention.
HOUSEKEEPING_EVERY_S = 3600

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> "Listen":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
        return cls(host.strip("[]") or "0.0.0.0", int(port))

    def grpc_address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def renew_server_certificate(state: StateDir, ca: CertificateAuthority) -> bool:
    """Issues the controller's certificate again, for the same names, once two thirds of its
    lifetime are gone; new connections get it at once (rpc/server.py reads it per handshake)."""
    # A renewal a crash cut short: finished once both new files were written (the key is moved in
    # first, so a lone new certificate means its key is in place), else its lone new key dropped.
    if state.has("server.pem.new"):
        if state.has("server.key.new"):
            os.replace(state.file("server.key.new"), state.file("server.key"))
        os.replace(state.file("server.pem.new"), state.file("server.pem"))
    elif state.has("server.key.new"):
        state.file("server.key.new").unlink()
    current = state.read("server.pem")
    if not due_for_renewal(current):
        return False
    issued, key = ca.issue_server(server_names(current))
    # The key first: a certificate is never on disk without its key.
    state.write("server.key.new", key, secret=True)
    state.write("server.pem.new", issued.cert_pem)
    os.replace(state.file("server.key.new"), state.file("server.key"))
    os.replace(state.file("server.pem.new"), state.file("server.pem"))
    log.info("issued the controller's certificate again, valid until %s (the last one until %s)",
             issued.not_after.isoformat(), not_after(current).isoformat())
    return True


async def keep_server_certificate(state: StateDir, ca: CertificateAuthority, renewed=None) -> None:
    """Checks the controller's certificate a few times per third of its lifetime, at most hourly;
    `renewed()` is called after it was issued again."""
    every = min(3600.0, max(1.0, ca.server_lifetime.total_seconds() / 30))
    served = state.file("server.pem").stat().st_mtime_ns
    while True:
        await asyncio.sleep(every)
        try:
            renew_server_certificate(state, ca)
            # Whatever wrote it (this, or an operator): until it is taken, it is tried again.
            current = state.file("server.pem").stat().st_mtime_ns
            if current != served and renewed is not None:
                renewed()
            served = current
        except Exception:  # the next check tries again
            log.exception("renewing the controller's certificate failed")


async def serve(state: StateDir, http: Listen, fleet_listen: Listen, enroll_listen: Listen,
                heartbeat_seconds: int = 10, advertise_host: str | None = None,
                gateway_lease_seconds: int = LEASE_S, metrics_listen: str | None = None,
                http_tls: bool = False) -> None:
    config = state.load_config()
    ca = certificate_authority(state, config)
    renew_server_certificate(state, ca)
    catalog = Catalog(config.catalog_url)
    await catalog.open()
    behind = await catalog.pending_schema_versions()
    if behind:
        await catalog.close()
        raise ConfigError(f"the catalog schema lacks versions {behind}; run `flux-controller init "
                          f"--state-dir {state.path}` to upgrade it")
    shared = await catalog.shared_hashes()
    if shared:
        log.warning("%d project(s) share their hash with an older project of another owner (created before "
                    "hashes were unique across the catalog); they keep it, and the docker agent refuses "
                    "objects that are not theirs: %s", len(shared),
                    ", ".join(f"{p.slug} ({p.hash})" for p in shared[:20]))
    box = SecretBox(state.read("master.key"))
    fleet = Fleet(catalog, box, heartbeat_seconds=heartbeat_seconds)
    gateways = Gateways(catalog, fleet, box, config.base_domain, lease_seconds=gateway_lease_seconds)
    dump_files = DumpFiles(catalog, fleet, box, config.dump_retention_days)
    projects = Projects(catalog, fleet, box, gateways, dump_files)
    migrations = Migrations(catalog, fleet, projects, gateways)
    backups = Backups(catalog, fleet, box, projects,
                      config.backup_max_age_hours * 3600 if config.backup_max_age_hours else None)
    servers = RpcServers(state, catalog, fleet, ca)
    fleet_port, enroll_port = await servers.start(fleet_listen.grpc_address(), enroll_listen.host, enroll_listen.port)

    advertised = advertise_host or (enroll_listen.host if enroll_listen.host not in ("0.0.0.0", "::") else "127.0.0.1")
    app = create_app(catalog, fleet, projects, migrations, ca.fingerprint, f"{advertised}:{enroll_port}", backups,
                     forward_ca=str(state.file("ca.pem")) if http_tls else None)
    tls = {"ssl_certfile": str(state.file("server.pem")), "ssl_keyfile": str(state.file("server.key"))} \
        if http_tls else {}
    web = uvicorn.Server(uvicorn.Config(
        app, host=http.host, port=http.port, log_level="warning", access_log=False,
        lifespan="off", server_header=False, **tls))
    web.install_signal_handlers = lambda: None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    web_task = asyncio.create_task(web.serve())
    while not web.started:
        if web_task.done():
            await servers.stop(None)
            raise ConfigError(f"cannot serve HTTP on {http.host}:{http.port}")
        await asyncio.sleep(0.05)
    http_port = web.servers[0].sockets[0].getsockname()[1]
    http_host = advertise_host or (http.host if http.host not in ("0.0.0.0", "::") else "127.0.0.1")
    leadership = Leadership(catalog, f"{advertised}:{fleet_port}", f"{advertised}:{fleet_port}",
                            f"{http_host}:{http_port}")
    fleet.leadership = leadership
    metrics.AGENTS_CONNECTED.set_function(lambda: len(fleet.sessions))
    metrics.LEADING.set_function(lambda: 1 if leadership.leading else 0)
    metrics_at = ""
    if metrics_listen is not None:
        try:
            metrics_at = f" metrics={observe.serve_metrics(metrics_listen)}"
        except OSError as exc:
            await servers.stop(None)
            web.should_exit = True
            await web_task
            raise ConfigError(str(exc)) from None

    async def lead() -> None:
        """What only the leader does; cancelled when it stops leading."""
        abandoned = await catalog.abandon_running_backups()
        if abandoned:
            log.warning("%d backup(s) were being made when the last leader stopped; marked failed", abandoned)
        gateways.start()
        try:
            await asyncio.gather(projects.recover(), migrations.recover(), dump_files.keep_retention(),
                                 migrations.reversals.keep_windows(), backups.keep_schedules(),
                                 fleet.keep_announcing_controllers(), fleet.keep_recording_seen(),
                                 keep_housekeeping())
        finally:
            gateways.stop()

    async def keep_housekeeping() -> None:
        """Forgets what outlived its retention (store/housekeeping.py), now and every hour."""
        while True:
            try:
                deleted = await catalog.prune(Retention())
                if any(deleted.values()):
                    log.info("housekeeping deleted %s", ", ".join(f"{n} {t}" for t, n in deleted.items() if n))
            except Exception:  # the next round tries again
                log.exception("housekeeping failed")
            await asyncio.sleep(HOUSEKEEPING_EVERY_S)

    def step_down() -> None:
        for session in list(fleet.sessions.values()):
            session.close(f"controller {leadership.id} is no longer the leader")

    # Leads at once when the lease is free (or was its own); else it follows.
    await leadership.renew()
    leading = asyncio.create_task(leadership.keep(lead, step_down))
    log.info("controller ready: %s %s:%s, fleet gRPC port %s, enrollment port %s; %s",
             "https" if http_tls else "http", http.host, http_port, fleet_port, enroll_port, leadership.describe())
    print(f"flux-controller ready http={http.host}:{http_port} grpc={fleet_port} "
          f"enroll={enroll_port}{metrics_at}", flush=True)
    notify("READY=1\nSTATUS=serving")
    watch = asyncio.create_task(catalog.keep_watch())
    def reload_https() -> None:
        # New HTTPS connections get the new certificate; open ones keep theirs.
        web.config.ssl.load_cert_chain(state.file("server.pem"), state.file("server.key"))

    certificate = asyncio.create_task(keep_server_certificate(state, ca, reload_https if http_tls else None))
    trimming = asyncio.create_task(memory.keep_trimmed())
    collecting = asyncio.create_task(memory.keep_collected())
    lag = asyncio.create_task(observe.keep_measuring_loop_lag(metrics.LOOP_LAG_SECONDS))

    await stop.wait()
    leading.cancel()
    await leadership.stop()
    watch.cancel()
    certificate.cancel()
    trimming.cancel()
    collecting.cancel()
    lag.cancel()
    notify("STOPPING=1")
    log.info("stopping")
    for session in list(fleet.sessions.values()):
        session.close("controller is shutting down")
    web.should_exit = True
    await asyncio.gather(servers.stop(2), web_task)
    await leadership.release()
    await catalog.close()
