"""The route table in parts: 100,000 projects never make one message, and parts rebuild the table."""

import asyncio
import json
import time
import uuid

import pytest

from agent.errors import AgentError
from contract.failures import FailureKind
from agent.adapters.caddy import Gateway
from agent.runtime.settings import GatewaySettings
from controller.rpc import wire
from controller.gateways import CHUNK_BYTES, Acked, alters_served_routes, route_chunks, route_digest


def _routes(n: int) -> list[dict]:
    return [{"project_id": str(uuid.UUID(int=i)), "hosts": [f"api--p{i}--{i:07x}.example.com",
                                                          f"api.p{i}.{i:07x}.example.com"],
             "mode": "v2_shared", "schema": f"t_{i:012x}_api", "app_role": f"t_{i:012x}_role",
             "jwt_secret": "s" * 64, "upstream": "pool", "maintenance": False} for i in range(n)]


def test_a_table_of_100000_routes_goes_out_in_parts_under_the_message_limit():
    routes = _routes(100_000)
    chunks = route_chunks(routes, [])
    assert len(chunks) > 1
    for part, chunk in enumerate(chunks):
        params = {"version": 7, "base_version": None, "part": part, "parts": len(chunks), **chunk}
        size = wire.size(wire.job_request(str(uuid.uuid4()), "gateway.sync", params))
        assert size <= CHUNK_BYTES + 4096 < wire.MAX_MESSAGE_BYTES
    assert [r for c in chunks for r in c["upsert"]] == routes


def test_an_empty_change_is_still_one_part():
    assert route_chunks([], []) == [{"upsert": [], "remove": []}]


class _Gateway(Gateway):
    """The real gateway with Caddy left out: these tests are about the table."""

    async def _caddy_has_our_config(self) -> bool:
        return True

    async def load_caddy_config(self) -> None:
        self.caddy_loads = getattr(self, "caddy_loads", 0) + 1


@pytest.fixture
def gateway(tmp_path):
    return _Gateway(tmp_path, GatewaySettings(listen="127.0.0.1:1", auth_listen="127.0.0.1:2",
                                               pool_upstream="127.0.0.1:3", pool_jwt_secret="p" * 40))


def _apply(gateway, version, base, chunks, parts=None):
    results = []
    for part, chunk in enumerate(chunks):
        results.append(asyncio.run(gateway.sync(version, base, part, parts or len(chunks), chunk["upsert"],
                                                chunk["remove"])))
    return results


def test_parts_rebuild_the_whole_table_and_apply_only_at_the_last(gateway, tmp_path):
    routes = _routes(100_000)
    chunks = route_chunks(routes, [])
    results = _apply(gateway, 3, None, chunks[:-1], parts=len(chunks))
    assert gateway.table.version == 0 and gateway.table.routes == []
    assert results[-1]["received_parts"] == len(chunks) - 1
    last = asyncio.run(gateway.sync(3, None, len(chunks) - 1, len(chunks), chunks[-1]["upsert"], []))
    assert last["applied_version"] == 3 and last["routes"] == 100_000
    assert gateway.table.by_host["api--p99999--001869f.example.com"].schema == f"t_{99999:012x}_api"
    saved = json.loads((tmp_path / "gateway-state.json").read_text())
    assert saved["version"] == 3 and len(saved["routes"]) == 100_000
    # Every pooled project shares one Caddy route: the configuration does not grow per project.
    caddy_routes = gateway.caddy_config()["apps"]["http"]["servers"]["flux"]["routes"]
    assert len(caddy_routes) == 2 and len(caddy_routes[0]["match"][0]["host"]) == 200_000


def test_a_delta_applies_on_its_base_and_is_refused_on_another(gateway):
    routes = _routes(3)
    _apply(gateway, 1, None, route_chunks(routes, []))
    changed = {**routes[0], "maintenance": True}
    _apply(gateway, 2, 1, route_chunks([changed], [routes[2]["project_id"]]))
    assert gateway.table.version == 2
    assert [r.project_id for r in gateway.table.routes if r.maintenance] == [routes[0]["project_id"]]
    assert routes[2]["project_id"] not in {r.project_id for r in gateway.table.routes}
    with pytest.raises(AgentError) as refused:
        asyncio.run(gateway.sync(3, 1, 0, 1, [], []))
    assert refused.value.kind is FailureKind.CONFLICT
    # An older version arriving late changes nothing.
    assert asyncio.run(gateway.sync(1, None, 0, 1, [], []))["stale"] is True
    assert gateway.table.version == 2 and len(gateway.table.routes) == 2


def test_parts_out_of_order_are_refused(gateway):
    chunks = route_chunks(_routes(10), [], limit=600)
    assert len(chunks) > 2
    asyncio.run(gateway.sync(5, None, 0, len(chunks), chunks[0]["upsert"], []))
    with pytest.raises(AgentError) as refused:
        asyncio.run(gateway.sync(5, None, 2, len(chunks), chunks[2]["upsert"], []))
    assert refused.value.kind is FailureKind.CONFLICT and gateway.table.version == 0


def test_without_a_lease_the_gateway_serves_nothing(gateway):
    _apply(gateway, 1, None, route_chunks(_routes(1), []))
    host = "api--p0--0000000.example.com"
    assert gateway.verify(host, "GET", "")[0] == 503
    asked = time.monotonic()
    gateway.lease(asked, 30)
    assert gateway.verify(host, "GET", "")[0] == 401
    assert gateway.renew_interval() == 10
    # A refusal leaves the lease to run out, and the gateway asks again every second until granted.
    gateway.lease(time.monotonic(), 0)
    assert gateway.serving() and gateway.renew_interval() == 1
    gateway.lease(time.monotonic(), 30)
    assert gateway.renew_interval() == 10
    # A lease runs from when it was asked for, not from when the answer came.
    gateway.lease_until = 0
    gateway.lease(time.monotonic() - 31, 30)
    status, headers, body = gateway.verify(host, "GET", "")
    assert status == 503 and headers["Retry-After"] and "lease" in body["error"]


@pytest.mark.parametrize("change, waits", [
    ("add a project", False),
    ("nothing", False),
    ("maintenance on", True),
    ("new secret", True),
    ("project removed", True),
])
def test_a_change_waits_for_a_silent_gateway_only_when_it_alters_a_route_that_gateway_serves(change, waits):
    served = {"p1": {"hosts": ["a.example"], "maintenance": False, "jwt_secret": "s1"},
              "p2": {"hosts": ["b.example"], "maintenance": False, "jwt_secret": "s2"}}
    acked = Acked(7, {pid: route_digest(r) for pid, r in served.items()})
    new = {pid: dict(r) for pid, r in served.items()}
    if change == "add a project":
        new["p3"] = {"hosts": ["c.example"], "maintenance": False, "jwt_secret": "s3"}
    elif change == "maintenance on":
        new["p1"]["maintenance"] = True
    elif change == "new secret":
        new["p2"]["jwt_secret"] = "rotated"
    elif change == "project removed":
        del new["p2"]
    assert alters_served_routes(acked, new) is waits
    # A gateway whose table is unknown is always waited for.
    assert alters_served_routes(None, new) is True
