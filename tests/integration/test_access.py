"""Who may call what: every route of the API with the roles allowed, tokens, limits, web edges."""

import json
import socket
import sys
import uuid

import httpx
import pytest

from tests.support import NO_TLS, run

pytestmark = pytest.mark.integration

P = "/api/cli/v1"
# Every route of the OpenAPI description and who may call it. A route missing here fails the suite:
# decide who may call it before it ships.
ROUTES = {
    ("GET", f"{P}/auth/verify"): "any",
    ("POST", f"{P}/agents/tokens"): "admin",
    ("GET", f"{P}/agents"): "admin",
    ("GET", f"{P}/agents/{{name}}"): "admin",
    ("POST", f"{P}/agents/{{name}}/revoke"): "admin",
    ("POST", f"{P}/agents/{{name}}/ping"): "admin",
    ("POST", f"{P}/agents/{{name}}/jobs"): "admin",
    ("GET", f"{P}/jobs/{{job_id}}"): "admin",
    ("GET", f"{P}/users"): "admin",
    ("POST", f"{P}/users"): "admin",
    ("GET", f"{P}/tokens"): "any",
    ("POST", f"{P}/tokens"): "any",
    ("DELETE", f"{P}/tokens/{{token_id}}"): "any",
    ("POST", f"{P}/create"): "any",
    ("GET", f"{P}/list"): "any",
    ("GET", f"{P}/projects/{{hash_}}"): "any",
    ("GET", f"{P}/projects/{{hash_}}/credentials"): "any",
    ("GET", f"{P}/projects/{{hash_}}/migrations"): "any",
    ("GET", f"{P}/projects/{{hash_}}/backups"): "any",
    ("POST", f"{P}/projects/{{hash_}}/backups"): "any",
    ("POST", f"{P}/projects/{{hash_}}/backups/{{backup_id}}/verify"): "any",
    ("GET", f"{P}/projects/{{hash_}}/backups/{{backup_id}}/download"): "any",
    ("POST", f"{P}/backups/{{backup_id}}/restore"): "any",
    ("PUT", f"{P}/projects/{{hash_}}/backup-schedule"): "any",
    ("GET", f"{P}/projects/{{hash_}}/dump"): "any",
    ("GET", f"{P}/projects/{{hash_}}/dumps"): "any",
    ("GET", f"{P}/projects/{{hash_}}/activity"): "any",
    ("GET", f"{P}/logs"): "any",
    ("GET", f"{P}/projects/{{hash_}}/api-env"): "any",
    ("PATCH", f"{P}/projects/{{hash_}}/api-env"): "any",
    ("GET", f"{P}/projects/{{hash_}}/metadata"): "any",
    ("PATCH", f"{P}/projects/{{hash_}}/metadata"): "any",
    ("POST", f"{P}/projects/{{hash_}}/lifecycle"): "any",
    ("POST", f"{P}/projects/{{hash_}}/probe"): "any",
    ("POST", f"{P}/projects/{{hash_}}/repair"): "any",
    ("DELETE", f"{P}/projects/{{hash_}}"): "any",
    ("POST", f"{P}/projects/{{hash_}}/maintenance"): "any",
    ("POST", f"{P}/migrate"): "any",
    ("GET", f"{P}/migrations/{{migration_id}}"): "any",
    ("POST", f"{P}/migrations/{{migration_id}}/resume"): "any",
    ("GET", f"{P}/migrations/{{migration_id}}/events"): "any",
    ("GET", f"{P}/projects/{{hash_}}/migration"): "any",
    ("POST", f"{P}/projects/{{hash_}}/migration/rollback"): "any",
    ("POST", f"{P}/projects/{{hash_}}/migration/finalize"): "any",
    ("DELETE", f"{P}/projects/{{hash_}}/pooled-copy"): "any",
    ("DELETE", f"{P}/projects/{{hash_}}/staged-stack"): "any",
    ("POST", f"{P}/push"): "any",
}
PARAMS = {"name": "no-such-agent", "job_id": "job-00000000", "hash_": "abcdef0", "token_id": "987654",
          "migration_id": str(uuid.uuid4()), "backup_id": str(uuid.uuid4())}


def _operator(controller, name: str = "op") -> str:
    out = run(sys.executable, "-m", "controller.main", "users", "add", name, "--role", "operator",
              "--state-dir", str(controller.state_dir), "--json")
    return json.loads(out.stdout)["token"]


def _call(controller, method: str, path: str, token: str | None):
    url = f"http://127.0.0.1:{controller.ports['http']}{path.format(**PARAMS)}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"slug": "x"} if method == "DELETE" and "projects" in path else None
    return httpx.request(method, url, headers=headers, params=params, timeout=30, verify=NO_TLS,
                         json={} if method in ("POST", "PUT", "PATCH") else None)


def test_every_route_has_a_rule_and_operators_get_403_on_admin_routes(controller):
    described = httpx.get(f"{controller.api_base}/cli/v1/openapi.json").json()["paths"]
    routes = {(method.upper(), path) for path, ops in described.items() for method in ops}
    assert routes == set(ROUTES), f"routes without a rule: {routes - set(ROUTES)}; stale rules: {set(ROUTES) - routes}"

    operator = _operator(controller)
    for (method, path), rule in sorted(ROUTES.items()):
        as_operator = _call(controller, method, path, operator)
        if rule == "admin":
            assert as_operator.status_code == 403, (method, path, as_operator.text)
            assert "needs an admin" in as_operator.json()["error"]
            as_admin = _call(controller, method, path, controller.token)
            assert as_admin.status_code not in (401, 403), (method, path, as_admin.text)
        else:
            assert as_operator.status_code not in (401, 403), (method, path, as_operator.text)
    for (method, path) in sorted(ROUTES):
        anonymous = _call(controller, method, path, None)
        assert anonymous.status_code in (401, 429), (method, path, anonymous.text)
        assert "error" in anonymous.json()


