"""The dedicated engine on a real Docker engine: provision, probe, lifecycle, repair, delete."""

import json
import subprocess
import uuid

import psycopg
import pytest

from tests.support import LocalFleet, run, script, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("dedicated") / "dev")
    yield fleet
    fleet.close()


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


def names(prefix: str) -> dict[str, str]:
    return {
        "db": f"{prefix}-db", "api": f"{prefix}-api",
        "volume": f"{prefix}-db-data", "network": f"{prefix}-net",
    }


def _dedicated(fleet, name: str) -> tuple[dict, dict, str]:
    project = fleet.create(name, mode="v1_dedicated")
    s = project["summary"]
    creds = fleet.api("GET", f"projects/{s['hash']}/credentials").json()
    return project, creds, f"flux-{s['hash']}-{s['slug']}"


def test_provision_probe_and_rows_through_the_gateway(fleet):
    project, creds, prefix = _dedicated(fleet, "Dedicated Rows")
    n = names(prefix)
    running = docker("ps", "--format", "{{.Names}}").split()
    assert n["db"] in running and n["api"] in running
    labels = json.loads(docker("inspect", "-f", "{{json .Config.Labels}}", n["db"]))
    assert labels["flux.managed"] == "true" and labels["flux.hash"] == project["summary"]["hash"]
    assert docker("volume", "inspect", "-f", "{{.Name}}", n["volume"]) == n["volume"]
    assert docker("network", "inspect", "-f", "{{.Name}}", n["network"]) == n["network"]
    # The docker host's own labels (the tests' here) are on all four, beside flux's.
    for kind, name in (("container", n["db"]), ("container", n["api"]), ("volume", n["volume"]),
                       ("network", n["network"])):
        labels = json.loads(docker(kind, "inspect", "-f", "{{json .Labels}}" if kind != "container"
                                   else "{{json .Config.Labels}}", name))
        assert labels["flux-tests"] == "true" and labels["flux.hash"] == project["summary"]["hash"], (name, labels)
    assert docker("inspect", "-f", "{{.HostConfig.Memory}}", n["db"]) == str(256 * 1024 * 1024)
    # Each health check is a process Docker starts in the container: one every 30 s, not every second
    # (at 1-2 s, 15 stacks kept a 2-core docker host 60% busy).
    intervals = docker("inspect", "-f", "{{.Config.Healthcheck.Interval}}", n["db"], n["api"]).split()
    assert intervals == ["30s", "30s"], intervals
    # PostgREST connects as authenticator, never as a superuser.
    assert "authenticator" in docker("inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", n["api"])

    assert creds["mode"] == "v1_dedicated" and creds["anonKey"] and creds["serviceRoleKey"]
    with psycopg.connect(creds["postgresConnectionString"]) as conn:
        conn.execute("CREATE TABLE api.notes (id serial PRIMARY KEY, body text NOT NULL)")
        conn.execute("GRANT SELECT ON api.notes TO anon")
        assert conn.execute("SELECT rolbypassrls FROM pg_roles WHERE rolname = 'service_role'").fetchone() == (True,)
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'authenticator'").fetchone() == (False,)

    probe = fleet.api("POST", f"projects/{project['summary']['hash']}/probe")
    assert probe.status_code == 200 and probe.json()["status"] == 200

    host = fleet.host(project)
    written = fleet.gateway("POST", host, "/notes", creds["serviceRoleKey"], json={"body": "hello"},
                            headers={"Prefer": "return=representation"})
    assert written.status_code == 201, written.text
    read = fleet.gateway("GET", host, "/notes?select=body", creds["anonKey"])
    assert read.status_code == 200 and read.json() == [{"body": "hello"}]
    listed = next(p for p in fleet.api("GET", "list").json() if p["hash"] == project["summary"]["hash"])
    assert listed["mode"] == "v1_dedicated" and listed["status"] == "running"


