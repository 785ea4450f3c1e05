"""A job's side of the controller's transfers (controller/transfers.py): bytes sent up to it, or
read from it, over this agent's current connection.

Jobs do their work in threads; `Sender.write` and `Receiver.read` block that thread while the
event loop moves the chunks, so a slow reader at the other end slows the writer here (gRPC's
flow control), and neither end holds more than a few chunks. A transfer does not outlive the
connection it started on: a new connection means the job fails and is sent again.
"""

import asyncio
import concurrent.futures

import grpc

from contract.failures import FailureKind
from ..errors import AgentError
from . import wire

CHUNK_BYTES = 1 << 20
QUEUE_CHUNKS = 4
POLL_S = 0.5


def _failed(exc: BaseException, what: str) -> AgentError:
    if isinstance(exc, grpc.aio.AioRpcError):
        kind = FailureKind.NOT_FOUND if exc.code() == grpc.StatusCode.PERMISSION_DENIED else FailureKind.UNAVAILABLE
        return AgentError(f"{what}: {exc.details() or exc.code().name}", kind=kind)
    if isinstance(exc, asyncio.CancelledError):
        return AgentError(f"{what}: cancelled", kind=FailureKind.UNAVAILABLE)
    return AgentError(f"{what}: {type(exc).__name__}: {exc}", kind=FailureKind.UNAVAILABLE)


class Transfers:
    def __init__(self):
        self._channel = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, channel, loop: asyncio.AbstractEventLoop | None) -> None:
        """The connection transfers go over from now on (None while there is none)."""
        self._channel, self._loop = channel, loop

    def _current(self):
        if self._channel is None or self._loop is None:
            raise AgentError("not connected to the controller: the transfer cannot start",
                             retryable=True, kind=FailureKind.UNAVAILABLE)
        return self._channel, self._loop

    def sender(self, transfer_id: str) -> "Sender":
        """Called from a job's thread: the transfer's bytes go up through `write`, then `close`."""
        channel, loop = self._current()
        return Sender(channel, loop, transfer_id)

    def receiver(self, transfer_id: str) -> "Receiver":
        """Called from a job's thread: the transfer's bytes come in through `read`."""
        channel, loop = self._current()
        return Receiver(channel, loop, transfer_id)


class Sender:
    def __init__(self, channel, loop: asyncio.AbstractEventLoop, transfer_id: str):
        self.loop = loop
        self.transfer_id = transfer_id
        self.bytes = 0
        self._first = True

        async def start():
            queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)

            async def requests():
                while True:
                    item = await queue.get()
                    yield item
                    if item.last:
                        return

            call = wire.open_send(channel, requests())
            return queue, asyncio.ensure_future(call)

        self._queue, self._call = asyncio.run_coroutine_threadsafe(start(), loop).result(30)

    def _outcome(self):
        async def outcome():
            return await self._call
        try:
            return asyncio.run_coroutine_threadsafe(outcome(), self.loop).result()
        except BaseException as exc:  # noqa: BLE001 - said as an AgentError
            raise _failed(exc, f"the controller ended transfer {self.transfer_id[:12]}") from None

    def _put(self, chunk) -> None:
        future = asyncio.run_coroutine_threadsafe(self._queue.put(chunk), self.loop)
        while True:
            try:
                return future.result(timeout=POLL_S)
            except concurrent.futures.TimeoutError:
                if self._call.done():
                    future.cancel()
                    self._outcome()
                    raise AgentError(f"transfer {self.transfer_id[:12]} ended before all of its bytes were sent",
                                     kind=FailureKind.UNAVAILABLE)

    def write(self, data: bytes) -> None:
        for start in range(0, len(data), CHUNK_BYTES):
            piece = bytes(data[start:start + CHUNK_BYTES])
            self._put(wire.chunk(self.transfer_id if self._first else "", piece))
            self._first = False
            self.bytes += len(piece)

    def close(self) -> int:
        """Sends the last mark and waits for the controller to take it; returns the bytes sent."""
        self._put(wire.chunk(self.transfer_id if self._first else "", last=True))
        self._outcome()
        return self.bytes

    def abort(self) -> None:
        self.loop.call_soon_threadsafe(self._call.cancel)


class Receiver:
    def __init__(self, channel, loop: asyncio.AbstractEventLoop, transfer_id: str):
        self.loop = loop
        self.transfer_id = transfer_id
        self.bytes = 0
        self._buffer = bytearray()
        self._done = False

        async def start():
            return wire.open_receive(channel, transfer_id)

        self._call = asyncio.run_coroutine_threadsafe(start(), loop).result(30)

    def chunk(self) -> bytes:
        """The next chunk as it came; b"" once all of them came."""
        if self._done:
            return b""
        try:
            message = asyncio.run_coroutine_threadsafe(self._call.read(), self.loop).result()
        except BaseException as exc:  # noqa: BLE001 - said as an AgentError
            self._done = True
            raise _failed(exc, f"transfer {self.transfer_id[:12]} failed") from None
        if message is grpc.aio.EOF:
            self._done = True
            return b""
        self.bytes += len(message.data)
        return message.data or self.chunk()

    def read(self, size: int = -1) -> bytes:
        while (size < 0 or len(self._buffer) < size) and not self._done:
            data = self.chunk()
            if not data:
                break
            self._buffer += data
        if size < 0:
            size = len(self._buffer)
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    def abort(self) -> None:
        self._done = True
        self.loop.call_soon_threadsafe(self._call.cancel)
