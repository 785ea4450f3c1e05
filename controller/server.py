"""`flux-controller run`: the HTTP API and the agents' gRPC services in one asyncio loop."""

import asyncio
import logging
import shutil
import signal
import tempfile
from dataclasses import dataclass

import grpc
import uvicorn

from proto import fleet_pb2_grpc

from . import wire
from .http import create_app
from .store import Catalog
from .config import ConfigError, StateDir
from .doorway import Doorway
from .fleet import EnrollmentService, Fleet, FleetService
from .gateways import LEASE_S, Gateways
from .pki import SERVER_NAME, CertificateAuthority
from .migrate import Migrations
from .projects import Projects
from .secretbox import SecretBox
from .systemd import notify

log = logging.getLogger(__name__)


GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_concurrent_streams", 100_000),
]
FLEET_OPTIONS = GRPC_OPTIONS + [
    ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
]

# The enrollment port answers before any token is checked, so everything it holds for a
# caller is bounded: the TLS and HTTP/2 handshake, an idle or long-lived connection, the size
# of a request (an EnrollRequest is a token, a name, roles and a CSR: a few KiB), the streams
# per connection, and (in the Doorway) the connections per source address.
ENROLL_HANDSHAKE_TIMEOUT_S = 5
ENROLL_MAX_MESSAGE_BYTES = wire.MAX_ENROLL_MESSAGE_BYTES
ENROLL_MAX_PER_SOURCE = 8
ENROLL_MAX_CONNECTIONS = 256
ENROLL_OPTIONS = [
    ("grpc.server_handshake_timeout_ms", ENROLL_HANDSHAKE_TIMEOUT_S * 1000),
    ("grpc.max_connection_idle_ms", 10_000),
    ("grpc.max_connection_age_ms", 30_000),
    ("grpc.max_connection_age_grace_ms", 5_000),
    ("grpc.max_receive_message_length", ENROLL_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", ENROLL_MAX_MESSAGE_BYTES),
    ("grpc.max_metadata_size", 8 * 1024),
    ("grpc.max_concurrent_streams", 2),
    ("grpc.keepalive_permit_without_calls", 0),
]


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


def _server_credentials(state: StateDir, require_client_cert: bool):
    chain = state.read("server.pem") + state.read("ca.pem")
    return grpc.ssl_server_credentials(
        [(state.read("server.key"), chain)],
        root_certificates=state.read("ca.pem") if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


async def serve(state: StateDir, http: Listen, fleet_listen: Listen, enroll_listen: Listen,
                heartbeat_seconds: int = 10, advertise_host: str | None = None,
                gateway_lease_seconds: int = LEASE_S) -> None:
    config = state.load_config()
    ca = CertificateAuthority(state.read("ca.pem"), state.read("ca.key"))
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
    projects = Projects(catalog, fleet, box, gateways)
    migrations = Migrations(catalog, fleet, projects, gateways)

    fleet_server = grpc.aio.server(options=FLEET_OPTIONS)
    fleet_pb2_grpc.add_FleetServicer_to_server(FleetService(fleet, ca), fleet_server)
    fleet_port = fleet_server.add_secure_port(
        fleet_listen.grpc_address(), _server_credentials(state, require_client_cert=True))

    # The enrollment gRPC server listens only on a unix socket in a private directory; the
    # Doorway owns the public port and relays each admitted connection to it.
    private = tempfile.mkdtemp(prefix="flux-enroll-")
    enroll_server = grpc.aio.server(options=ENROLL_OPTIONS)
    enroll_service = EnrollmentService(catalog, ca, fleet_port, SERVER_NAME)
    fleet_pb2_grpc.add_EnrollmentServicer_to_server(enroll_service, enroll_server)
    enroll_socket = f"{private}/enroll.sock"
    enroll_server.add_secure_port(f"unix:{enroll_socket}", _server_credentials(state, require_client_cert=False))
    doorway = Doorway(enroll_socket, ENROLL_MAX_PER_SOURCE, ENROLL_MAX_CONNECTIONS)

    async def stop_servers() -> None:
        await asyncio.gather(fleet_server.stop(None), doorway.close(), enroll_server.stop(None))
        shutil.rmtree(private, ignore_errors=True)

    await fleet_server.start()
    await enroll_server.start()
    try:
        enroll_port = await doorway.start(enroll_listen.host, enroll_listen.port)
    except OSError as exc:
        await stop_servers()
        raise ConfigError(f"cannot serve enrollment on {enroll_listen.host}:{enroll_listen.port}: {exc}") from None

    advertised = advertise_host or (enroll_listen.host if enroll_listen.host not in ("0.0.0.0", "::") else "127.0.0.1")
    app = create_app(catalog, fleet, projects, migrations, ca.fingerprint, f"{advertised}:{enroll_port}")
    web = uvicorn.Server(uvicorn.Config(
        app, host=http.host, port=http.port, log_level="warning", access_log=False,
        lifespan="off", server_header=False))
    web.install_signal_handlers = lambda: None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    web_task = asyncio.create_task(web.serve())
    while not web.started:
        if web_task.done():
            await stop_servers()
            raise ConfigError(f"cannot serve HTTP on {http.host}:{http.port}")
        await asyncio.sleep(0.05)
    http_port = web.servers[0].sockets[0].getsockname()[1]
    log.info("controller ready: http %s:%s, fleet gRPC port %s, enrollment port %s",
             http.host, http_port, fleet_port, enroll_port)
    print(f"flux-controller ready http={http.host}:{http_port} grpc={fleet_port} "
          f"enroll={enroll_port}", flush=True)
    notify("READY=1\nSTATUS=serving")
    recovery = asyncio.gather(projects.recover(), migrations.recover())
    gateways.start()

    await stop.wait()
    recovery.cancel()
    gateways.stop()
    notify("STOPPING=1")
    log.info("stopping")
    for session in list(fleet.sessions.values()):
        session.close("controller is shutting down")
    web.should_exit = True
    await asyncio.gather(fleet_server.stop(2), doorway.close(), enroll_server.stop(2), web_task)
    shutil.rmtree(private, ignore_errors=True)
    await catalog.close()