def test_no_anonymous_door(fleet):
    """Without a token nothing passes; the anon key gets only what the project grants anon."""
    project, creds, _ = _dedicated(fleet, "Closed Door")
    h = project["summary"]["hash"]
    pushed = fleet.push(project, {"001_items.sql": "create table items (id serial primary key, v text);"
                                                   " insert into items (v) values ('private');"})
    assert pushed.status_code == 200, pushed.text
    host = fleet.host(project)
    for method, path, body in (("GET", "/items", None), ("POST", "/items", {"v": "x"}),
                               ("PATCH", "/items?id=eq.1", {"v": "y"}), ("DELETE", "/items?id=eq.1", None)):
        anonymous = fleet.gateway(method, host, path, json=body)
        assert anonymous.status_code == 401, (method, anonymous.text)
        assert anonymous.json() == {"error": "missing bearer token"}
        with_anon_key = fleet.gateway(method, host, path, creds["anonKey"], json=body)
        assert with_anon_key.status_code in (401, 403), (method, with_anon_key.text)
    assert fleet.gateway("GET", host, "/items?select=v", creds["serviceRoleKey"]).json() == [{"v": "private"}]
    with psycopg.connect(creds["postgresConnectionString"]) as conn:
        assert conn.execute("SELECT count(*) FROM information_schema.role_table_grants"
                            " WHERE grantee = 'anon'").fetchone() == (0,)

    # The project grants anon something explicitly: reads pass, writes still do not.
    granted = fleet.push(project, {"002_public.sql": "grant select on items to anon;"})
    assert granted.status_code == 200, granted.text
    assert fleet.gateway("GET", host, "/items?select=v", creds["anonKey"]).json() == [{"v": "private"}]
    assert fleet.gateway("POST", host, "/items", creds["anonKey"], json={"v": "x"}).status_code in (401, 403)
    # A repair re-runs the bootstrap and keeps the project's own grant.
    assert fleet.api("POST", f"projects/{h}/repair").status_code == 200
    assert fleet.gateway("GET", host, "/items?select=v", creds["anonKey"]).json() == [{"v": "private"}]


def test_probe_reports_a_missing_service_role_exactly(fleet):
    project, creds, _ = _dedicated(fleet, "No Service Role")
    with psycopg.connect(creds["postgresConnectionString"], autocommit=True) as conn:
        conn.execute("DROP OWNED BY service_role")
        conn.execute("DROP ROLE service_role")
    probe = fleet.api("POST", f"projects/{project['summary']['hash']}/probe")
    assert probe.status_code == 502
    assert 'role "service_role" does not exist' in probe.json()["error"]
    # Repair brings the role back.
    assert fleet.api("POST", f"projects/{project['summary']['hash']}/repair").status_code == 200
    assert fleet.api("POST", f"projects/{project['summary']['hash']}/probe").status_code == 200


def test_stop_start_and_repair_after_a_removed_container(fleet):
    project, creds, prefix = _dedicated(fleet, "Lifecycle Demo")
    h = project["summary"]["hash"]
    host = fleet.host(project)
    with psycopg.connect(creds["postgresConnectionString"]) as conn:
        conn.execute("CREATE TABLE api.kept (v text); INSERT INTO api.kept VALUES ('survives');"
                     " GRANT SELECT ON api.kept TO anon")

    def status():
        return next(p for p in fleet.api("GET", "list").json() if p["hash"] == h)["status"]

    stopped = fleet.api("POST", f"projects/{h}/lifecycle", {"action": "stop"})
    assert stopped.status_code == 200 and stopped.json() == {"ok": True, "action": "stop", "status": "stopped"}
    assert status() == "stopped"
    # Both ended on Docker's stop signal (exit 0), neither killed when the stop's timeout ran out (137).
    assert docker("inspect", "-f", "{{.State.ExitCode}}", f"{prefix}-api", f"{prefix}-db").split() == ["0", "0"]
    refused = fleet.gateway("GET", host, "/kept", creds["anonKey"])
    assert refused.status_code == 502 and "error" in refused.json()

    assert fleet.api("POST", f"projects/{h}/lifecycle", {"action": "start"}).json()["status"] == "running"
    assert fleet.gateway("GET", host, "/kept", creds["anonKey"]).json() == [{"v": "survives"}]

    docker("rm", "-f", f"{prefix}-api")
    # Done behind Flux's back: listed once the docker agent reports it (it looks every 2 s).
    wait_until(lambda: status() == "partial", 30, "the removed container to be reported")
    repaired = fleet.api("POST", f"projects/{h}/repair")
    assert repaired.status_code == 200, repaired.text
    assert repaired.json()["steps"]["api container"] == "changed"
    assert repaired.json()["steps"]["volume"] == "ok"
    assert status() == "running"
    # Same data, same JWT secret, same API schema.
    assert fleet.gateway("GET", host, "/kept", creds["serviceRoleKey"]).json() == [{"v": "survives"}]
    again = fleet.api("GET", f"projects/{h}/credentials").json()
    assert again["projectJwtSecret"] == creds["projectJwtSecret"]