def test_an_operator_cannot_mint_join_tokens_revoke_agents_or_add_users(controller, agents):
    operator = _operator(controller)
    agent = agents("db-1")
    from tests.support import wait_until
    wait_until(lambda: controller.connected("db-1"), 20, "db-1 connected")
    for role in ("gateway", "db", "docker"):
        assert controller.api("POST", "agents/tokens", {"roles": [role]}, token=operator).status_code == 403
    assert controller.api("POST", "agents/db-1/revoke", token=operator).status_code == 403
    assert controller.api("POST", "users", {"name": "mallory", "role": "admin"}, token=operator).status_code == 403
    # Nothing changed: the agent is still connected and there is no new user.
    assert controller.connected("db-1") and agent.proc.poll() is None
    names = [u["name"] for u in controller.api("GET", "users").json()]
    assert "mallory" not in names and "op" in names


def test_tokens_are_listed_created_and_revoked(controller):
    operator = _operator(controller)
    listed = controller.api("GET", "tokens", token=operator).json()
    assert len(listed) == 1 and listed[0]["current"] and listed[0]["user"] == "op"
    assert operator not in json.dumps(listed)  # only a fingerprint, never the token
    created = controller.api("POST", "tokens", token=operator)
    assert created.status_code == 201 and created.json()["token"].startswith("flx_live_")
    second = created.json()["token"]
    assert len(controller.api("GET", "tokens", token=second).json()) == 2
    # An operator sees only its own tokens and cannot revoke anyone else's.
    assert controller.api("GET", "tokens", params={"all": "true"}, token=operator).status_code == 403
    admin_token_id = controller.api("GET", "tokens").json()[0]["id"]
    assert controller.api("DELETE", f"tokens/{admin_token_id}", token=operator).status_code == 404
    assert controller.api("GET", "auth/verify").status_code == 200
    # Revoking the first token ends it at once; the second keeps working.
    first_id = next(t["id"] for t in listed if t["current"])
    assert controller.api("DELETE", f"tokens/{first_id}", token=second).json()["revoked"] is True
    assert controller.api("GET", "auth/verify", token=operator).status_code == 401
    assert controller.api("GET", "auth/verify", token=second).json()["cliRole"] == "operator"
    # An admin sees every user's tokens.
    users = {t["user"] for t in controller.api("GET", "tokens", params={"all": "true"}).json()}
    assert users == {"admin", "op"}


def test_failed_sign_ins_are_rate_limited_per_source(controller):
    bad = "flx_live_" + "0" * 32 + "_0000"
    statuses = [controller.api("GET", "auth/verify", token=bad).status_code for _ in range(12)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    limited = controller.api("GET", "auth/verify")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    assert "too many failed sign-ins" in limited.json()["error"]
    # The dashboard's sign-in form counts against the same source.
    form = httpx.post(f"http://127.0.0.1:{controller.ports['http']}/login", data={"token": bad},
                      headers={"Origin": f"http://127.0.0.1:{controller.ports['http']}"})
    assert form.status_code == 429


def test_the_body_is_not_read_before_authentication(controller):
    """An anonymous client announcing a huge body gets 401 without the controller waiting for it."""
    with socket.create_connection(("127.0.0.1", controller.ports["http"]), timeout=10) as sock:
        sock.sendall(b"POST /api/cli/v1/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 141557760\r\n\r\n{\"files\": [")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    # Authenticated, the route's own limit applies before the body is parsed.
    big = controller.api("POST", "create", {"name": "x" * 100_000})
    assert big.status_code == 413 and "64 KiB" in big.json()["error"]


def test_strict_json_booleans(controller):
    for value in ("false", 0, None, "true"):
        response = controller.api("POST", "migrate", {"slug": "a", "hash": "abcdef0", "dryRun": value})
        assert response.status_code == 400, response.text
        assert "dryRun must be true or false" in response.json()["error"]
    pushed = controller.api("POST", "push", {"slug": "a", "hash": "abcdef0", "sql": "select 1", "dryRun": "no"})
    assert pushed.status_code == 400 and "dryRun" in pushed.json()["error"]


def test_pages_cannot_be_framed_sniffed_or_cached(controller):
    base = f"http://127.0.0.1:{controller.ports['http']}"
    for path in ("/login", "/api/cli/v1/list"):
        headers = httpx.get(base + path, headers={"Authorization": f"Bearer {controller.token}"}).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"], path
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-store" and headers["referrer-policy"] == "same-origin"
    assert "script-src 'self'" in httpx.get(base + "/login").headers["content-security-policy"]


def test_the_fleet_page_is_for_admins(controller):
    base = f"http://127.0.0.1:{controller.ports['http']}"
    with httpx.Client(base_url=base, headers={"Origin": base}) as browser:
        signed_in = browser.post("/login", data={"token": _operator(controller)})
        assert signed_in.status_code == 303
        assert browser.get("/projects").status_code == 200
        fleet = browser.get("/fleet")
        assert fleet.status_code == 403 and "needs an admin" in fleet.text
        assert 'href="/fleet"' not in browser.get("/projects").text


def test_deeply_nested_or_malformed_json_is_a_bad_request(controller):
    deep = "[" * 30000 + "]" * 30000
    for path in ("migrate", "push", "create"):
        response = controller.api("POST", path, content=deep, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert "error" in response.json()
    broken = controller.api("POST", "push", content=b'{"slug": "\xff', headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
