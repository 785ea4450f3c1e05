"""The agents' gRPC services: enrollment (a join token and a CSR for a certificate) and the
Fleet stream each agent keeps open, handed to the `Fleet` once the peer is known."""

import asyncio
import logging

import grpc

from contract.failures import FailureKind
from proto import fleet_pb2_grpc

from ..errors import BadRequest, Conflict, FluxError, NotFound, Unauthorized, Unavailable
from ..fleet import Fleet, Session, check_agent_name, check_roles
from ..pki import CertificateAuthority, PKIError, cert_serial
from ..store import Catalog
from ..tokens import is_well_formed_join_token, token_hash
from . import wire

log = logging.getLogger(__name__)


_STATUS = {
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    NotFound: grpc.StatusCode.PERMISSION_DENIED,
    Conflict: grpc.StatusCode.PERMISSION_DENIED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _status(exc: FluxError) -> grpc.StatusCode:
    for kind, code in _STATUS.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class EnrollmentService(fleet_pb2_grpc.EnrollmentServicer):
    def __init__(self, catalog: Catalog, ca: CertificateAuthority, fleet_port: int, server_name: str):
        self.catalog = catalog
        self.ca = ca
        self.fleet_port = fleet_port
        self.server_name = server_name

    async def Enroll(self, request, context):
        req = wire.decode_enroll_request(request)
        try:
            name = check_agent_name(req.name)
            roles = check_roles(req.roles)
            if not is_well_formed_join_token(req.token):
                raise Unauthorized("join token is malformed")
            issued = None

            def register():
                nonlocal issued
                try:
                    issued = self.ca.sign_agent_csr(req.csr_pem, name)
                except PKIError as exc:
                    raise BadRequest(str(exc)) from None
                return issued.serial, issued.not_after

            await self.catalog.enroll(token_hash(req.token), name, roles, register)
        except FluxError as exc:
            # Nothing here is authenticated yet: the message shows the input bounded and escaped.
            log.warning("enrollment refused: %s", exc.message)
            await context.abort(_status(exc), exc.message)
        log.info("agent %s enrolled with roles %s", name, ",".join(roles))
        return wire.encode_enroll_response(
            issued.cert_pem, self.ca.cert_pem, self.fleet_port, self.server_name
        )


def _peer_identity(context) -> tuple[str, str] | None:
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    certs = auth.get("x509_pem_cert") or []
    if not names or not certs:
        return None
    return names[0].decode(), str(cert_serial(certs[0]))


class FleetService(fleet_pb2_grpc.FleetServicer):
    def __init__(self, fleet: Fleet, ca: CertificateAuthority):
        self.fleet = fleet
        self.ca = ca

    async def Renew(self, request, context):
        identity = _peer_identity(context)
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        name, serial = identity
        try:
            issued = self.ca.sign_agent_csr(wire.decode_renew_request(request), name)
        except PKIError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not await self.fleet.catalog.renew_agent(name, serial, str(issued.serial), issued.not_after):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate is not current for this agent")
        log.info("agent %s renewed its certificate until %s", name, issued.not_after.isoformat())
        return wire.encode_renew_response(issued.cert_pem)

    async def _agent(self, context) -> str:
        identity = _peer_identity(context)
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        name, serial = identity
        async with self.fleet.agent_catalog_slots:
            agent = await self.fleet.catalog.get_agent(name)
        if agent is None or agent.cert_serial != serial or agent.revoked_at is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate is not current for this agent")
        return name

    async def Send(self, request_iterator, context):
        name = await self._agent(context)

        async def chunks():
            async for chunk in request_iterator:
                yield chunk.transfer_id, chunk.data, chunk.last

        try:
            sent = await self.fleet.transfers.accept(name, chunks())
        except FluxError as exc:
            await context.abort(_status(exc), exc.message)
        return wire.send_result(sent)

    async def Receive(self, request, context):
        name = await self._agent(context)
        try:
            transfer = self.fleet.transfers.receiving(request.transfer_id, name)
        except FluxError as exc:
            await context.abort(_status(exc), exc.message)
        try:
            async for data in transfer.chunks():
                yield wire.chunk(data)
        except FluxError as exc:
            await context.abort(_status(exc), exc.message)
        except asyncio.CancelledError:
            transfer.fail(f"agent {name} stopped receiving")
            raise

    async def Connect(self, request_iterator, context):
        identity = _peer_identity(context)
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        name, serial = identity
        agent = await self.fleet.catalog.get_agent(name)
        if agent is None or agent.cert_serial != serial:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate is not current for this agent")
        if agent.revoked_at is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"agent {name} is revoked",
                                wire.failure_metadata(FailureKind.REVOKED))

        if not self.fleet.leading():
            # The agent tries the next controller it knows of.
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{self.fleet.leadership.describe()}: agents connect to the leader")
        # This frame lasts as long as the agent stays connected: the catalog's row goes now (0.5 KB).
        del identity, agent
        session = Session(name)
        self.fleet.attach(session)
        log.info("agent %s connected from %s", name, context.peer())
        reader = asyncio.create_task(self._read(session, context))
        try:
            yield wire.welcome(self.fleet.heartbeat_seconds, await self.fleet.controllers())
            ended = False
            while not ended:
                for message in await session.take():
                    if message is Session.CLOSED:  # always the last one sent
                        ended = True
                        break
                    yield message
        finally:
            reader.cancel()
            self.fleet.detach(session)
            log.info("agent %s disconnected: %s", name, session.close_reason or "stream ended")
        if session.close_reason:
            if session.revoked:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, session.close_reason,
                                    wire.failure_metadata(FailureKind.REVOKED))
            await context.abort(grpc.StatusCode.ABORTED, session.close_reason)

    async def _read(self, session: Session, context) -> None:
        # Through context.read(), not the request iterator: gRPC's iterator keeps the last message
        # while it waits for the next, and so would this loop's names. Nothing is held between two
        # messages of an idle agent (2.3 KB each: the protobuf message, the event decoded from it).
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                event = wire.decode_agent_message(message)
                del message
                if event is not None:
                    await self.fleet.handle(session, event)
                del event
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            raise
        except Exception:
            log.exception("agent %s: error handling a message", session.name)
        finally:
            if not session.closed:
                session.close(None)