def test_delete_removes_everything(fleet):
    project, creds, prefix = _dedicated(fleet, "Doomed Stack")
    s = project["summary"]
    n = names(prefix)
    without_yes = run(script("flux"), "delete", "-p", s["slug"], "--hash", s["hash"], check=False,
                      env={"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token})
    assert without_yes.returncode == 2 and "--yes" in without_yes.stderr
    deleted = run(script("flux"), "delete", "-p", s["slug"], "--hash", s["hash"], "--yes", "--skip-backup-check",
                  env={"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token})
    assert f"Deleted {s['slug']}" in deleted.stdout
    leftover = docker("ps", "-a", "--filter", f"label=flux.hash={s['hash']}", "--format", "{{.Names}}")
    assert leftover == ""
    assert docker("volume", "ls", "-q", "--filter", f"name={n['volume']}") == ""
    assert docker("network", "ls", "-q", "--filter", f"name={n['network']}") == ""
    assert all(p["hash"] != s["hash"] for p in fleet.api("GET", "list").json())
    gone = fleet.gateway("GET", fleet.host(project), "/", creds["anonKey"], sni=False)
    assert gone.status_code == 404


def test_another_projects_container_under_its_name_is_left_alone(fleet):
    """Repair, stop and delete never use, stop or remove a container another project holds."""
    project, _, prefix = _dedicated(fleet, "Name Holder")
    h, n = project["summary"]["hash"], names(prefix)
    image = docker("inspect", "-f", "{{.Config.Image}}", n["db"])
    other = str(uuid.uuid4())
    docker("rm", "-f", n["api"])
    docker("create", "--name", n["api"], "--label", "flux.managed=true", "--label", f"flux.project={other}",
           "--label", f"flux.hash={h}", "--label", f"flux.slug={project['summary']['slug']}",
           "--entrypoint", "true", image)
    try:
        def held() -> str:
            return docker("inspect", "-f", '{{.State.Status}} {{index .Config.Labels "flux.project"}}', n["api"])

        repaired = fleet.api("POST", f"projects/{h}/repair")
        assert repaired.status_code == 409, repaired.text
        assert n["api"] in repaired.json()["error"] and other in repaired.json()["error"]
        assert held() == f"created {other}"
        stopped = fleet.api("POST", f"projects/{h}/lifecycle", {"action": "stop"})
        assert stopped.status_code == 409 and n["api"] in stopped.json()["error"]
        assert docker("inspect", "-f", "{{.State.Status}}", n["db"]) == "running"
        assert next(p for p in fleet.api("GET", "list").json() if p["hash"] == h)["status"] == "corrupted"

        deleted = fleet.api("DELETE", f"projects/{h}", params={"slug": project["summary"]["slug"], "skipBackupCheck": "true"})
        assert deleted.status_code == 200, deleted.text
        assert n["api"] in deleted.json()["untouched"]
        assert held() == f"created {other}"
        assert docker("ps", "-a", "-q", "--filter", f"name=^{n['db']}$") == ""
        assert docker("volume", "ls", "-q", "--filter", f"name={n['volume']}") == ""
        assert all(p["hash"] != h for p in fleet.api("GET", "list").json())
    finally:
        docker("rm", "-f", n["api"])


def test_stacks_cannot_reach_each_other(fleet):
    _, _, a = _dedicated(fleet, "Island A")
    _, _, b = _dedicated(fleet, "Island B")
    b_ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", f"{b}-db")
    by_name = subprocess.run(["docker", "exec", f"{a}-db", "pg_isready", "-h", f"{b}-db", "-t", "3"],
                             capture_output=True, text=True)
    by_ip = subprocess.run(["docker", "exec", f"{a}-db", "pg_isready", "-h", b_ip, "-t", "3"],
                           capture_output=True, text=True)
    assert by_name.returncode != 0 and by_ip.returncode != 0
    own = subprocess.run(["docker", "exec", f"{a}-db", "pg_isready", "-h", "127.0.0.1", "-t", "3"],
                         capture_output=True, text=True)
    assert own.returncode == 0


def test_bad_input_is_refused(fleet):
    unknown = fleet.api("POST", "create", {"name": "Nowhere", "mode": "v1_dedicated", "host": "no-such-host"})
    assert unknown.status_code == 400 and "unknown docker host 'no-such-host'" in unknown.json()["error"]
    assert not [p for p in fleet.api("GET", "list").json() if p["slug"] == "nowhere"]
    project, _, _ = _dedicated(fleet, "Mismatch")
    wrong = fleet.api("DELETE", f"projects/{project['summary']['hash']}", params={"slug": "other"})
    assert wrong.status_code == 400 and "does not match" in wrong.json()["error"]
    pooled = fleet.create("Pooled One")
    lifecycle = fleet.api("POST", f"projects/{pooled['summary']['hash']}/lifecycle", {"action": "stop"})
    assert lifecycle.status_code == 400 and "v1_dedicated" in lifecycle.json()["error"]


def test_projects_of_a_docker_agent_that_is_away_or_without_its_engine_are_listed_unknown(fleet):
    import os
    import sys
    import time


    project, _, _ = _dedicated(fleet, "Unseen Stack")
    h = project["summary"]["hash"]

    def status() -> str:
        return next(p for p in fleet.api("GET", "list").json() if p["hash"] == h)["status"]

    def connected(name: str) -> bool:
        return next(a for a in fleet.api("GET", "agents").json() if a["name"] == name)["connected"]

    def observe_jobs() -> int:
        return fleet.catalog_sql("SELECT count(*) FROM jobs WHERE kind = 'stack.observe'")[0][0]

    assert status() == "running"
    fleet.stop_process("dev-docker")
    wait_until(lambda: not connected("dev-docker"), 30, "the docker agent to be away")
    jobs = observe_jobs()
    assert status() == "unknown"
    # The list came from the catalog: nothing was asked of (or queued for) the agent.
    assert observe_jobs() == jobs

    # Back, but without its Docker engine: it says so, and the project is still unknown.
    agent_dir = fleet.fleet.dir / "agents" / "dev-docker"
    lost = subprocess.Popen([sys.executable, "-m", "agent.runtime.main", "run", "--state-dir", str(agent_dir)],
                            env={**os.environ, "DOCKER_HOST": f"unix://{agent_dir}/no-engine.sock"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: connected("dev-docker"), 30, "the docker agent to connect")
        log = fleet.fleet.dir / "logs" / "controller.log"
        wait_until(lambda: "agent dev-docker cannot reach its Docker engine (cannot reach the Docker engine"
                   in log.read_text(errors="replace"), 15, "the agent's report of its lost engine")
        assert status() == "unknown"
    finally:
        lost.terminate()
        lost.wait(15)
    fleet.restart()
    wait_until(lambda: connected("dev-docker") and status() == "running", 60, "the project to be seen running")


def test_a_stack_changed_behind_flux_is_listed_as_its_agent_reports_it(fleet):
    """Docker agents push their stacks' status on change: a container stopped outside Flux shows in
    `flux list` within seconds, with when it was reported, and listing asks no agent anything."""
    import datetime


    project, _, prefix = _dedicated(fleet, "Pushed Status")
    h = project["summary"]["hash"]

    def listed() -> dict:
        return next(p for p in fleet.api("GET", "list").json() if p["hash"] == h)

    wait_until(lambda: listed()["status"] == "running", 30, "the stack to be reported running")
    jobs = fleet.catalog_sql("SELECT count(*) FROM jobs WHERE agent = 'dev-docker'")[0][0]
    docker("stop", "-t", "1", names(prefix)["api"])
    wait_until(lambda: listed()["status"] == "partial", 30, "the stopped API container to be reported")
    item = listed()
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(item["statusReportedAt"])
    assert age.total_seconds() < 35, item  # reports are resent every 30 s at least
    assert fleet.catalog_sql("SELECT count(*) FROM jobs WHERE agent = 'dev-docker'")[0][0] == jobs
    docker("start", names(prefix)["api"])
    wait_until(lambda: listed()["status"] == "running", 30, "the started container to be reported")
