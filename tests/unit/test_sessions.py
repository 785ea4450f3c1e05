"""A connected agent's session: what the controller sends it waits there until the stream takes
it, in order, and ends with the close; an idle one is small, since a controller holds thousands."""

import asyncio
import tracemalloc

import pytest

from controller.fleet import Session


def test_what_is_sent_is_taken_in_order_and_the_close_comes_last():
    async def main():
        session = Session("db-1")
        taker = asyncio.create_task(session.take())
        await asyncio.sleep(0)
        assert not taker.done()  # nothing sent yet: the stream waits
        session.send("a")
        assert await taker == ["a"]
        session.send("b")
        session.send("c")
        session.close("stepping down")
        session.send("after the close")  # dropped: the stream is ending
        session.close("a second reason")
        assert await session.take() == ["b", "c", Session.CLOSED]
        assert session.close_reason == "stepping down"

    asyncio.run(main())


def test_a_waiting_stream_that_is_cancelled_leaves_the_session_usable():
    async def main():
        session = Session("db-1")
        taker = asyncio.create_task(session.take())
        await asyncio.sleep(0)
        taker.cancel()
        await asyncio.gather(taker, return_exceptions=True)
        session.send("x")
        assert await session.take() == ["x"]
        # One stream takes: a second taker is a bug, said at once, not a stream that never wakes.
        first = asyncio.create_task(session.take())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="a second taker"):
            await session.take()
        session.send("y")
        assert await first == ["y"]

    asyncio.run(main())


def test_an_idle_session_and_the_stream_waiting_on_it_hold_under_two_kilobytes():
    async def main():
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            sessions = [Session(f"db-{i}") for i in range(1000)]
            takers = [asyncio.create_task(s.take()) for s in sessions]
            await asyncio.sleep(0)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        held = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
        per_session = held / len(sessions)
        for taker in takers:
            taker.cancel()
        await asyncio.gather(*takers, return_exceptions=True)
        # The waiting task alone is about 1.1 KB; with an asyncio.Queue as the outbox it was 4.4 KB.
        assert per_session < 2048, f"{per_session:.0f} bytes a session"

    asyncio.run(main())
