"""The gateway's own rules: token lifetimes, where Caddy's admin API listens, pinned profiles."""

import asyncio
import datetime
import json
import pathlib
import sys
import time
import uuid

import jwt
import pytest

from agent.runtime import settings as settings_mod
from agent.runtime.config import StateDir
from agent.errors import AgentError
from agent.adapters import caddy
from agent.adapters.caddy import Gateway, RouteTable, _route
from agent.adapters.ports import free_port
from agent.runtime.settings import DEFAULT_MAX_TOKEN_LIFETIME_S, GatewaySettings
from controller.store import Project
from controller.gateways import Gateways
from controller.projects import Projects
from controller.secretbox import SecretBox, new_master_key

SECRET = "a-project-secret-of-at-least-32-bytes!!"
HOST = "api--demo--abcdef0.localhost"


def _gateway(tmp_path: pathlib.Path, **overrides) -> Gateway:
    settings = GatewaySettings(**{"listen": "127.0.0.1:8443", "auth_listen": "127.0.0.1:8444",
                                  "pool_upstream": "127.0.0.1:3000", "pool_jwt_secret": "p" * 40, **overrides})
    gateway = Gateway(tmp_path, settings)
    for mode, host, upstream in (("v2_shared", HOST, "pool"), ("v1_dedicated", "api--ded--1234567.localhost",
                                                                "127.0.0.1:5000")):
        gateway.table = RouteTable(gateway.table.routes + [_route({
            "project_id": str(uuid.uuid4()), "hosts": [host], "mode": mode, "schema": "t_x_api",
            "jwt_secret": SECRET, "upstream": upstream, "app_role": "t_x_role"})], 1)
    gateway.lease(time.monotonic(), 60)
    return gateway


def _token(**claims) -> str:
    return jwt.encode({"sub": "alice", **claims}, SECRET, algorithm="HS256")


def test_tokens_without_exp_are_refused_on_both_engines(tmp_path):
    gateway = _gateway(tmp_path)
    for host in (HOST, "api--ded--1234567.localhost"):
        status, _, body = gateway.verify(host, "GET", f"Bearer {_token(role='anon')}")
        assert status == 401 and "exp" in body["error"]


def test_tokens_meant_to_live_longer_than_the_maximum_are_refused(tmp_path):
    gateway = _gateway(tmp_path, max_token_lifetime_s=3600)
    now = int(time.time())
    ok = gateway.verify(HOST, "GET", f"Bearer {_token(iat=now, exp=now + 3600)}")
    assert ok[0] == 200
    # Issued long ago with a long life: still far from expiry now, but exp - iat is too long.
    long_lived = gateway.verify(HOST, "GET", f"Bearer {_token(iat=now - 7200, exp=now + 600)}")
    assert long_lived[0] == 401 and "lifetime" in long_lived[2]["error"]
    # No iat: judged by how far away exp is.
    far = gateway.verify(HOST, "GET", f"Bearer {_token(exp=now + 7200)}")
    assert far[0] == 401 and "expires more than 3600s" in far[2]["error"]
    expired = gateway.verify(HOST, "GET", f"Bearer {_token(iat=now - 100, exp=now - 10)}")
    assert expired[0] == 401


def test_the_controllers_api_keys_fit_the_gateways_default_maximum(tmp_path):
    box = SecretBox(new_master_key())
    project_id = str(uuid.uuid4())
    created = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    project = Project(id=project_id, owner_id=1, name="d", slug="ded", hash="1234567", mode="v1_dedicated",
                      lifecycle="active", api_schema="api",
                      jwt_secret_sealed=box.seal(SECRET.encode(), f"project:{project_id}"), db_agent=None,
                      maintenance=False, created_at=created)
    projects = Projects(None, None, box, Gateways(None, None, box, "localhost"))
    gateway = _gateway(tmp_path)
    now = time.time()
    for at in (now, now + 29 * 24 * 3600, now + 31 * 24 * 3600):
        key = projects.api_key(project, "anon", now=at)
        claims = jwt.decode(key, SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False})
        assert claims["exp"] - claims["iat"] <= DEFAULT_MAX_TOKEN_LIFETIME_S
        assert claims["exp"] - at >= 59 * 24 * 3600
    # The same key for a while, so clients holding it are not surprised.
    assert projects.api_key(project, "anon", now=now) == projects.api_key(project, "anon", now=now + 60)
    status, _, _ = gateway.verify("api--ded--1234567.localhost", "GET",
                                  f"Bearer {projects.api_key(project, 'anon')}")
    assert status == 200


def test_caddy_admin_listens_on_a_unix_socket_only(tmp_path):
    gateway = _gateway(tmp_path)
    listen = gateway.caddy_config()["admin"]["listen"]
    assert listen == f"unix/{tmp_path / 'caddy-admin.sock'}"
    state = StateDir(tmp_path)
    base = {"listen": "127.0.0.1:8443", "auth_listen": "127.0.0.1:8444", "pool_upstream": "127.0.0.1:3000",
            "pool_jwt_secret": "p" * 40}
    for admin in ("127.0.0.1:2019", "localhost:2019", ":2019", "relative/admin.sock"):
        state.file(settings_mod.SETTINGS_FILE).write_text(json.dumps({"gateway": {**base, "caddy_admin": admin}}))
        with pytest.raises(AgentError, match="unix"):
            settings_mod.load(state)
    state.file(settings_mod.SETTINGS_FILE).write_text(
        json.dumps({"gateway": {**base, "caddy_admin": "/run/flux/caddy.sock"}}))
    assert settings_mod.load(state)["gateway"].caddy_admin == "/run/flux/caddy.sock"


