"""More than one gateway: a dead one does not block route changes and, cut off, stops serving."""

import json
import os
import ssl
import sys

import httpx
import pytest

from tests.support import AgentProc, CuttableProxy, LocalFleet, app_token, free_port, run, script, wait_until

pytestmark = pytest.mark.integration

TODOS = """
create table public.todos (id bigserial primary key, owner text default auth.uid(), title text not null);
alter table public.todos enable row level security;
create policy own on public.todos for all to authenticated using (owner = auth.uid()) with check (owner = auth.uid());
grant select, insert, update, delete on public.todos to authenticated;
grant usage on sequence public.todos_id_seq to authenticated;
"""


# Gateways' leases last 15 s here instead of 60: a gateway cut off from the controller stops
# serving, and a change waits for it, a lease later.
LEASE_S = 15


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("gateways") / "dev",
                       controller_args=("--gateway-lease-seconds", str(LEASE_S)))
    yield fleet
    fleet.close()


class ExtraGateway(AgentProc):
    """A second gateway agent with its own Caddy, next to the fleet's."""

    def __init__(self, fleet: LocalFleet, name: str, controller: str | None = None, **extra_settings):
        token = fleet.api("POST", "agents/tokens", {"roles": ["gateway"], "ttl_seconds": 600}).json()
        state = fleet.fleet.dir / "extra" / name
        run(sys.executable, "-m", "agent.runtime.main", "enroll", "--controller", token["enroll_address"],
            "--token", token["token"], "--name", name, "--roles", "gateway", "--state-dir", str(state),
            "--ca-fingerprint", token["ca_fingerprint"])
        super().__init__(state, name)
        if controller:
            self.point_at(controller)
        self.port = free_port()
        dev = json.loads((fleet.fleet.dir / "agents" / "dev-gateway" / "settings.json").read_text())["gateway"]
        self.auth_listen = f"127.0.0.1:{free_port()}"
        settings = {"gateway": {**dev, "caddy_admin": str(state / "caddy-admin.sock"),
                                "listen": f"127.0.0.1:{self.port}", "auth_listen": self.auth_listen,
                                **extra_settings}}
        fd = os.open(state / "settings.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(settings, handle)
        self.fleet = fleet

    def stop(self) -> None:
        super().stop()
        pid_file = self.state_dir / "caddy.pid"
        if pid_file.exists():
            from devtools.fleet import pid_alive, terminate

            pid = int(pid_file.read_text())
            if pid_alive(pid):
                terminate(pid)

    def view(self) -> dict:
        return next(a for a in self.fleet.api("GET", "agents").json() if a["name"] == self.name)["gateway"]

    def request(self, method: str, host: str, path: str, token: str | None = None, **kwargs):
        context = ssl.create_default_context(
            cafile=str(self.state_dir / "caddy-data" / "caddy" / "pki" / "authorities" / "local" / "root.crt"))
        headers = {"Host": host, **({"Authorization": f"Bearer {token}"} if token else {})}
        with httpx.Client(verify=context, timeout=30) as http:
            return http.request(method, f"https://127.0.0.1:{self.port}{path}", headers=headers,
                                extensions={"sni_hostname": host}, **kwargs)


def _controller_log(fleet) -> str:
    return (fleet.fleet.dir / "logs" / "controller.log").read_text(errors="replace")


def _tenant(fleet, name):
    project = fleet.create(name)
    assert fleet.push(project, {"001_todos.sql": TODOS}).status_code == 200
    return project, app_token(project["projectJwtSecret"])


def test_a_stopped_gateway_does_not_block_create_and_is_shown_unhealthy(fleet):
    gateway = ExtraGateway(fleet, "gw-stopped")
    try:
        gateway.start()
        wait_until(lambda: gateway.view()["state"] == "healthy", 60, "gw-stopped healthy")
        gateway.stop()
        wait_until(lambda: not next(a for a in fleet.api("GET", "agents").json()
                                    if a["name"] == "gw-stopped")["connected"], 30, "gw-stopped offline")

        project = fleet.create("Past A Dead Gateway")
        view = gateway.view()
        assert view["state"] == "unhealthy" and "not connected" in view["problem"], view
        # The fleet's own gateway took the change and serves the new project.
        token = app_token(project["projectJwtSecret"])
        assert fleet.gateway("GET", fleet.host(project), "/", token).status_code != 404
        # And the next change does not wait on the dead one at all: adding projects alters nothing it served.
        assert fleet.api("POST", "create", {"name": "After The Dead Gateway"}).status_code == 201
        assert "for the lease of gw-stopped" not in _controller_log(fleet)
        listed = run(script("flux"), "agents", "list",
                     env={"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token,
                          "FLUX_CONFIG_DIR": str(fleet.fleet.dir / "cli")})
        assert "offline, unhealthy" in next(line for line in listed.stdout.splitlines() if "gw-stopped" in line)
    finally:
        gateway.stop()
        fleet.api("POST", "agents/gw-stopped/revoke")


def test_a_gateway_cut_off_from_the_controller_stops_serving_when_its_lease_runs_out(fleet):
    project, token = _tenant(fleet, "Lease Demo")
    host = fleet.host(project)
    proxy = CuttableProxy(int(fleet.fleet.ports["grpc"]))
    gateway = ExtraGateway(fleet, "gw-cut", controller=f"127.0.0.1:{proxy.port}")
    try:
        gateway.start()
        wait_until(lambda: gateway.view()["state"] == "healthy" and gateway.view()["lease_seconds_left"] > 0,
                   60, "gw-cut healthy with a lease")
        wait_until(lambda: gateway.request("GET", host, "/todos", token).status_code == 200, 30, "gw-cut serving")
        assert gateway.request("POST", host, "/todos", token, json={"title": "through gw-cut"}).status_code == 201

        proxy.cut()
        # Maintenance goes on without gw-cut's acknowledgement: it returns once gw-cut's lease is over.
        on = fleet.api("POST", f"projects/{project['summary']['hash']}/maintenance", {"enabled": True})
        assert on.status_code == 200, on.text
        assert "gw-cut" not in on.json()["gateways"]
        # It altered a route gw-cut served, so it waited for gw-cut's lease.
        assert "for the lease of gw-cut" in _controller_log(fleet)
        # From then on gw-cut serves nothing, writes least of all; the fleet's gateway enforces maintenance.
        refused = gateway.request("POST", host, "/todos", token, json={"title": "must not land"})
        assert refused.status_code == 503 and "lease" in refused.json()["error"]
        assert gateway.request("GET", host, "/todos", token).status_code == 503
        assert fleet.gateway("POST", host, "/todos", token, json={"title": "nor here"}).status_code == 503
        assert fleet.gateway("GET", host, "/todos", token).status_code == 200
        schema = fleet.api("GET", f"projects/{project['summary']['hash']}").json()["apiSchema"]
        assert [r[0] for r in fleet.shared_sql(f'SELECT title FROM "{schema}".todos')] == ["through gw-cut"]
        assert gateway.view()["state"] == "unhealthy"

        # Back in touch, it catches up (maintenance included) and serves again.
        proxy.restore()
        wait_until(lambda: gateway.view()["state"] == "healthy", 60, "gw-cut caught up")
        wait_until(lambda: gateway.request("GET", host, "/todos", token).status_code == 200, 30, "gw-cut serving again")
        again = gateway.request("POST", host, "/todos", token, json={"title": "still locked"})
        assert again.status_code == 503 and again.json() == {"error": "project is migrating; try again later"}
    finally:
        fleet.api("POST", f"projects/{project['summary']['hash']}/maintenance", {"enabled": False})
        gateway.stop()
        proxy.close()
        fleet.api("POST", "agents/gw-cut/revoke")


def test_a_caddy_that_dies_is_started_again_within_seconds_and_reported(fleet):
    import signal
    import time

    from tests.support import pid_alive

    project, token = _tenant(fleet, "Caddy Crash")
    host = fleet.host(project)
    assert fleet.gateway("GET", host, "/todos", token).status_code == 200
    state = fleet.fleet.dir / "agents" / "dev-gateway"
    pid = int((state / "caddy.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), 10, "Caddy to die")
    killed = time.monotonic()

    def serving():
        try:
            return fleet.gateway("GET", host, "/todos", token).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(serving, 15, "the gateway to serve again")
    assert time.monotonic() - killed < 10
    assert int((state / "caddy.pid").read_text()) != pid
    log = (fleet.fleet.dir / "logs" / "dev-gateway.log").read_text(errors="replace")
    assert "Caddy stopped answering (it exited with code -9); starting it again (restart 1)" in log


def test_a_gateway_with_acme_gets_certificates_on_demand_for_project_hosts_only(fleet):
    """tls_issuer acme: Caddy takes the configuration (an ACME issuer, on demand), and asks the agent
    before each certificate: yes for a project's host, no for any other name. (No ACME CA is
    reachable here: nothing is issued.)"""
    gateway = ExtraGateway(fleet, "gw-acme", tls_issuer="acme", acme_email="ops@example.com",
                           acme_ca="https://127.0.0.1:9/directory")
    project = fleet.create("Public Certificates")
    try:
        gateway.start()
        wait_until(lambda: gateway.view()["state"] == "healthy", 60, "gw-acme healthy with its ACME configuration")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(gateway.state_dir / "caddy-admin.sock")),
                          headers={"Host": ""}, timeout=10) as admin:
            loaded = admin.get("http://localhost/config/apps/tls/automation").json()
        assert "policies" in loaded, loaded
        acme = loaded["policies"][1]["issuers"][0]
        assert acme["module"] == "acme" and acme["email"] == "ops@example.com" and loaded["policies"][1]["on_demand"]
        assert loaded["on_demand"]["ask"] == f"http://{gateway.auth_listen}/ask"
        ask = f"http://{gateway.auth_listen}/ask"
        assert httpx.get(ask, params={"domain": fleet.host(project)}, timeout=10).status_code == 200
        assert httpx.get(ask, params={"domain": "not-a-project.example.com"}, timeout=10).status_code == 404
    finally:
        gateway.stop()
        fleet.api("POST", "agents/gw-acme/revoke")


def test_checking_caddy_every_second_keeps_one_admin_client_and_asks_for_a_small_answer(tmp_path, monkeypatch):
    """The Caddy check runs on the event loop that answers every request's forward_auth: a new
    HTTP client per check cost that loop tens of milliseconds a second (a CA bundle loaded each time),
    a stall every request arriving then waited out (the gateway's p99). One client serves every check,
    and each asks only for the server's listen address, not the whole configuration."""
    import asyncio

    from agent.adapters import caddy as caddy_mod
    from agent.runtime.settings import GatewaySettings

    monkeypatch.setattr(caddy_mod, "CADDY_CHECK_S", 0.05)
    made, asked = [], []
    real_client = httpx.AsyncClient

    class CountingClient(real_client):
        def __init__(self, *args, **kwargs):
            made.append(1)
            super().__init__(*args, **kwargs)

        async def send(self, request, **kwargs):
            asked.append(request.url.path)
            return await super().send(request, **kwargs)

    monkeypatch.setattr(caddy_mod.httpx, "AsyncClient", CountingClient)
    settings = GatewaySettings(listen=f"127.0.0.1:{free_port()}", auth_listen=f"127.0.0.1:{free_port()}",
                               pool_upstream="127.0.0.1:9", pool_jwt_secret="p" * 40)
    gateway = caddy_mod.Gateway(tmp_path, settings)

    async def scenario() -> bool:
        await gateway.start()
        try:
            await asyncio.sleep(1)  # about twenty checks
            return await gateway._caddy_has_our_config()
        finally:
            await gateway.stop()

    assert asyncio.run(scenario())
    checks = [path for path in asked if path == "/config/apps/http/servers/flux/listen"]
    assert len(checks) >= 10, asked
    assert len(made) == 1, f"{len(made)} admin clients made for {len(asked)} requests"
    assert "/config/" not in asked  # the whole configuration (every route) is never fetched to check


def test_a_gateway_started_again_stops_the_caddy_it_adopted_when_it_stops(tmp_path):
    """An agent killed leaves its Caddy running, and the agent started again adopts it; stopping
    that agent stops that Caddy too (left running, `flux dev down` left it behind). A Caddy whose
    process is not this gateway's configuration is never taken for it."""
    import asyncio

    from agent.adapters import caddy as caddy_mod
    from agent.runtime.settings import GatewaySettings
    from devtools.fleet import pid_alive, terminate

    settings = GatewaySettings(listen=f"127.0.0.1:{free_port()}", auth_listen=f"127.0.0.1:{free_port()}",
                               pool_upstream="127.0.0.1:9", pool_jwt_secret="p" * 40)
    first, again = caddy_mod.Gateway(tmp_path, settings), caddy_mod.Gateway(tmp_path, settings)

    started: list[int] = []

    async def killed_then_started_again() -> None:
        await first.start()
        started.append(first.caddy.pid)
        first.caddy = None  # as if killed: its Caddy goes on
        await first.stop()
        await again.start()
        try:
            assert again.caddy is None  # adopted, not started
        finally:
            await again.stop()

    try:
        asyncio.run(killed_then_started_again())
        assert not pid_alive(started[0]), "the adopted Caddy outlived the agent that stopped"
        # caddy.pid naming a process that is not this gateway's Caddy: nothing is taken for it.
        (tmp_path / "caddy.pid").write_text(str(os.getpid()))
        assert again._own_caddy_pid() is None
    finally:
        for pid in started:
            if pid_alive(pid):
                terminate(pid)


def test_a_caddy_that_stops_answering_for_a_while_is_kept_and_serves_again(tmp_path, monkeypatch):
    """A Caddy that is only slow to answer its admin API (here: stopped for 6 s, three of its 2 s
    checks) is not taken for hung before CADDY_HUNG_AFTER_S: the same process serves again once
    it answers, and no restart is counted."""
    import asyncio
    import signal

    from agent.adapters import caddy as caddy_mod
    from agent.runtime import metrics
    from agent.runtime.settings import GatewaySettings
    from devtools.fleet import pid_alive, terminate

    counted = metrics.CADDY_RESTARTS._value.get()
    monkeypatch.setattr(caddy_mod, "CADDY_CHECK_S", 0.1)
    assert caddy_mod.CADDY_HUNG_AFTER_S > 8
    settings = GatewaySettings(listen=f"127.0.0.1:{free_port()}", auth_listen=f"127.0.0.1:{free_port()}",
                               pool_upstream="127.0.0.1:9", pool_jwt_secret="p" * 40)
    gateway = caddy_mod.Gateway(tmp_path, settings)
    pids: list[int] = []

    async def scenario() -> tuple[int, int | None, bool]:
        await gateway.start()
        try:
            pids.append(gateway.caddy.pid)
            os.kill(pids[0], signal.SIGSTOP)
            await asyncio.sleep(6)
            try:
                os.kill(pids[0], signal.SIGCONT)
            except ProcessLookupError:  # replaced already: what follows says so
                pass
            await asyncio.sleep(3)  # the check under way when it went on, and the next
            serving = gateway.caddy.pid if gateway.caddy is not None else None
            return gateway.caddy_restarts, serving, await gateway._caddy_has_our_config()
        finally:
            await gateway.stop()

    try:
        restarts, serving, answers = asyncio.run(scenario())
        assert restarts == 0 and metrics.CADDY_RESTARTS._value.get() == counted, \
            "a Caddy that paused was taken for hung and replaced"
        assert serving == pids[0], "another Caddy serves in place of the one that paused"
        assert answers, "the Caddy that paused does not answer with the gateway's configuration"
        assert gateway._unanswered_since is None
        assert not pid_alive(pids[0]), "the Caddy outlived the agent that stopped"
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
                terminate(pid)


def test_a_caddy_that_runs_but_does_not_answer_is_stopped_before_another_is_started(tmp_path, monkeypatch):
    """A Caddy that hangs still holds the edge's port: the supervisor stops it (SIGKILL when SIGTERM
    is not enough) and starts a new one, rather than leaving it behind and failing to listen, over
    and over. Meanwhile the event loop that answers forward_auth never stalls for half a second."""
    import asyncio
    import signal

    from agent.adapters import caddy as caddy_mod
    from agent.runtime import metrics
    from agent.runtime.settings import GatewaySettings
    from devtools.fleet import pid_alive, terminate

    counted = metrics.CADDY_RESTARTS._value.get()
    monkeypatch.setattr(caddy_mod, "CADDY_CHECK_S", 0.1)
    monkeypatch.setattr(caddy_mod, "CADDY_STOP_S", 1.0)
    monkeypatch.setattr(caddy_mod, "CADDY_HUNG_AFTER_S", 1.0)
    settings = GatewaySettings(listen=f"127.0.0.1:{free_port()}", auth_listen=f"127.0.0.1:{free_port()}",
                               pool_upstream="127.0.0.1:9", pool_jwt_secret="p" * 40)
    gateway = caddy_mod.Gateway(tmp_path, settings)
    pids: list[int] = []

    async def scenario() -> tuple[int, float]:
        await gateway.start()
        try:
            pids.append(gateway.caddy.pid)
            os.kill(pids[0], signal.SIGSTOP)  # alive, holding its ports, answering nothing
            loop = asyncio.get_running_loop()
            worst, deadline = 0.0, loop.time() + 30
            while gateway.caddy is None or gateway.caddy.pid == pids[0] or not await gateway._caddy_has_our_config():
                assert loop.time() < deadline, "no new Caddy answered after the old one hung"
                before = loop.time()
                await asyncio.sleep(0.01)
                worst = max(worst, loop.time() - before - 0.01)
            pids.append(gateway.caddy.pid)
            return gateway.caddy_restarts, worst
        finally:
            await gateway.stop()

    try:
        restarts, worst = asyncio.run(scenario())
        assert not pid_alive(pids[0]), "the Caddy that hung was left running"
        assert not pid_alive(pids[1]), "the new Caddy outlived the agent that stopped"
        assert restarts >= 1 and metrics.CADDY_RESTARTS._value.get() - counted == restarts
        assert worst < 0.5, f"the event loop was held {worst:.2f} s while the hung Caddy was stopped"
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                terminate(pid)
