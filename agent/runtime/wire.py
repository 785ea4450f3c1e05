"""The agent's RPC boundary: protobuf messages to and from plain dataclasses.

Nothing else in the agent touches `_pb2` types or raw `grpc.RpcError`.
"""

import json
from dataclasses import dataclass
from typing import Any

import grpc

from contract.failures import FailureKind
from proto import fleet_pb2 as pb
from proto import fleet_pb2_grpc

from ..errors import AgentError, Revoked
from .identity import CONTROLLER_TLS_NAME

# The largest message either side of the Fleet stream sends or accepts (controller/wire.py agrees).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Trailing metadata of a refused call: the FailureKind value saying why (controller/wire.py sets it).
FAILURE_METADATA_KEY = "flux-failure-kind"


@dataclass(frozen=True)
class Facts:
    hostname: str
    agent_version: str
    tools: dict[str, str]
    spool_free_bytes: int
    roles: list[str]


@dataclass(frozen=True)
class Welcome:
    heartbeat_seconds: int
    controllers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ControllerList:
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    kind: str
    # The params as sent (a JSON value; None when they were no JSON): jobs.run checks them.
    params: Any


@dataclass(frozen=True)
class Ping:
    nonce: str


@dataclass(frozen=True)
class Ack:
    job_id: str


@dataclass(frozen=True)
class LeaseGrant:
    nonce: str
    seconds: int


@dataclass(frozen=True)
class Enrolled:
    certificate_pem: bytes
    ca_pem: bytes
    fleet_port: int
    server_name: str


ControllerEvent = Welcome | JobRequest | Ping | Ack | LeaseGrant | ControllerList


def _facts(facts: Facts) -> pb.Facts:
    return pb.Facts(hostname=facts.hostname, agent_version=facts.agent_version,
                    tools=facts.tools, spool_free_bytes=facts.spool_free_bytes, roles=facts.roles)


def hello(facts: Facts) -> pb.AgentMessage:
    return pb.AgentMessage(hello=pb.Hello(facts=_facts(facts)))


def heartbeat(facts: Facts) -> pb.AgentMessage:
    return pb.AgentMessage(heartbeat=pb.Heartbeat(facts=_facts(facts)))


def pong(nonce: str) -> pb.AgentMessage:
    return pb.AgentMessage(pong=pb.Pong(nonce=nonce))


def status_report(stacks: dict[str, str], engine_error: str) -> pb.AgentMessage:
    return pb.AgentMessage(status_report=pb.StatusReport(stacks=stacks, engine_error=engine_error))


def lease_request(nonce: str) -> pb.AgentMessage:
    return pb.AgentMessage(lease_request=pb.LeaseRequest(nonce=nonce))


def progress(job_id: str, phase: str, done: int, total: int, unit: str, message: str):
    return pb.AgentMessage(job_event=pb.JobEvent(job_id=job_id, progress=pb.JobProgress(
        phase=phase, done=done, total=total, unit=unit, message=message)))


def result(job_id: str, ok: bool, output: dict | None, error: str, retryable: bool,
           failure: FailureKind | None = None):
    """A job's result; a failure without a kind goes as `internal`."""
    kind = 0 if ok else pb.FailureKind.Value((failure or FailureKind.INTERNAL).proto_name)
    return pb.AgentMessage(job_event=pb.JobEvent(job_id=job_id, result=pb.JobResult(
        ok=ok, output_json=json.dumps(output, ensure_ascii=False) if output is not None else "",
        error=error, retryable=retryable, failure=kind)))


def size(message) -> int:
    """Bytes `message` takes on the wire."""
    return message.ByteSize()


def decode(msg: pb.ControllerMessage) -> ControllerEvent | None:
    """None for a message this agent does not understand (a newer controller)."""
    kind = msg.WhichOneof("body")
    if kind == "welcome":
        return Welcome(msg.welcome.heartbeat_seconds or 10, tuple(msg.welcome.controllers))
    if kind == "job":
        try:
            params = json.loads(msg.job.params_json or "{}")
        except ValueError:
            params = None
        return JobRequest(msg.job.job_id, msg.job.kind, params)
    if kind == "ping":
        return Ping(msg.ping.nonce)
    if kind == "ack":
        return Ack(msg.ack.job_id)
    if kind == "lease":
        return LeaseGrant(msg.lease.nonce, msg.lease.seconds)
    if kind == "controllers":
        return ControllerList(tuple(msg.controllers.addresses))
    return None


def _failure(exc: grpc.RpcError) -> FailureKind | None:
    """The kind of failure the controller put in a refused call's trailing metadata, if any."""
    metadata = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == FAILURE_METADATA_KEY:
            return FailureKind.parse(value if isinstance(value, str) else value.decode(errors="replace"))
    return None


_KINDS_OF_STATUS = {grpc.StatusCode.UNAVAILABLE: FailureKind.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED: FailureKind.TIMEOUT}


def translate(exc: grpc.RpcError, where: str) -> AgentError:
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    kind = _failure(exc) or _KINDS_OF_STATUS.get(code, FailureKind.INTERNAL)
    if kind is FailureKind.REVOKED:
        return Revoked(f"{where}: {detail}")
    retryable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
                         grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    return AgentError(f"{where}: {detail or code}", retryable=retryable, kind=kind)


def enroll(address: str, ca_pem: bytes, token: str, name: str, roles: list[str],
           csr_pem: bytes, timeout: float = 15) -> Enrolled:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    options = [("grpc.ssl_target_name_override", CONTROLLER_TLS_NAME)]
    with grpc.secure_channel(address, credentials, options=options) as channel:
        stub = fleet_pb2_grpc.EnrollmentStub(channel)
        try:
            reply = stub.Enroll(pb.EnrollRequest(token=token, name=name, roles=roles, csr_pem=csr_pem),
                                timeout=timeout)
        except grpc.RpcError as exc:
            raise translate(exc, "enrollment refused") from None
    return Enrolled(bytes(reply.certificate_pem), bytes(reply.ca_pem), reply.fleet_port,
                    reply.server_name)


async def renew(channel, csr_pem: bytes) -> bytes:
    """A new certificate for this agent, over its current mutual-TLS channel."""
    try:
        reply = await fleet_pb2_grpc.FleetStub(channel).Renew(pb.RenewRequest(csr_pem=csr_pem), timeout=15)
    except grpc.RpcError as exc:
        raise translate(exc, "certificate renewal refused") from None
    return bytes(reply.certificate_pem)


def open_stream(channel, requests):
    """Starts the Connect stream; `requests` is an async iterator of AgentMessages."""
    return fleet_pb2_grpc.FleetStub(channel).Connect(requests)


def open_send(channel, chunks):
    """Starts sending a transfer's bytes; `chunks` is an async iterator of `chunk()`s."""
    return fleet_pb2_grpc.FleetStub(channel).Send(chunks)


def open_receive(channel, transfer_id: str):
    """Starts reading a transfer's bytes: each `read()` of the call gives a Chunk, or grpc.aio.EOF."""
    return fleet_pb2_grpc.FleetStub(channel).Receive(pb.ReceiveRequest(transfer_id=transfer_id))


def chunk(transfer_id: str, data: bytes = b"", last: bool = False) -> pb.Chunk:
    return pb.Chunk(transfer_id=transfer_id, data=data, last=last)


def mtls_channel(address: str, ca_pem: bytes, key_pem: bytes, cert_pem: bytes, server_name: str):
    credentials = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
    options = [
        ("grpc.ssl_target_name_override", server_name),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.aio.secure_channel(address, credentials, options=options)
