"""A connected agent's session: what the controller sends it waits there until the stream takes
it, in order, and ends with the close; an idle one is small, and its stream holds nothing of the
agent's last message, since a controller holds thousands."""

import asyncio
import gc
import tracemalloc

import grpc
import pytest

from agent.runtime import wire as agent_wire
from controller.fleet import Fleet, Session
from controller.rpc import wire
from controller.rpc.servicers import FleetService
from proto import fleet_pb2 as pb


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


def test_the_stream_holds_no_message_of_an_agent_between_two():
    """Each connected agent's stream waits for its next message most of the time: the last one (its
    protobuf message, the event decoded from it) is not kept meanwhile. Real gRPC on loopback."""
    streams = 50
    facts = agent_wire.Facts(hostname="db-host", agent_version="1.0", tools={"psql": "psql 15"},
                             spool_free_bytes=1 << 30, roles=["db"])

    def alive(kind) -> int:
        gc.collect()
        return sum(type(o) is kind for o in gc.get_objects())

    async def main():
        fleet = Fleet(catalog=None, box=None)
        service = FleetService(fleet, ca=None)

        async def connect(request_iterator, context):
            session = Session(dict(context.invocation_metadata())["agent"])
            reader = asyncio.create_task(service._read(session, context))
            await session.take()  # the session closes when the agent stops sending
            await reader

        rpc = grpc.stream_stream_rpc_method_handler(connect, request_deserializer=pb.AgentMessage.FromString,
                                                    response_serializer=bytes)
        handler = grpc.method_handlers_generic_handler("test.Fleet", {"Connect": rpc})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                method = channel.stream_stream("/test.Fleet/Connect",
                                               request_serializer=pb.AgentMessage.SerializeToString)
                calls = [method(metadata=(("agent", f"db-{i}"),)) for i in range(streams)]
                for call in calls:
                    await call.write(agent_wire.heartbeat(facts))
                async with asyncio.timeout(10):
                    while len(fleet._seen) < streams:  # every heartbeat handled: each stream waits again
                        await asyncio.sleep(0.01)
                held = alive(pb.AgentMessage), alive(wire.Heartbeat)
                for call in calls:
                    await call.done_writing()
                    await call.code()
        finally:
            await server.stop(None)
        return held

    messages, heartbeats = asyncio.run(main())
    assert (messages, heartbeats) == (0, 0), \
        f"{messages} messages, {heartbeats} heartbeats held by {streams} waiting streams"
