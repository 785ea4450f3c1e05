"""The controller's gRPC side: the mutual-TLS Fleet service, and enrollment on a private unix
socket behind the Doorway, which owns the public port."""

import asyncio
import os
import pathlib
import shutil
import stat
import tempfile

import grpc

from proto import fleet_pb2_grpc

from ..config import ConfigError, StateDir
from ..fleet import Fleet
from ..pki import SERVER_NAME, CertificateAuthority
from ..store import Catalog
from . import wire
from .doorway import Doorway
from .servicers import EnrollmentService, FleetService

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
    # TLS records of 4 KiB: each agent's connection holds a buffer of one record (16 KiB by default).
    ("grpc.tsi.max_frame_size", 4096),
    # No channelz records of the server and of each connection (about 1.1 KB a connection), which
    # nothing reads: the controller serves no channelz service.
    ("grpc.enable_channelz", 0),
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


class _ServerCertificate:
    """The controller's certificate as gRPC serves it: read again from the state directory on
    the first handshake after it changed there (app.renew_server_certificate writes a new one)."""

    def __init__(self, state: StateDir, require_client_cert: bool):
        self.state = state
        self.require_client_cert = require_client_cert
        self._seen = self._stamp()

    def _stamp(self) -> int:
        # The certificate is replaced after its key: once it changed, both are new.
        return self.state.file("server.pem").stat().st_mtime_ns

    def configuration(self):
        chain = self.state.read("server.pem") + self.state.read("ca.pem")
        return grpc.ssl_server_certificate_configuration(
            [(self.state.read("server.key"), chain)],
            root_certificates=self.state.read("ca.pem") if self.require_client_cert else None)

    def fetch(self):
        """Called by gRPC on each new connection: a new configuration when the files changed, else None."""
        try:
            stamp = self._stamp()
            if stamp == self._seen:
                return None
            configuration = self.configuration()
        except Exception:  # noqa: BLE001 - a half-written pair: the next handshake looks again
            return None
        self._seen = stamp
        return configuration

    def credentials(self):
        return grpc.dynamic_ssl_server_credentials(self.configuration(), self.fetch,
                                                   require_client_authentication=self.require_client_cert)


PRIVATE_PREFIX = "flux-enroll-"


def private_directory() -> str:
    """A directory of this process's own for the enrollment socket (a unix socket's path must be
    short, so not under the state directory). The name carries the pid: the directories of
    controllers that were killed and could not remove theirs are removed here."""
    root = pathlib.Path(tempfile.gettempdir())
    for leftover in root.glob(f"{PRIVATE_PREFIX}*-*"):
        pid = leftover.name.removeprefix(PRIVATE_PREFIX).split("-", 1)[0]
        try:
            found = leftover.lstat()  # a link is not followed, and not removed
        except OSError:
            continue  # gone meanwhile: another controller starting removed it
        if (pid.isdigit() and stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid()
                and not _alive(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-", dir=root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class RpcServers:
    """Both gRPC servers; `start` returns the Fleet and enrollment ports actually bound."""

    def __init__(self, state: StateDir, catalog: Catalog, fleet: Fleet, ca: CertificateAuthority):
        self.state, self.catalog, self.fleet, self.ca = state, catalog, fleet, ca
        self.private = private_directory()
        self.fleet_server = grpc.aio.server(options=FLEET_OPTIONS)
        self.enroll_server = grpc.aio.server(options=ENROLL_OPTIONS)
        self.doorway: Doorway | None = None

    async def start(self, fleet_address: str, enroll_host: str, enroll_port: int) -> tuple[int, int]:
        fleet_pb2_grpc.add_FleetServicer_to_server(FleetService(self.fleet, self.ca), self.fleet_server)
        fleet_port = self.fleet_server.add_secure_port(
            fleet_address, _ServerCertificate(self.state, require_client_cert=True).credentials())
        enroll_service = EnrollmentService(self.catalog, self.ca, fleet_port, SERVER_NAME)
        fleet_pb2_grpc.add_EnrollmentServicer_to_server(enroll_service, self.enroll_server)
        enroll_socket = f"{self.private}/enroll.sock"
        self.enroll_server.add_secure_port(f"unix:{enroll_socket}",
                                           _ServerCertificate(self.state, require_client_cert=False).credentials())
        self.doorway = Doorway(enroll_socket, ENROLL_MAX_PER_SOURCE, ENROLL_MAX_CONNECTIONS)
        await self.fleet_server.start()
        await self.enroll_server.start()
        try:
            bound = await self.doorway.start(enroll_host, enroll_port)
        except OSError as exc:
            await self.stop(None)
            raise ConfigError(f"cannot serve enrollment on {enroll_host}:{enroll_port}: {exc}") from None
        return fleet_port, bound

    async def stop(self, grace: float | None) -> None:
        closing = [self.fleet_server.stop(grace), self.enroll_server.stop(grace)]
        if self.doorway is not None:
            closing.append(self.doorway.close())
        await asyncio.gather(*closing)
        shutil.rmtree(self.private, ignore_errors=True)
