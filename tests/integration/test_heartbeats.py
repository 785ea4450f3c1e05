"""Heartbeats are written to the catalog together: one statement records every agent heard from
since the last round, each with its latest facts (thousands of agents are not thousands of writes)."""

import asyncio
import datetime
import gc
import json
import secrets
import sys

import pytest

from controller.fleet import Fleet
from controller.rpc import wire
from controller.store import Catalog
from tests.integration.test_project_hashes import migrate

pytestmark = pytest.mark.integration


async def _enroll(catalog: Catalog, names: list[str]) -> None:
    user = await catalog.create_user("owner", secrets.token_hex(16))
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    for name in names:
        token = secrets.token_hex(16)
        await catalog.create_join_token(token, ["db"], expires, user.id)
        await catalog.enroll(token, name, ["db"], lambda: (secrets.randbits(64), expires))
        await catalog.agent_hello(name, {"hostname": f"{name}.old"}, None)


def test_one_write_records_every_heartbeat_and_keeps_facts_a_heartbeat_did_not_carry(catalog_url):
    migrate(catalog_url)

    async def scenario():
        catalog = Catalog(catalog_url, max_size=2)
        await catalog.open()
        try:
            await _enroll(catalog, ["hb-a", "hb-b", "hb-c"])
            before = {n: await catalog.get_agent(n) for n in ("hb-a", "hb-b", "hb-c")}
            await asyncio.sleep(0.05)
            await catalog.agents_seen({"hb-a": json.dumps({"hostname": "hb-a.new"}), "hb-b": None, "nobody": None})
            return before, {n: await catalog.get_agent(n) for n in ("hb-a", "hb-b", "hb-c")}
        finally:
            await catalog.close()

    before, after = asyncio.run(scenario())
    assert after["hb-a"].facts == {"hostname": "hb-a.new"}
    assert after["hb-a"].last_seen > before["hb-a"].last_seen
    assert after["hb-b"].facts == {"hostname": "hb-b.old"}
    assert after["hb-b"].last_seen > before["hb-b"].last_seen
    assert after["hb-c"].last_seen == before["hb-c"].last_seen  # not heard from


def test_the_fleet_writes_heartbeats_in_rounds_with_the_latest_facts(catalog_url, monkeypatch):
    from controller import fleet as fleet_mod
    from controller.fleet import Session
    from controller.secretbox import SecretBox, new_master_key

    migrate(catalog_url)
    monkeypatch.setattr(fleet_mod, "SEEN_EVERY_S", 0.2)
    writes = []

    async def scenario():
        catalog = Catalog(catalog_url, max_size=2)
        await catalog.open()
        recorded = catalog.agents_seen

        async def counting(seen):
            writes.append(dict(seen))
            await recorded(seen)

        catalog.agents_seen = counting
        fleet = Fleet(catalog, SecretBox(new_master_key()))
        rounds = None
        try:
            await _enroll(catalog, ["hb-x", "hb-y"])
            for host in ("first", "second"):
                facts = wire.Facts(hostname=host, agent_version="1", tools={}, spool_free_bytes=1, roles=["db"])
                for name in ("hb-x", "hb-y"):
                    await fleet.handle(Session(name), wire.Heartbeat(facts=facts))
            assert writes == []  # nothing written per heartbeat
            rounds = asyncio.create_task(fleet.keep_recording_seen())
            await asyncio.sleep(0.5)
            return {n: (await catalog.get_agent(n)).facts for n in ("hb-x", "hb-y")}
        finally:
            if rounds is not None:
                rounds.cancel()
            await catalog.close()

    facts = asyncio.run(scenario())
    assert facts["hb-x"]["hostname"] == "second" and facts["hb-y"]["hostname"] == "second"
    # Four heartbeats, one write holding both agents (and rounds with nothing heard write nothing).
    heard = [w for w in writes if w]
    assert len(heard) == 1 and set(heard[0]) == {"hb-x", "hb-y"}, writes
    # Held until the round as JSON text, which Python's cyclic GC does not track: thousands of
    # agents' facts held for a round are no work for it.
    assert all(isinstance(f, str) and not gc.is_tracked(f) for f in heard[0].values()), heard


