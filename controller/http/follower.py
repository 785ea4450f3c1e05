"""The HTTP API on a controller that does not lead (see leader.py).

A follower answers the reads that come from the catalog alone (the project list and a project's
record, token checks) itself, and forwards every other request, streamed both ways, to the
leader's HTTP API: the leader holds the agents' streams and runs what changes the fleet. Every
answer says which controller gave it, in the `Flux-Controller` header.
"""

import asyncio
import re
import ssl

from starlette.background import BackgroundTask
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import StreamingResponse

from .common import PREFIX, error_response

# Served by a follower from the catalog; anything else goes to the leader.
FOLLOWER_READS = re.compile(rf"^{re.escape(PREFIX)}/(list|projects/[0-9a-f]{{7}}|auth/verify)$")
# Headers of one hop, not to be passed on.
HOP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authorization", "proxy-connection", "content-length"}


class FollowTheLeader(BaseHTTPMiddleware):
    def __init__(self, app, fleet, tls_ca: str | None = None):
        super().__init__(app)
        self.fleet = fleet
        # Controllers on one catalog share their state (and so whether they serve HTTPS, with a
        # certificate from the fleet CA): a follower forwards the way it serves.
        self.scheme = "https" if tls_ca else "http"
        self.tls_ca = tls_ca
        self._client = None

    @property
    def client(self):
        # Made (and httpx imported, with the 100 modules it brings) once a request is forwarded:
        # a controller that leads never forwards one.
        if self._client is None:
            import httpx

            # No read timeout: a forwarded migrate streams its progress for as long as it runs.
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=5.0, pool=5.0),
                verify=ssl.create_default_context(cafile=self.tls_ca) if self.tls_ca else True)
        return self._client

    async def dispatch(self, request: Request, call_next):
        leadership = self.fleet.leadership
        if leadership is None:
            return await call_next(request)
        if leadership.leading or (request.method in ("GET", "HEAD") and FOLLOWER_READS.match(request.url.path)):
            response = await call_next(request)
        else:
            response = await self.forward(request, leadership)
            response.headers["Flux-Forwarded-By"] = leadership.id
        response.headers.setdefault("Flux-Controller",
                                    f"{leadership.id}; {'leader' if leadership.leading else 'follower'}")
        return response

    async def forward(self, request: Request, leadership):
        import httpx

        target = leadership.lease.http_address
        if leadership.lease.holder == leadership.id:
            # Its own lease, which it could not renew (the catalog is away): nobody to forward to.
            return error_response(503, f"controller {leadership.id} cannot renew its lease as the leader "
                                       "(is the catalog unavailable?); try again shortly")
        if leadership.lease.holder is None or not target:
            return error_response(503, f"{leadership.describe()}: no controller leads right now; "
                                       "try again in a few seconds")
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP]
        outgoing = self.client.build_request(
            request.method, f"{self.scheme}://{target}{request.url.path}", params=request.url.query, headers=headers,
            content=request.stream() if request.method not in ("GET", "HEAD") else None)
        holder = leadership.lease.holder
        sending = asyncio.create_task(self.client.send(outgoing, stream=True))
        # A leader that hangs keeps its connections open: once it no longer leads, stop waiting.
        while not (await asyncio.wait({sending}, timeout=0.5))[0]:
            if leadership.lease.holder != holder:
                sending.cancel()
                return error_response(503, f"the leading controller {holder} at {target} does not answer and "
                                           "no longer leads; try again")
        try:
            upstream = sending.result()
        except httpx.HTTPError as exc:
            return error_response(503, f"the leading controller {holder} at {target} does not answer "
                                       f"({type(exc).__name__}); try again in a few seconds")
        passed = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=passed,
                                 background=BackgroundTask(upstream.aclose))
