"""The controller's relay between a sending and a receiving end: bounded, and ending once."""

import asyncio

import pytest

from controller.errors import FluxError, NotFound
from controller.transfers import CHUNK_BYTES, QUEUE_CHUNKS, TransferFailed, Transfers


async def _chunks(items):
    for item in items:
        yield item
        await asyncio.sleep(0)


def test_bytes_go_through_in_order_and_the_receiver_sees_the_end():
    async def main():
        transfers = Transfers()
        t = transfers.open("db-1", "backup-1")
        sent = [(t.id, b"a" * 10, False), ("", b"b" * (CHUNK_BYTES + 5), False), ("", b"c", True)]
        accepted = asyncio.create_task(transfers.accept("db-1", _chunks(sent)))
        received = b"".join([c async for c in transfers.receiving(t.id, "backup-1").chunks()])
        assert await accepted == len(received) == 10 + CHUNK_BYTES + 5 + 1
        assert received == b"a" * 10 + b"b" * (CHUNK_BYTES + 5) + b"c"

    asyncio.run(main())


def test_a_slow_receiver_holds_the_sender_back():
    async def main():
        transfers = Transfers()
        t = transfers.open("db-1", "backup-1")
        many = [(t.id if i == 0 else "", b"x" * 100, False) for i in range(QUEUE_CHUNKS * 4)] + [("", b"", True)]
        read = 0

        async def source():
            nonlocal read
            for i, item in enumerate(many):
                read = i
                yield item

        accepted = asyncio.create_task(transfers.accept("db-1", source()))
        await asyncio.sleep(0.05)
        # Nobody reads yet: the sender is held once the queue is full.
        assert not accepted.done() and read <= QUEUE_CHUNKS + 1
        got = [c async for c in transfers.receiving(t.id, "backup-1").chunks()]
        assert len(got) == QUEUE_CHUNKS * 4 and await accepted == QUEUE_CHUNKS * 400

    asyncio.run(main())


def test_only_the_named_agents_take_part_and_each_side_once():
    async def main():
        transfers = Transfers()
        t = transfers.open("db-1", "backup-1")
        with pytest.raises(NotFound):
            await transfers.accept("db-2", _chunks([(t.id, b"x", True)]))
        with pytest.raises(NotFound):
            transfers.receiving(t.id, "db-1")
        with pytest.raises(NotFound):
            transfers.receiving("0" * 32, "backup-1")
        transfers.receiving(t.id, "backup-1")
        with pytest.raises(FluxError, match="being received already"):
            transfers.receiving(t.id, "backup-1")

    asyncio.run(main())


def test_a_stream_cut_short_or_a_failed_end_fails_both_sides():
    async def main():
        transfers = Transfers()
        t = transfers.open("db-1", "backup-1")
        with pytest.raises(TransferFailed, match="ended before the transfer's last chunk"):
            await transfers.accept("db-1", _chunks([(t.id, b"x", False)]))
        with pytest.raises(TransferFailed, match="ended before"):
            [c async for c in transfers.receiving(t.id, "backup-1").chunks()]

        held = transfers.open("db-1", "backup-1")
        many = [(held.id if i == 0 else "", b"x", False) for i in range(QUEUE_CHUNKS * 3)]
        accepted = asyncio.create_task(transfers.accept("db-1", _chunks(many)))
        await asyncio.sleep(0.05)
        transfers.close(held, "backup.store on backup-1 failed: disk full")
        with pytest.raises(TransferFailed, match="disk full"):
            await accepted

    asyncio.run(main())


def test_an_end_that_never_starts_fails_the_transfer_in_time():
    async def main():
        transfers = Transfers()
        t = transfers.open("db-1", "backup-1", connect_s=0.05)
        many = [(t.id if i == 0 else "", b"x", False) for i in range(QUEUE_CHUNKS * 3)]
        accepted = asyncio.create_task(transfers.accept("db-1", _chunks(many)))
        with pytest.raises(TransferFailed, match="receiver backup-1 did not start within 0.05s"):
            await asyncio.wait_for(accepted, 5)
        late = transfers.open("db-1", "backup-1", connect_s=0.05)
        await asyncio.sleep(0.1)
        assert late.error == "the sender db-1 and the receiver backup-1 did not start within 0.05s"

    asyncio.run(main())


def test_a_failure_after_the_last_chunk_was_queued_still_reaches_both_ends():
    async def main():
        transfers = Transfers()
        t = transfers.open("db-1", "backup-1")
        items = [(t.id if i == 0 else "", b"x", False) for i in range(QUEUE_CHUNKS)] + [("", b"", True)]
        accepted = asyncio.create_task(transfers.accept("db-1", _chunks(items)))
        await asyncio.sleep(0.05)  # the queue is full: the end mark waits
        transfers.close(t, "backup.store on backup-1 failed: disk full")
        with pytest.raises(TransferFailed, match="disk full"):
            await asyncio.wait_for(accepted, 5)

    asyncio.run(main())
