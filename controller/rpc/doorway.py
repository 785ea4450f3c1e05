"""The enrollment port's TCP front: limits connections per source address.

Anyone who can reach the enrollment port may connect before presenting a join token, and
gRPC has no per-source connection limit. This front accepts on the public address, refuses a
source that already holds its share of connections (and everyone once the total is reached),
and relays the bytes, still TLS, to the enrollment gRPC server listening on a private unix
socket. Handshake, idle and age timeouts and the message size limit are the gRPC server's.
"""

import asyncio
import collections
import logging
import time

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
REFUSAL_LOG_INTERVAL_S = 60


class Doorway:
    def __init__(self, upstream: str, max_per_source: int, max_total: int):
        self.upstream = upstream
        self.max_per_source = max_per_source
        self.max_total = max_total
        self.open: collections.Counter[str] = collections.Counter()
        self._refusals_logged: dict[str, float] = {}
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port; returns the port (useful with port 0)."""
        self._server = await asyncio.start_server(self._accepted, host, port, limit=CHUNK)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = peer[0] if peer else "unknown"
        if self.open[source] >= self.max_per_source or sum(self.open.values()) >= self.max_total:
            self._log_refusal(source)
            writer.transport.abort()
            return
        self.open[source] += 1
        task = asyncio.current_task()
        self._relays.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._relays.discard(task)
            self.open[source] -= 1
            if not self.open[source]:
                del self.open[source]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_writer = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(self.upstream, limit=CHUNK)
            pumps = [asyncio.create_task(_pump(reader, upstream_writer)),
                     asyncio.create_task(_pump(upstream_reader, writer))]
            try:
                # Either side closing ends the connection: gRPC needs no half-open TCP.
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            pass
        finally:
            for side in (writer, upstream_writer):
                if side is not None:
                    side.transport.abort()

    def _log_refusal(self, source: str) -> None:
        now = time.monotonic()
        if now - self._refusals_logged.get(source, -REFUSAL_LOG_INTERVAL_S) < REFUSAL_LOG_INTERVAL_S:
            return
        if len(self._refusals_logged) > 1000:
            self._refusals_logged.clear()
        self._refusals_logged[source] = now
        log.warning("enrollment port: refusing connections from %s beyond %d at once (%d open in all); "
                    "further refusals from it are not logged for %ds", source, self.max_per_source,
                    sum(self.open.values()), REFUSAL_LOG_INTERVAL_S)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(CHUNK):
        sink.write(data)
        await sink.drain()
