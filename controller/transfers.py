"""Bytes between hosts: a transfer the controller opens carries one file (a backup, a dump) from
the agent that has it to the agent that wants it, or to the controller itself (a download).

Agents only dial the controller, so the controller relays: the sender streams chunks up
(`Fleet.Send`), the receiver streams them down (`Fleet.Receive`) or reads them here. Between
the two sits a queue of a few chunks; while it is full the controller stops reading the
sender's stream and gRPC's flow control holds the sender back, so a transfer holds at most
`QUEUE_CHUNKS` chunks in the controller's memory whatever its size. Nothing of it is written to
the catalog or to the controller's disk.

A transfer ends once: delivered (the receiver read the last chunk) or failed with a reason that
both ends are given. Whoever opened it fails it when either job ends badly, so neither end waits
on the other for longer than its own job's timeout.
"""

import asyncio
import secrets
from typing import AsyncIterator

from .errors import FluxError, NotFound, Unavailable

# Chunks waiting between the two ends; each is at most CHUNK_BYTES.
QUEUE_CHUNKS = 8
CHUNK_BYTES = 1 << 20
# The controller itself as a transfer's receiver (downloads and dump streams).
CONTROLLER = ""
# Both ends of a transfer start within this (their jobs were sent to connected agents).
CONNECT_S = 60.0

_END = object()


class TransferFailed(Unavailable):
    """A transfer that ended without all of its bytes."""


class Transfer:
    def __init__(self, transfer_id: str, sender: str, receiver: str):
        self.id = transfer_id
        self.sender = sender
        self.receiver = receiver
        self.bytes = 0
        self.error: str | None = None
        # The receiver has read the last chunk: nothing can fail the transfer any more.
        self.delivered = False
        self.sending = False
        self.receiving = receiver == CONTROLLER
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=QUEUE_CHUNKS)

    @property
    def ended(self) -> bool:
        return self.delivered or self.error is not None

    async def put(self, data: bytes) -> None:
        """Hands a chunk on; waits while the queue is full. Raises once the transfer failed."""
        if self.error is not None:
            raise TransferFailed(self.error)
        await self._queue.put(data)
        if self.error is not None:
            raise TransferFailed(self.error)
        self.bytes += len(data)

    async def finish(self) -> None:
        """Marks the end once every chunk is queued; raises if the transfer failed meanwhile."""
        if self.error is not None:
            raise TransferFailed(self.error)
        await self._queue.put(_END)
        if self.error is not None:
            raise TransferFailed(self.error)

    def fail(self, reason: str) -> None:
        """Ends the transfer without its bytes: both ends stop with `reason`."""
        if self.ended:
            return
        self.error = reason
        # A sender waiting on a full queue goes on, sees the error and stops.
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The bytes as the sender sends them; raises TransferFailed if it ends without all of them."""
        while True:
            item = await self._queue.get()
            if item is _END:
                if self.error is not None:
                    raise TransferFailed(self.error)
                self.delivered = True
                return
            yield item


class Transfers:
    def __init__(self):
        self._open: dict[str, Transfer] = {}

    def open(self, sender: str, receiver: str, connect_s: float = CONNECT_S) -> Transfer:
        """A new transfer; it fails unless both ends have started within `connect_s`."""
        transfer = Transfer(secrets.token_hex(16), sender, receiver)
        self._open[transfer.id] = transfer

        def check() -> None:
            if not transfer.ended and not (transfer.sending and transfer.receiving):
                missing = [f"{side} {name or 'controller'}" for side, name, started in (
                    ("sender", sender, transfer.sending), ("receiver", receiver, transfer.receiving)) if not started]
                transfer.fail(f"the {' and the '.join(missing)} did not start within {connect_s:g}s")

        asyncio.get_running_loop().call_later(connect_s, check)
        return transfer

    def close(self, transfer: Transfer, reason: str = "the transfer was abandoned") -> None:
        transfer.fail(reason)
        self._open.pop(transfer.id, None)

    def _get(self, transfer_id: str, agent: str, side: str) -> Transfer:
        transfer = self._open.get(transfer_id)
        if transfer is None or getattr(transfer, side) != agent:
            # The same answer whether it does not exist or is another agent's: ids are not probed.
            raise NotFound(f"no open transfer {transfer_id[:40]!r} for agent {agent}")
        return transfer

    async def accept(self, agent: str, chunks: AsyncIterator) -> int:
        """Reads a sender's stream of (transfer_id, data, last) into its transfer; returns its bytes."""
        transfer = None
        try:
            async for transfer_id, data, last in chunks:
                if transfer is None:
                    transfer = self._get(transfer_id, agent, "sender")
                    if transfer.sending:
                        raise FluxError(f"transfer {transfer.id} is being sent already")
                    transfer.sending = True
                elif transfer_id and transfer_id != transfer.id:
                    raise FluxError("a stream carries one transfer")
                for start in range(0, len(data), CHUNK_BYTES):
                    await transfer.put(data[start:start + CHUNK_BYTES])
                if last:
                    await transfer.finish()
                    return transfer.bytes
        except asyncio.CancelledError:
            if transfer is not None:
                transfer.fail(f"agent {agent} stopped sending")
            raise
        except TransferFailed:
            raise
        except FluxError as exc:
            if transfer is not None:
                transfer.fail(exc.message)
            raise
        if transfer is None:
            raise FluxError("the stream named no transfer")
        transfer.fail(f"agent {agent}'s stream ended before the transfer's last chunk")
        raise TransferFailed(transfer.error)

    def receiving(self, transfer_id: str, agent: str) -> Transfer:
        transfer = self._get(transfer_id, agent, "receiver")
        if transfer.receiving:
            raise FluxError(f"transfer {transfer.id} is being received already")
        transfer.receiving = True
        return transfer