def test_facts_the_catalog_cannot_hold_cost_only_their_agent_its_facts(catalog_url):
    """A NUL in a reported string is refused by jsonb: that agent is seen with its facts as they
    were, and the others in the same write keep their heartbeat and new facts."""
    migrate(catalog_url)

    async def scenario():
        catalog = Catalog(catalog_url, max_size=2)
        await catalog.open()
        try:
            await _enroll(catalog, ["hb-good", "hb-nul"])
            before = await catalog.get_agent("hb-nul")
            await asyncio.sleep(0.05)
            refused = await catalog.agents_seen({"hb-good": json.dumps({"hostname": "new"}),
                                                  "hb-nul": json.dumps({"hostname": "a\x00b"})})
            return refused, before, await catalog.get_agent("hb-good"), await catalog.get_agent("hb-nul")
        finally:
            await catalog.close()

    refused, before, good, nul = asyncio.run(scenario())
    assert refused == ["hb-nul"]
    assert good.facts == {"hostname": "new"}
    assert nul.facts == {"hostname": "hb-nul.old"} and nul.last_seen > before.last_seen


def test_an_agent_whose_facts_were_refused_costs_later_rounds_no_write_per_agent(catalog_url, monkeypatch):
    """After the catalog refused an agent's facts once, its heartbeats' facts are left out until it
    connects again: the next rounds are one write again, not one per agent heard from."""
    from controller import fleet as fleet_mod
    from controller.fleet import Session
    from controller.secretbox import SecretBox, new_master_key

    migrate(catalog_url)
    monkeypatch.setattr(fleet_mod, "SEEN_EVERY_S", 0.2)
    refused_rounds = []

    async def scenario():
        catalog = Catalog(catalog_url, max_size=2)
        await catalog.open()
        recorded = catalog.agents_seen

        async def watching(seen):
            refused = await recorded(seen)
            if seen:  # rounds with nothing heard write nothing
                refused_rounds.append(refused)
            return refused

        catalog.agents_seen = watching
        fleet = Fleet(catalog, SecretBox(new_master_key()))
        rounds = asyncio.create_task(fleet.keep_recording_seen())
        try:
            await _enroll(catalog, ["hb-ok", "hb-bad"])
            for round_ in range(3):
                for name, host in (("hb-ok", f"ok-{round_}"), ("hb-bad", f"bad\x00{round_}")):
                    facts = wire.Facts(hostname=host, agent_version="1", tools={}, spool_free_bytes=round_,
                                       roles=["db"])
                    await fleet.handle(Session(name), wire.Heartbeat(facts=facts))
                await asyncio.sleep(0.35)
            return {n: (await catalog.get_agent(n)).facts for n in ("hb-ok", "hb-bad")}
        finally:
            rounds.cancel()
            await catalog.close()

    facts = asyncio.run(scenario())
    # (A slow write may merge two heartbeat rounds into one: at least two are written.)
    assert len(refused_rounds) >= 2 and refused_rounds[0] == ["hb-bad"], refused_rounds
    assert all(r == [] for r in refused_rounds[1:]), refused_rounds  # one write each, as before it
    assert facts["hb-ok"]["hostname"] == "ok-2" and facts["hb-bad"] == {"hostname": "hb-bad.old"}