def test_the_pinned_profile_survives_a_client_connection_header(tmp_path):
    route = _gateway(tmp_path)._caddy_route([HOST], "pool")
    auth, upstream = route["handle"][0]["routes"][0]["handle"]
    pinned = auth["handle_response"][0]["routes"][0]["handle"][0]["request"]
    # Caddy's proxy strips every header a client's `Connection` names: it is removed first ...
    assert "Connection" in pinned["delete"]
    # ... and the proxy to the API sets the profile again after its own hop-by-hop removal.
    assert upstream["headers"]["request"]["set"]["Accept-Profile"] == pinned["set"]["Accept-Profile"]
    assert upstream["headers"]["request"]["set"]["Content-Profile"] == pinned["set"]["Content-Profile"]


def test_a_followed_access_log_sends_each_request_once(tmp_path):
    gateway = _gateway(tmp_path)
    base = time.time() - 10
    entries = [{"ts": base + i + 0.1234567, "status": 200, "duration": 0.0031, "size": 2,
                "request": {"host": HOST if i != 1 else "other.localhost", "method": "GET", "uri": f"/notes?n={i}",
                            "remote_ip": "127.0.0.1"}} for i in range(4)]
    gateway.access_log.write_text("".join(json.dumps(e) + "\n" for e in entries[:3]) + "not json\n")
    first = gateway.access_lines([HOST], 100, None)
    assert [line["line"].split()[1] for line in first["lines"]] == ["/notes?n=0", "/notes?n=2"]
    assert first["lines"][0]["line"] == "GET /notes?n=0 200 3.1ms 2B 127.0.0.1"
    cursor = first["lines"][-1]["at"]
    # Sub-microsecond stamps: the line at the cursor is not sent again, however often it is asked.
    for _ in range(3):
        again = gateway.access_lines([HOST], 100, cursor)
        assert again["lines"] == [] and again["until"] == cursor
    with open(gateway.access_log, "a") as log:
        log.write(json.dumps(entries[3]) + "\n")
    later = gateway.access_lines([HOST], 100, cursor)
    assert [line["line"].split()[1] for line in later["lines"]] == ["/notes?n=3"]
    assert gateway.access_lines([HOST], 100, later["until"])["lines"] == []
def test_a_verified_token_is_not_checked_again_until_it_expires(tmp_path, monkeypatch):
    gateway = _gateway(tmp_path)
    checks = []
    decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: checks.append(1) or decode(*a, **k))
    token = _token(exp=int(time.time()) + 2)
    for _ in range(3):
        assert gateway.verify(HOST, "GET", f"Bearer {token}")[0] == 200
    assert len(checks) == 1
    # A token with a bad signature is never remembered.
    forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "another-secret-of-32-bytes-or-more!!",
                        algorithm="HS256")
    for _ in range(2):
        assert gateway.verify(HOST, "GET", f"Bearer {forged}")[0] == 401
    assert len(checks) == 3
    # Past its expiry it is checked again, and refused.
    time.sleep(2.1)
    expired = gateway.verify(HOST, "GET", f"Bearer {token}")
    assert expired[0] == 401 and "expired" in expired[2]["error"] and len(checks) == 4


def test_a_rotated_secret_refuses_tokens_remembered_under_the_old_one(tmp_path):
    gateway = _gateway(tmp_path)
    token = _token(exp=int(time.time()) + 600)
    assert gateway.verify(HOST, "GET", f"Bearer {token}")[0] == 200
    route = gateway.table.by_host[HOST]
    rotated = _route({**{k: getattr(route, k) for k in ("project_id", "hosts", "mode", "schema", "upstream",
                                                         "app_role")}, "jwt_secret": "a-new-secret-of-32-bytes-or-more!!!!"})
    gateway.table = RouteTable([rotated if r.project_id == route.project_id else r for r in gateway.table.routes], 2)
    assert gateway.verify(HOST, "GET", f"Bearer {token}")[0] == 401



def test_the_gateway_keeps_threads_from_holding_its_forward_auth_answers_for_long(tmp_path):
    """forward_auth is answered on the event loop and the access log counted in a thread: while a
    thread runs Python, the loop waits up to the interpreter's switch interval (5 ms by default) for
    its turn, and so does each request that came in meanwhile. The gateway shortens it while it
    serves, and puts it back when it stops."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # Python's default, whatever ran in this process before
    gateway = _gateway(tmp_path, manage_caddy=False, auth_listen=f"127.0.0.1:{free_port('127.0.0.1')}")

    async def start_and_stop() -> float:
        try:
            with pytest.raises(AgentError, match="no Caddy answers"):
                await gateway.start()
            return sys.getswitchinterval()
        finally:
            await gateway.stop()

    try:
        assert asyncio.run(start_and_stop()) == pytest.approx(caddy.SWITCH_INTERVAL_S)
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        sys.setswitchinterval(before)
