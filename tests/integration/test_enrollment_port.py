"""The enrollment port faces anyone who can reach it: real TLS and gRPC against a real controller.

Idle connections are closed, connections per source address are limited, large messages are
refused before they are read into memory, and nothing unauthenticated is copied into the log.
"""

import socket
import ssl

import grpc
import pytest

from agent.runtime.identity import CONTROLLER_TLS_NAME
from controller.rpc.server import ENROLL_HANDSHAKE_TIMEOUT_S, ENROLL_MAX_PER_SOURCE
from proto import fleet_pb2 as pb
from proto import fleet_pb2_grpc
from tests.support import AgentProc

pytestmark = pytest.mark.integration

# Far beyond the handshake timeout, far below gRPC's default of 120 s.
CLOSED_WITHIN_S = ENROLL_HANDSHAKE_TIMEOUT_S * 3


def connect(controller, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", controller.ports["enroll"]), timeout=10,
                                    source_address=(source, 0))


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True once the controller closes the connection; False if it is still open after `within`."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except socket.timeout:
        return False


def still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def tls(sock: socket.socket) -> ssl.SSLSocket:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    return context.wrap_socket(sock, server_hostname=CONTROLLER_TLS_NAME)


def enroll_stub(controller):
    credentials = grpc.ssl_channel_credentials((controller.state_dir / "ca.pem").read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{controller.ports['enroll']}", credentials,
                                  options=[("grpc.ssl_target_name_override", CONTROLLER_TLS_NAME)])
    return channel, fleet_pb2_grpc.EnrollmentStub(channel)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_silent_connection_is_closed_before_the_tls_handshake(controller):
    with connect(controller) as sock:
        assert closed_by_peer(sock, CLOSED_WITHIN_S)


def test_a_connection_silent_after_the_tls_handshake_is_closed(controller):
    with tls(connect(controller)) as sock:
        assert sock.selected_alpn_protocol() == "h2"
        assert closed_by_peer(sock, CLOSED_WITHIN_S)


def test_connections_per_source_address_are_limited(controller, tmp_path):
    held = [connect(controller) for _ in range(ENROLL_MAX_PER_SOURCE)]
    try:
        with connect(controller) as one_too_many:
            assert closed_by_peer(one_too_many, CLOSED_WITHIN_S)
        # Refused for being one too many, not for idling: the others are all still open.
        assert all(still_open(sock) for sock in held)
        # Another source address is served meanwhile.
        with tls(connect(controller, source="127.0.0.2")) as other:
            assert other.getpeercert(binary_form=True)
    finally:
        for sock in held:
            sock.close()
    # The slots are free again once those connections are gone: a real agent enrolls.
    agent = AgentProc.enroll(controller, tmp_path / "agents", "after-limit", "db")
    assert (agent.state_dir / "cert.pem").exists()


def test_a_large_enroll_message_is_refused_unread(controller):
    name = "n" * (3 * 1024 * 1024)
    log_before = controller.log.stat().st_size
    channel, stub = enroll_stub(controller)
    with channel:
        # Warm up the channel and the server's allocations before measuring.
        with pytest.raises(grpc.RpcError):
            stub.Enroll(pb.EnrollRequest(token="x", name="warm-up", roles=["db"]), timeout=10)
        rss_before = rss_bytes(controller.proc.pid)
        for _ in range(40):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Enroll(pb.EnrollRequest(token="x", name=name, roles=["db"]), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        grown = rss_bytes(controller.proc.pid) - rss_before
    # 120 MiB were sent; none of it stays.
    assert grown < 24 * 1024 * 1024, f"controller grew by {grown} bytes"
    assert controller.log.stat().st_size - log_before < 16 * 1024
    assert controller.proc.poll() is None


def test_an_unauthenticated_name_is_not_copied_into_the_log(controller):
    forged = "\n2030-01-01 00:00:00,000 INFO controller.fleet: agent forged enrolled with roles gateway\n"
    name = "x" * 20_000 + forged + "y" * 20_000
    log_before = controller.log.stat().st_size
    channel, stub = enroll_stub(controller)
    with channel:
        with pytest.raises(grpc.RpcError) as refused:
            stub.Enroll(pb.EnrollRequest(token="x", name=name, roles=["db"]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(refused.value.details()) < 512
    written = controller.log.read_bytes()[log_before:].decode(errors="replace")
    assert "enrollment refused" in written
    assert len(written) < 1024
    assert "x" * 100 not in written and "y" * 100 not in written
    assert "agent forged enrolled" not in written