def test_an_agent_whose_hello_carries_a_nul_is_recorded_with_a_replacement_character(catalog_url):
    """jsonb refuses a NUL: read off the wire, it becomes U+FFFD, so the agent's hello is recorded
    (it failed the stream, and the agent reconnected in a loop), and so are its job's results."""
    from controller.fleet import Session
    from controller.secretbox import SecretBox, new_master_key
    from proto import fleet_pb2 as pb

    migrate(catalog_url)

    def received(message: pb.AgentMessage):
        return wire.decode_agent_message(pb.AgentMessage.FromString(message.SerializeToString()))

    async def scenario():
        catalog = Catalog(catalog_url, max_size=2)
        await catalog.open()
        try:
            await _enroll(catalog, ["hb-hello-nul"])
            fleet = Fleet(catalog, SecretBox(new_master_key()))
            facts = pb.Facts(hostname="host\x00name", agent_version="1\x00", tools={"pg\x00dump": "15\x00"},
                             roles=["db"])
            await fleet.handle(Session("hb-hello-nul"), received(pb.AgentMessage(hello=pb.Hello(facts=facts))))
            return (await catalog.get_agent("hb-hello-nul")).facts
        finally:
            await catalog.close()

    facts = asyncio.run(scenario())
    assert facts["hostname"] == "host\ufffdname" and facts["agent_version"] == "1\ufffd"
    assert facts["tools"] == {"pg\ufffddump": "15\ufffd"}
    result = received(pb.AgentMessage(job_event=pb.JobEvent(job_id="j", result=pb.JobResult(
        ok=False, error="bad\x00", output_json='{"a\\u0000": ["x\\u0000y", 1], "b": "\\\\u0000"}'))))
    assert result.error == "bad\ufffd" and result.output_problem == ""
    # An escaped backslash before "u0000" is text, not a NUL, and stays as it was.
    assert result.output == {"a\ufffd": ["x\ufffdy", 1], "b": "\\u0000"}
    # However deep it sits; and output nested past what can be read is refused, not raised.
    deep = received(pb.AgentMessage(job_event=pb.JobEvent(job_id="j", result=pb.JobResult(
        ok=True, output_json="[" * 600 + '"\\u0000"' + "]" * 600))))
    assert deep.output_problem == "" and str(deep.output).count("\ufffd") == 1
    deeper = received(pb.AgentMessage(job_event=pb.JobEvent(job_id="j", result=pb.JobResult(
        ok=True, output_json="[" * 100_000 + "]" * 100_000))))
    assert deeper.output is None and "nested too deep" in deeper.output_problem


def test_a_round_of_heartbeats_costs_the_controller_no_python_work_per_character_of_their_facts(catalog_url):
    """The round is written while the event loop waits on nothing else: its cost in Python calls
    must not grow with what the facts hold. Sent as text, psycopg escaped every quote of every
    agent's facts in Python (37,000 calls for 1,000 agents, tens of milliseconds with every agent's
    stream and the API stopped, every 2 s at 5,000 agents)."""
    migrate(catalog_url)
    agents = 1000
    facts = json.dumps({"hostname": "db-1.example", "agent_version": "1.0",
                        "tools": {"pg_dump": "pg_dump (PostgreSQL) 15.8", "psql": "psql (PostgreSQL) 15.8"},
                        "spool_free_bytes": 123456789, "roles": ["db"]})
    calls = []

    async def scenario():
        catalog = Catalog(catalog_url, max_size=2)
        await catalog.open()
        try:
            await _enroll(catalog, ["hb-round-0"])
            await catalog.agents_seen({"hb-round-0": facts})  # the connection and its statements made
            seen = {f"hb-round-{i}": facts for i in range(agents)}

            def count(frame, event, arg):
                if event == "call":
                    calls.append(frame.f_code.co_name)

            sys.setprofile(count)
            try:
                refused = await catalog.agents_seen(seen)
            finally:
                sys.setprofile(None)
            return refused, await catalog.get_agent("hb-round-0")
        finally:
            await catalog.close()

    refused, agent = asyncio.run(scenario())
    assert refused == [] and agent.facts == json.loads(facts)
    assert len(calls) < agents, f"{len(calls)} Python calls to write {agents} heartbeats"
