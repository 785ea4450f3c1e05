"""The controller's memory: what has lived a round of garbage collection is frozen out of the
collector's sight, a full round frees the garbage among it, and what few controllers use is
loaded only when used."""

import asyncio
import gc
import pathlib
import subprocess
import sys
import weakref

from controller import memory

ROOT = pathlib.Path(__file__).resolve().parents[2]


class _Node:
    other: "_Node | None" = None


def test_what_lived_a_round_is_frozen_and_its_garbage_freed_by_the_full_round():
    async def scenario():
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
        alive = weakref.ref(a)
        rounds = asyncio.create_task(memory.keep_collected(freeze_every=0.05, full_every=0.5))
        try:
            await asyncio.sleep(0.15)
            frozen = gc.get_freeze_count()
            del a, b
            gc.collect()
            kept_while_frozen = alive() is not None
            for _ in range(40):
                if alive() is None:
                    break
                await asyncio.sleep(0.05)
            return frozen, kept_while_frozen, alive() is None
        finally:
            rounds.cancel()
            await asyncio.gather(rounds, return_exceptions=True)

    frozen, kept_while_frozen, freed = asyncio.run(scenario())
    assert frozen > 0
    assert kept_while_frozen, "a collection freed garbage that was frozen"
    assert freed, "the full round did not free the frozen garbage"
    # Stopped, it leaves nothing frozen.
    assert gc.get_freeze_count() == 0


def test_the_oldest_generation_is_looked_at_a_tenth_as_often():
    before = gc.get_threshold()
    try:
        memory.tune_collector()
        youngest, middle, oldest = gc.get_threshold()
        assert (youngest, middle) == before[:2] and oldest == memory.OLDEST_EVERY > before[2]
    finally:
        gc.set_threshold(*before)


def test_importing_the_controller_leaves_out_what_only_a_follower_or_the_dashboard_uses():
    # httpx (a follower's forwarding, about a hundred modules with rich and pygments) and jinja2
    # (the dashboard's pages) are loaded when first used, not by every controller at start.
    probe = ("import sys, controller.main; "
             "print(' '.join(m for m in ('httpx', 'jinja2', 'rich', 'pygments') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == []


def test_the_fleet_server_keeps_no_channelz_records_of_its_connections():
    # channelz would keep a record of the server and of each agent's connection (about 1.1 KB
    # each at 5,000 agents: bench/grpc_floor.py), for a service the controller does not serve.
    import json

    import grpc
    from grpc._cython import cygrpc

    from controller.rpc.server import FLEET_OPTIONS, GRPC_OPTIONS

    def servers_recorded() -> int:
        return len(json.loads(cygrpc.channelz_get_servers(0)).get("server", []))

    async def added(options) -> int:
        before = servers_recorded()
        server = grpc.aio.server(options=options)
        server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return servers_recorded() - before
        finally:
            await server.stop(None)

    assert asyncio.run(added(GRPC_OPTIONS)) == 1  # gRPC's default: the check sees a record
    assert asyncio.run(added(FLEET_OPTIONS)) == 0
