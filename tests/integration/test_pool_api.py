"""The db agent runs and supervises the pooled API (db.pool_api): started once the shared cluster's
authenticator has its password, started again when it dies (with a warning saying so), stopped
with the agent. The command here is the PostgREST stand-in (the one allowed stand-in)."""

import json
import os
import pathlib
import signal
import sys
import time

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.support import NO_TLS, AgentProc, Controller, free_port, wait_until

pytestmark = pytest.mark.integration

STANDIN = pathlib.Path(__file__).resolve().parents[2] / "packaging" / "images" / "postgrest-standin" / "postgrest_standin.py"


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2, verify=NO_TLS).status_code == 200
    except httpx.HTTPError:
        return False


def _pool_api_pid(agent: AgentProc) -> int | None:
    """The pid of the agent's child running the stand-in."""
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == agent.proc.pid and STANDIN.name.encode() in cmdline:
            return int(entry.name)
    return None


def test_the_db_agent_runs_the_pooled_api_and_starts_it_again_when_it_dies(tmp_path, pg_cluster, catalog_url):
    shared = f"shared_{os.getpid()}_{int(time.time())}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(shared)))
    controller = Controller(tmp_path / "controller", catalog_url).start()
    agent = AgentProc.enroll(controller, tmp_path / "agents", "db-pool")
    password, api_port, admin_port = "pw-" + os.urandom(8).hex(), free_port(), free_port()
    settings = {"db": {
        "shared_cluster_url": pg_cluster.url(shared), "authenticator_password": password,
        "pool_api": {"command": [sys.executable, str(STANDIN)],
                     "env": {"PGRST_DB_URI": f"postgresql://authenticator:{password}@127.0.0.1:{pg_cluster.port}/{shared}",
                             "PGRST_DB_SCHEMAS": "public", "PGRST_DB_ANON_ROLE": "anon",
                             "PGRST_JWT_SECRET": "x" * 32, "PGRST_SERVER_HOST": "127.0.0.1",
                             "PGRST_SERVER_PORT": str(api_port), "PGRST_ADMIN_SERVER_PORT": str(admin_port)}}}}
    (agent.state_dir / "settings.json").write_text(json.dumps(settings))
    os.chmod(agent.state_dir / "settings.json", 0o600)
    agent.start()
    try:
        # It logs in as the authenticator the agent set up: ready means the password went through.
        wait_until(lambda: _ready(admin_port), 30, "the pooled API started by the agent")
        first = _pool_api_pid(agent)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: (pid := _pool_api_pid(agent)) is not None and pid != first and _ready(admin_port), 20,
                   "the pooled API started again")
        text = agent.log.read_text()
        assert "the pooled API exited with code -9" in text and "starting it again" in text
        assert password not in text  # its environment is never logged
        again = _pool_api_pid(agent)
    finally:
        agent.stop()
        controller.stop()
    # It stops with the agent.
    wait_until(lambda: not pathlib.Path(f"/proc/{again}").exists(), 10, "the pooled API to stop with the agent")
    assert not _ready(admin_port)
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(shared)))
