"""The gateway's forward_auth endpoint: one small HTTP/1.1 server, on loopback, that Caddy asks
about every request before passing it on.

It sits on every request's path, so it is an asyncio protocol over httptools' parser, with no
framework between: a request is parsed, `verify(host, method, authorization)` decides, and the
answer (status, headers, JSON body) is written back on the same keep-alive connection. Caddy
sends no body with these requests; one that comes anyway is read and ignored.
"""

import asyncio
import json
import logging
import urllib.parse
from http import HTTPStatus

import httptools

log = logging.getLogger(__name__)

# A request's header block may hold at most this much (Caddy's own default limit is 1 MiB).
MAX_HEADER_BYTES = 1 << 20
# Caddy's on-demand TLS asks here whether a host may have a certificate.
ASK_PATH = "/ask"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class _Connection(asyncio.Protocol):
    def __init__(self, verify, ask):
        self.verify = verify
        self.ask = ask
        self.url = b""
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: dict[str, str] = {}
        self.header_bytes = 0

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._reply(400, {}, {"error": "bad request to forward_auth"}, keep_alive=False)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.headers = {}
        self.header_bytes = 0
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.header_bytes += len(url)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _TooLarge()
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _TooLarge()
        # The last of a repeated header wins, as it did under the ASGI server before.
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_message_complete(self) -> None:
        method = self.headers.get("x-forwarded-method") or self.parser.get_method().decode("latin-1")
        try:
            path, _, query = self.url.decode("latin-1").partition("?")
            if path == ASK_PATH and self.ask is not None:
                # Caddy asks before it gets a certificate on demand: only for a host a project has.
                domain = (urllib.parse.parse_qs(query).get("domain") or [""])[0]
                allowed = self.ask(domain)
                status, extra, body = (200 if allowed else 404), {}, {"domain": domain[:253], "allowed": allowed}
            else:  # Caddy's forward_auth asks /verify
                status, extra, body = self.verify(self.headers.get("host", ""), method,
                                                  self.headers.get("authorization", ""))
        except Exception:  # one bad request must not end the server: Caddy gets a 500 for it
            log.exception("gateway: forward_auth failed on a request")
            status, extra, body = 500, {}, {"error": "gateway error; see the gateway agent's log"}
        self._reply(status, extra, body, keep_alive=self.parser.should_keep_alive())

    def _reply(self, status: int, extra: dict, body, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        payload = json.dumps(body).encode() if body is not None else b""
        head = [f"HTTP/1.1 {status} {_reason(status)}", "Content-Type: application/json",
                f"Content-Length: {len(payload)}"]
        for key, value in extra.items():
            if "\r" in value or "\n" in value:  # never split a header, whatever a value holds
                log.error("gateway: forward_auth header %s held a line break; left out", key)
                continue
            head.append(f"{key}: {value}")
        if not keep_alive:
            head.append("Connection: close")
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        if not keep_alive:
            self.transport.close()


class _TooLarge(Exception):
    pass


async def serve(verify, host: str, port: int, ask=None) -> asyncio.AbstractServer:
    """Listens on host:port and answers each request with `verify`, and `GET /ask?domain=` with
    `ask(domain)` (whether a certificate may be got for it); the caller closes the server."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Connection(verify, ask), host, port, reuse_address=True)
