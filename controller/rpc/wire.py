"""The controller's RPC boundary: protobuf messages to and from plain dataclasses.

Nothing else in the controller touches `_pb2` types.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any

from contract.failures import FailureKind
from proto import fleet_pb2 as pb

# The largest message either side of the Fleet stream sends or accepts (agent/wire.py agrees).
# Jobs and results over it fail at the sender; the route table goes out in chunks under it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Enrollment carries a token, a name and a CSR: nothing near this.
MAX_ENROLL_MESSAGE_BYTES = 64 * 1024
# Trailing metadata of a refused call: the FailureKind value saying why (agent/wire.py reads it).
FAILURE_METADATA_KEY = "flux-failure-kind"


@dataclass(frozen=True)
class Facts:
    hostname: str
    agent_version: str
    tools: dict[str, str]
    spool_free_bytes: int
    roles: list[str]

    def as_dict(self) -> dict:
        return {
            "hostname": self.hostname,
            "agent_version": self.agent_version,
            "tools": dict(self.tools),
            "spool_free_bytes": self.spool_free_bytes,
            "roles": list(self.roles),
        }


@dataclass(frozen=True)
class Hello:
    facts: Facts


@dataclass(frozen=True)
class Heartbeat:
    facts: Facts | None


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    phase: str
    done: int
    total: int
    unit: str
    message: str

    def as_dict(self) -> dict:
        return {"phase": self.phase, "done": self.done, "total": self.total,
                "unit": self.unit, "message": self.message}


@dataclass(frozen=True)
class JobResult:
    job_id: str
    ok: bool
    # The output as a JSON value (None when there is none); the fleet checks it against the contract.
    output: Any
    error: str
    retryable: bool
    # None when ok.
    failure: FailureKind | None = None
    # Why the output could not be read as JSON.
    output_problem: str = ""


@dataclass(frozen=True)
class Pong:
    nonce: str


@dataclass(frozen=True)
class LeaseRequest:
    nonce: str


@dataclass(frozen=True)
class EnrollRequest:
    token: str
    name: str
    roles: list[str] = field(default_factory=list)
    csr_pem: bytes = b""


@dataclass(frozen=True)
class StatusReport:
    """A docker agent's stacks: project id to state (Running, Stopped, Partial, Drift)."""
    stacks: dict[str, str]
    engine_error: str


AgentEvent = Hello | Heartbeat | JobProgress | JobResult | Pong | LeaseRequest | StatusReport


# PostgreSQL's text and jsonb cannot hold a NUL, and what an agent reports is stored there: a
# NUL it sends is read as U+FFFD, so that its hello or result is recorded rather than refused.
_NUL, _REPLACEMENT = "\x00", "\ufffd"


def _text(value: str) -> str:
    return value.replace(_NUL, _REPLACEMENT) if _NUL in value else value


# \u0000 in JSON text, unless its backslash is itself escaped (an even run of backslashes before it).
_ESCAPED_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def _facts(msg: pb.Facts) -> Facts:
    return Facts(
        hostname=_text(msg.hostname), agent_version=_text(msg.agent_version),
        tools={_text(k): _text(v) for k, v in msg.tools.items()},
        spool_free_bytes=msg.spool_free_bytes, roles=[_text(r) for r in msg.roles],
    )


def _output(text: str) -> tuple[Any, str]:
    """The output as a JSON value, and why it is none when it could not be read."""
    if not text:
        return None, ""
    # JSON holds a NUL only as \u0000 (a raw one is not JSON): replaced in the text, however deep it sits.
    if "\\u0000" in text:
        text = _ESCAPED_NUL.sub(r"\1\\ufffd", text)
    try:
        return json.loads(text), ""
    except ValueError as exc:
        return None, f"the output is not JSON ({exc})"
    except RecursionError:
        return None, "the output is not JSON that can be read (nested too deep)"


def _failure(value: int) -> FailureKind:
    try:
        return FailureKind.from_proto_name(pb.FailureKind.Name(value))
    except ValueError:  # a value a newer agent knows
        return FailureKind.INTERNAL


def decode_agent_message(msg: pb.AgentMessage) -> AgentEvent | None:
    """None for a message this controller does not understand (a newer agent)."""
    kind = msg.WhichOneof("body")
    if kind == "hello":
        return Hello(_facts(msg.hello.facts))
    if kind == "heartbeat":
        return Heartbeat(_facts(msg.heartbeat.facts) if msg.heartbeat.HasField("facts") else None)
    if kind == "pong":
        return Pong(msg.pong.nonce)
    if kind == "lease_request":
        return LeaseRequest(msg.lease_request.nonce)
    if kind == "status_report":
        return StatusReport({_text(k): _text(v) for k, v in msg.status_report.stacks.items()},
                            _text(msg.status_report.engine_error))
    if kind == "job_event":
        event = msg.job_event
        which = event.WhichOneof("event")
        if which == "progress":
            p = event.progress
            return JobProgress(event.job_id, _text(p.phase), p.done, p.total, _text(p.unit), _text(p.message))
        if which == "result":
            r = event.result
            output, problem = _output(r.output_json)
            return JobResult(event.job_id, r.ok, output, _text(r.error), r.retryable,
                             None if r.ok else _failure(r.failure), problem)
    return None


def decode_enroll_request(msg: pb.EnrollRequest) -> EnrollRequest:
    return EnrollRequest(msg.token, msg.name, list(msg.roles), bytes(msg.csr_pem))


def encode_enroll_response(cert_pem: bytes, ca_pem: bytes, fleet_port: int, server_name: str):
    return pb.EnrollResponse(
        certificate_pem=cert_pem, ca_pem=ca_pem, fleet_port=fleet_port, server_name=server_name
    )


def decode_renew_request(msg: pb.RenewRequest) -> bytes:
    return bytes(msg.csr_pem)


def encode_renew_response(cert_pem: bytes) -> pb.RenewResponse:
    return pb.RenewResponse(certificate_pem=cert_pem)


def controller_list(addresses: list[str]) -> pb.ControllerMessage:
    return pb.ControllerMessage(controllers=pb.ControllerList(addresses=addresses))


def welcome(heartbeat_seconds: int, controllers: list[str] = ()) -> pb.ControllerMessage:
    return pb.ControllerMessage(welcome=pb.Welcome(heartbeat_seconds=heartbeat_seconds, controllers=controllers))


def job_request(job_id: str, kind: str, params: dict) -> pb.ControllerMessage:
    # Not ASCII-escaped: a non-ASCII character would take six bytes instead of two or three.
    return pb.ControllerMessage(
        job=pb.JobRequest(job_id=job_id, kind=kind, params_json=json.dumps(params, ensure_ascii=False))
    )


def size(message) -> int:
    """Bytes `message` takes on the wire."""
    return message.ByteSize()


def ping(nonce: str) -> pb.ControllerMessage:
    return pb.ControllerMessage(ping=pb.Ping(nonce=nonce))


def lease_grant(nonce: str, seconds: int) -> pb.ControllerMessage:
    return pb.ControllerMessage(lease=pb.LeaseGrant(nonce=nonce, seconds=seconds))


def ack(job_id: str) -> pb.ControllerMessage:
    return pb.ControllerMessage(ack=pb.ResultAck(job_id=job_id))


def failure_metadata(kind: FailureKind) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that tells a refused agent the kind of its refusal."""
    return ((FAILURE_METADATA_KEY, kind.value),)


def send_result(sent: int) -> pb.SendResult:
    return pb.SendResult(bytes=sent)


def chunk(data: bytes) -> pb.Chunk:
    return pb.Chunk(data=data)
