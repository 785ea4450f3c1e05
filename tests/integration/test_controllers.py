"""Two controllers on one catalog: a lease in the catalog says which one leads. Both serve the
HTTP API (the follower answers catalog reads itself and forwards the rest to the leader); agents
know every controller and fail over to the one that leads."""

import re
import signal
import time

import pytest

from tests.support import AgentProc, wait_until

pytestmark = pytest.mark.integration


def _role(response) -> str:
    return response.headers["Flux-Controller"].split("; ")[1]


def _lease(catalog_sql) -> tuple:
    return catalog_sql("SELECT holder, epoch, expires_at > now() FROM controller_lease")[0]


@pytest.fixture
def catalog_sql(catalog_url):
    import psycopg

    def query(text: str, params=()):
        with psycopg.connect(catalog_url) as conn:
            return conn.execute(text, params).fetchall()

    return query


def test_one_leads_the_other_follows_and_takes_over_when_it_dies(controller, tmp_path, catalog_sql):
    first = controller
    second = first.replica(tmp_path / "second").start()
    try:
        first_id = f"127.0.0.1:{first.ports['grpc']}"
        second_id = f"127.0.0.1:{second.ports['grpc']}"
        holder, epoch, current = _lease(catalog_sql)
        assert (holder, current) == (first_id, True)
        assert "follower; the leader is " + first_id in second.log.read_text()

        # The follower answers catalog reads itself, and forwards what changes the fleet.
        listed = second.api("GET", "list")
        assert listed.status_code == 200 and _role(listed) == "follower"
        assert "Flux-Forwarded-By" not in listed.headers
        token = second.api("POST", "agents/tokens", {"roles": ["db"], "ttl_seconds": 600})
        assert token.status_code == 201, token.text
        assert token.headers["Flux-Forwarded-By"] == second_id and _role(token) == "leader"
        assert second.api("GET", "agents").headers["Flux-Forwarded-By"] == second_id
        # A bad request is refused by the leader, through the follower, with the leader's words.
        refused = second.api("POST", "agents/tokens", {"roles": ["bogus"], "ttl_seconds": 600})
        assert refused.status_code == 400 and "unknown role" in refused.json()["error"]

        agent = AgentProc.enroll(second, tmp_path / "agents", "db-1", "db", token=token.json()).start()
        try:
            wait_until(lambda: first.connected("db-1"), 30, "the agent to connect to the leader")
            # The leader told it of both controllers.
            wait_until(lambda: sorted(agent.config().get("controllers", [])) == sorted([first_id, second_id]),
                       10, "the agent to know both controllers")
            refusals = second.log.read_text().count("agents connect to the leader")
            assert refusals == 0  # it enrolled through the follower, and connects to the leader

            first.stop(signal.SIGKILL)
            killed = time.monotonic()
            wait_until(lambda: _lease(catalog_sql)[0] == second_id and _lease(catalog_sql)[2], 15,
                       "the follower to take the lease")
            took = time.monotonic() - killed
            wait_until(lambda: second.connected("db-1"), 15, "the agent to fail over to the new leader")
            failed_over = time.monotonic() - killed
            assert _lease(catalog_sql)[1] == epoch + 1
            assert "leading the controllers on this catalog" in second.log.read_text()
            ping = second.api("POST", "agents/db-1/ping", timeout=15)
            assert ping.status_code == 200, ping.text
            assert _role(second.api("GET", "agents")) == "leader"

            # The old leader comes back as a follower and forwards to the new one.
            first.start()
            assert _role(first.api("GET", "list")) == "follower"
            assert first.api("GET", "agents").headers["Flux-Forwarded-By"] == first_id
            print(f"lease taken {took:.1f}s after the kill; agent connected to the new leader after "
                  f"{failed_over:.1f}s")
        finally:
            agent.stop()
    finally:
        second.stop()


def test_a_clean_stop_hands_the_lease_over_at_once(controller, tmp_path, catalog_sql):
    second = controller.replica(tmp_path / "second").start()
    try:
        assert _role(second.api("GET", "list")) == "follower"
        controller.stop()
        # Given up on the way out: the follower leads within its next renewal, not a lease later.
        wait_until(lambda: _role(second.api("GET", "list")) == "leader", 3, "the follower to lead")
        assert re.search(r"the leader is now 127\.0\.0\.1:\d+ \(lease epoch 2\)", second.log.read_text())
    finally:
        second.stop()


def test_with_no_leader_a_follower_says_so_instead_of_forwarding(controller, tmp_path, catalog_sql):
    second = controller.replica(tmp_path / "second").start()
    try:
        # The leader's process stops without giving up its lease (SIGSTOP): nobody can lead until
        # the lease runs out, and the follower cannot reach it.
        controller.proc.send_signal(signal.SIGSTOP)
        try:
            answer = second.api("POST", "agents/tokens", {"roles": ["db"], "ttl_seconds": 60}, timeout=60)
            assert answer.status_code == 503, answer.text
            assert re.search(r"(does not answer|no controller leads)", answer.json()["error"]), answer.json()
            wait_until(lambda: _role(second.api("GET", "list")) == "leader", 15, "the follower to lead")
        finally:
            controller.proc.send_signal(signal.SIGCONT)
        # The stopped one wakes up past its lease: it must not act as the leader any more.
        wait_until(lambda: "no longer the leader" in controller.log.read_text()
                   or _role(controller.api("GET", "list")) == "follower", 15, "the old leader to step down")
        assert _role(controller.api("GET", "list")) == "follower"
        assert _lease(catalog_sql)[0] == f"127.0.0.1:{second.ports['grpc']}"
    finally:
        second.stop()


def test_the_lease_is_renewed_while_requests_hold_every_pooled_connection(catalog_url):
    """Thousands of agents connecting at once fill the request pool's queue: the leader's lease has
    a connection of its own and stays renewed (else the leader steps down and drops them all)."""
    import asyncio

    from controller.leader import MARGIN_S, Leadership
    from controller.store import Catalog
    from tests.integration.test_project_hashes import migrate

    migrate(catalog_url)

    async def scenario() -> tuple[bool, list[bool], str]:
        catalog = Catalog(catalog_url, max_size=1)
        await catalog.open()
        leadership = Leadership(catalog, "busy:1", "busy:1", "busy:2", ttl_seconds=2 + MARGIN_S)
        keep = asyncio.create_task(leadership.keep(lambda: asyncio.sleep(3600), lambda: None))
        try:
            await asyncio.sleep(0.5)
            led_before = leadership.leading
            held = asyncio.Event()

            async def hold_the_pool():
                async with catalog._connection() as conn:
                    held.set()
                    await conn.execute("SELECT pg_sleep(12)")

            holder = asyncio.create_task(hold_the_pool())
            await held.wait()
            leading = []
            for _ in range(10):  # 5 s: longer than the lease, and than a request waits for the pool
                await asyncio.sleep(0.5)
                leading.append(leadership.leading)
            try:
                await catalog.get_agent("nobody")
                busy = "answered"
            except Exception as exc:  # the request pool is full: a 503 that says so
                busy = getattr(exc, "message", str(exc))
            await holder
            return led_before, leading, busy
        finally:
            keep.cancel()
            await catalog.close()

    led_before, leading, busy = asyncio.run(scenario())
    assert led_before
    assert all(leading), leading
    assert busy.startswith("catalog busy"), busy
