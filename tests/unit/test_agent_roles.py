"""An agent loads the code of its own roles only: a db agent never the Docker SDK, a gateway
agent and a backup agent neither that nor the tenants' SQL (the parser, the rewriting, the ledger)."""

import json
import subprocess
import sys

import pytest

# Each in a new interpreter: what one agent of these roles imports by the time it has started.
SCRIPT = """
import json, sys
from agent.runtime.config import AgentConfig, StateDir
from agent.runtime.connection import Agent

state = StateDir(sys.argv[1])
roles = sys.argv[2].split(",")
state.save(AgentConfig(name="a-1", roles=roles, controller="127.0.0.1:1", server_name="x"))
if "gateway" in roles:
    state.file("settings.json").write_text(json.dumps({"gateway": {
        "listen": "127.0.0.1:1", "auth_listen": "127.0.0.1:2", "pool_upstream": "127.0.0.1:3",
        "pool_jwt_secret": "s" * 32}}))
agent = Agent(state, tools={})
print(json.dumps({"modules": sorted(sys.modules), "owned": sorted(agent.owned),
                  "gateway": agent.gateway is not None}))
"""

DOCKER_SDK = "docker"
TENANT_SQL = ("pglast", "agent.adapters.tenants", "agent.adapters.ledger")
GATEWAY = ("agent.adapters.caddy", "jwt")


def _started(tmp_path, roles: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "agent"), roles],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("roles, absent, present", [
    ("db", (DOCKER_SDK, *GATEWAY), TENANT_SQL),
    ("gateway", (DOCKER_SDK, *TENANT_SQL), GATEWAY),
    ("backup", (DOCKER_SDK, *GATEWAY, *TENANT_SQL), ("agent.adapters.backups",)),
    ("docker", ("agent.adapters.caddy",), (DOCKER_SDK, "agent.adapters.stacks", "agent.adapters.ledger")),
    ("db,docker,gateway", (), (DOCKER_SDK, *TENANT_SQL, *GATEWAY)),
])
def test_an_agent_imports_the_code_of_its_own_roles_only(tmp_path, roles, absent, present):
    started = _started(tmp_path, roles)
    loaded = set(started["modules"])
    assert sorted(set(absent) & loaded) == []
    assert sorted(set(present) - loaded) == []
    assert started["gateway"] == ("gateway" in roles)
    # A db agent's write guards and syncs are its own.
    assert started["owned"] == (["guards", "syncs"] if "db" in roles else [])


def test_a_job_of_a_role_the_agent_has_not_loaded_still_runs_or_fails_by_the_contract(tmp_path):
    """Kinds are found by their family's module, loaded the first time one runs: a job sent to
    an agent without the role fails by what it lacks, as before, not as an unknown kind."""
    script = """
import asyncio, sys
from agent import handlers
from agent.errors import AgentError
handlers.load(["gateway"])
assert "agent.handlers.db" not in sys.modules
try:
    asyncio.run(handlers.run("tenant.drop", {"project_id": "p", "short_id": "abcdefgh"}, job_id="j",
                             progress=lambda *a: None, collect_facts=dict))
except AgentError as exc:
    print(exc.message)
try:
    asyncio.run(handlers.run("tenant.nothing", {}, job_id="j", progress=lambda *a: None, collect_facts=dict))
except AgentError as exc:
    print(exc.message)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lacking, unknown = done.stdout.splitlines()
    assert "no db settings" in lacking
    assert unknown == "this agent does not know job kind 'tenant.nothing'"


def test_a_job_on_an_agent_without_the_db_role_loads_none_of_the_tenants_sql():
    """A job's context holds the write guards and syncs a db agent gives it, and makes none of its
    own: making them loads the tenants' SQL, on the loop that answers the gateway's forward_auth."""
    script = """
import asyncio, sys
from agent import handlers
from agent.errors import AgentError
handlers.load(["gateway"])
asyncio.run(handlers.run("diag.wait", {"seconds": 0}, job_id="j", progress=lambda *a: None, collect_facts=dict))
print(sorted(m for m in ("pglast", "agent.adapters.tenants", "agent.adapters.guards") if m in sys.modules))
try:
    tenant = {"project_id": "0a0a0a0a-0000-4000-8000-000000000001", "short_id": "0a0a0a0a0000"}
    asyncio.run(handlers.run("tenant.unlock", {**tenant, "revoke_writes": False}, job_id="j",
                             progress=lambda *a: None, collect_facts=dict))
except AgentError as exc:
    print(exc.message)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded, refused = done.stdout.splitlines()
    assert loaded == "[]"
    assert refused == "this agent holds no write guards: only a db agent does"
