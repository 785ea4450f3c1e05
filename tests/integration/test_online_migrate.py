"""The online migrate end to end: the stack filled from a replication slot's snapshot and kept in
sync by the db agent, writes paused only for the cutover, nothing acknowledged lost, no slot left."""

import json
import subprocess
import threading
import time

import pytest

from tests.writer import Writer as GatewayWriter
from tests.support import NO_TLS, LocalFleet, app_token, wait_until
from tests.integration.test_migrate import FILES, _containers, _dedicated_sql, _mode, _schema, _start_streaming

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("online") / "dev")
    yield fleet
    fleet.close()


def Writer(fleet, project, rate: float = 20) -> GatewayWriter:
    """Todos through the gateway at a steady rate, titled w1, w2, … by their ids."""
    return GatewayWriter(fleet.gateway_port, fleet.info["gateway_ca"], fleet.host(project),
                         app_token(project["projectJwtSecret"], sub="writer"), path="/todos", rate=rate,
                         body=lambda i: {"title": f"w{i}"})


def _only_paused(refused: dict) -> bool:
    """Every answer that refused a write was the pause's 503. A connection the route switch dropped
    is no answer: the writer sends that write again, and lost writes are counted apart."""
    return all(outcome == "503" for outcome in refused if outcome.isdigit())


def _sync_objects(fleet) -> list:
    return fleet.shared_sql("SELECT slot_name FROM pg_replication_slots UNION ALL SELECT pubname FROM pg_publication")


def _new(fleet, name: str) -> dict:
    project = fleet.create(name)
    assert fleet.push(project, FILES).status_code == 200
    return project


def test_an_online_migrate_loses_no_write_and_leaves_no_slot(fleet):
    project = _new(fleet, "Online Shop")
    schema = _schema(fleet, project)
    fleet.shared_sql(f"INSERT INTO {schema}.todos (owner, title) SELECT 'seed', 'seed ' || g"
                     " FROM generate_series(1, 20000) g")
    dry = fleet.migrate(project, dryRun=True, yes=False).json()
    assert dry["ok"] and dry["plan"]["online"] is True, dry
    assert dry["plan"]["steps"] == ["preflight", "provision", "sync", "bootstrap", "catch_up", "probe", "lock",
                                    "drain", "flip", "unlock", "sync_end", "follow_back", "confirm"]
    assert dry["preflight"]["logicalReplication"]["wal_level"] == "logical"
    with Writer(fleet, project) as writer:
        time.sleep(1)
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(response=fleet.migrate(project)))
        runner.start()

        def phase():
            return fleet.api("GET", f"projects/{project['summary']['hash']}/migration").json()

        seen = wait_until(lambda: (s := phase()).get("sync") and s, 120, "the sync's lag in status")
        assert seen["sync"]["lagBytes"] >= 0 and "lagSeconds" in seen["sync"]
        refused = fleet.push(project, {"003_more.sql": "create table public.more (id int primary key);"})
        assert refused.status_code == 409 and "synced" in refused.json()["error"], refused.text
        runner.join(300)
        result = outcome["response"].json()
        time.sleep(1)
    assert result["state"] == "succeeded", result
    assert result["sync"]["pauseLsn"] and result["sync"]["lagBytesAtPause"] >= 0
    # Checked again after the cutover, against the pooled copy that follows the stack.
    assert result["confirmed"]["problems"] == [] and result["confirmed"]["tables"]["todos"] > 20000
    assert _mode(fleet, project) == "v1_dedicated"
    # The new stack took the copy in bulk-load mode, and left it before the sync applied a change.
    assert result["dump"]["bulkLoadRestartSeconds"] > 0
    assert _dedicated_sql(project, "SHOW wal_level") == "logical"
    dedicated = set(_dedicated_sql(project, f"SELECT title FROM {schema}.todos WHERE owner = 'writer'").split("\n"))
    acked = {f"w{i}" for i in writer.acked_ids}
    assert len(acked) > 20 and acked <= dedicated, sorted(acked - dedicated)[:10]
    assert _dedicated_sql(project, f"SELECT count(*) FROM {schema}.todos WHERE owner = 'seed'") == "20000"
    assert _only_paused(writer.refused), writer.refused
    # Sequences went across inside the pause: the next id on the stack follows the last one written.
    top = _dedicated_sql(project, f"SELECT max(id) FROM {schema}.todos")
    assert int(_dedicated_sql(project, f"SELECT last_value FROM {schema}.todos_id_seq")) >= int(top)
    assert _sync_objects(fleet) == []
    assert _dedicated_sql(project, "SELECT count(*) FROM pg_subscription") == "0"
    print(f"max gap between acknowledged writes: {writer.max_gap():.2f}s")


def test_copies_that_differ_after_the_cutover_move_the_project_back_with_every_write(fleet):
    """The check after the cutover compares the stack with the kept pooled copy; here a row put
    into the pooled copy behind the migration's back (after the unlock froze it) makes them differ,
    and the project goes back to v2_shared at once, with every acknowledged write."""
    project = _new(fleet, "Differs Later")
    schema = _schema(fleet, project)
    fleet.shared_sql(f"INSERT INTO {schema}.todos (owner, title) SELECT 'seed', 'seed ' || g"
                     " FROM generate_series(1, 5000) g")

    def tamper(event: dict) -> None:
        if event.get("event") == "phase" and event["phase"] == "sync_end":
            fleet.shared_sql(f"INSERT INTO {schema}.todos (id, owner, title) VALUES (900000001, 'x', 'stray')")

    with Writer(fleet, project) as writer:
        time.sleep(1)
        migration_id, thread, box = _start_streaming(fleet, project, on_event=tamper, online=True)
        thread.join(300)
        time.sleep(1)
    result = box["events"][-1]
    assert result["event"] == "result" and result["state"] == "rolled_back", result
    assert result["phase"] == "confirm" and "differ after the cutover" in result["error"], result
    assert "table todos: source" in result["error"] and "moved back to v2_shared" in result["error"]
    assert "move_back" in [e.get("phase") for e in box["events"]]
    status = fleet.api("GET", f"migrations/{migration_id}").json()
    assert status["state"] == "rolled_back"
    assert _mode(fleet, project) == "v2_shared"
    detail = fleet.api("GET", f"projects/{project['summary']['hash']}").json()
    assert detail["maintenance"] is False
    pooled = {r[0] for r in fleet.shared_sql(f"SELECT title FROM {schema}.todos WHERE owner = 'writer'")}
    acked = {f"w{i}" for i in writer.acked_ids}
    assert len(acked) > 20 and acked <= pooled, sorted(acked - pooled)[:10]
    assert _only_paused(writer.refused), writer.refused
    # The stack stays for inspection; no slot or publication is left on the shared cluster.
    assert _containers(project) != [] and _sync_objects(fleet) == []
    write = fleet.gateway("POST", fleet.host(project), "/todos", app_token(project["projectJwtSecret"], sub="w"),
                          json={"title": "pooled again"})
    assert write.status_code == 201, write.text


def test_the_dry_run_names_what_stops_an_online_sync_and_falls_back(fleet):
    project = _new(fleet, "Keyless Ledger")
    assert fleet.push(project, {"003_events.sql": "create table public.events (at timestamptz, what text);"}
                      ).status_code == 200
    auto = fleet.migrate(project, dryRun=True, yes=False).json()
    assert auto["ok"] and auto["plan"]["online"] is False
    assert any("events" in w and "held for the whole copy" in w for w in auto["preflight"]["warnings"]), auto
    forced = fleet.migrate(project, dryRun=True, yes=False, online=True).json()
    assert not forced["ok"]
    assert any("events" in e and "REPLICA IDENTITY FULL" in e for e in forced["preflight"]["errors"]), forced
    refused = fleet.migrate(project, online=True)
    assert refused.status_code == 400 and "primary key" in refused.text
    assert _sync_objects(fleet) == [] and _mode(fleet, project) == "v2_shared"


def _owner_view(url: str, other_schema: str, shared_password: str) -> dict:
    """What the dedicated database's superuser (the project's owner) can find there."""
    import psycopg

    from agent.adapters.dumps import libpq_env
    with psycopg.connect(url) as conn:
        seen = {
            "subscriptions": conn.execute("SELECT count(*) FROM pg_subscription").fetchone()[0],
            "foreign_servers": conn.execute("SELECT count(*) FROM pg_foreign_server").fetchone()[0],
            "tenant_schemas": [r[0] for r in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\\_%\\_api' ORDER BY 1")],
        }
    dumped = subprocess.run(["pg_dumpall"], capture_output=True, env=libpq_env(url), check=True).stdout
    seen["other_tenant_in_dump"] = other_schema.encode() in dumped or b"other tenant's secret" in dumped
    seen["shared_password_in_dump"] = shared_password.encode() in dumped
    return seen


def test_the_owner_of_the_dedicated_database_never_reaches_another_tenant(fleet):
    other = _new(fleet, "Other Tenant")
    other_schema = _schema(fleet, other)
    fleet.shared_sql(f"INSERT INTO {other_schema}.todos (owner, title) VALUES ('x', 'other tenant''s secret')")
    project = _new(fleet, "Curious Owner")
    schema = _schema(fleet, project)
    fleet.shared_sql(f"INSERT INTO {schema}.todos (owner, title) SELECT 'seed', repeat('s', 200)"
                     " FROM generate_series(1, 300000) g")
    shared_password = fleet.fleet.cluster("shared").password
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(response=fleet.migrate(project)))
    runner.start()

    def syncing():
        status = fleet.api("GET", f"projects/{project['summary']['hash']}/migration").json()
        return status.get("phase") in ("catch_up", "probe") and status

    wait_until(syncing, 120, "the migration to sync")
    url = fleet.api("GET", f"projects/{project['summary']['hash']}/credentials").json()["stagedStack"][
        "postgresConnectionString"]
    during = _owner_view(url, other_schema, shared_password)
    # Every login role of the shared cluster that may stream changes is its own superuser.
    replicators = fleet.shared_sql("SELECT rolname FROM pg_roles WHERE rolreplication AND rolcanlogin"
                                   " AND NOT rolsuper")
    runner.join(300)
    assert outcome["response"].status_code == 200, outcome["response"].text
    url = fleet.api("GET", f"projects/{project['summary']['hash']}/credentials").json()["postgresConnectionString"]
    after = _owner_view(url, other_schema, shared_password)
    for seen in (during, after):
        assert seen == {"subscriptions": 0, "foreign_servers": 0, "tenant_schemas": [schema],
                        "other_tenant_in_dump": False, "shared_password_in_dump": False}, seen
    assert replicators == []


def _stack_slots(project) -> str:
    return _dedicated_sql(project, "SELECT (SELECT count(*) FROM pg_replication_slots)"
                                   " + (SELECT count(*) FROM pg_publication)")


def test_rollback_after_cutover_brings_back_every_write_made_on_the_stack(fleet):
    project = _new(fleet, "Changed Mind")
    schema = _schema(fleet, project)
    with Writer(fleet, project) as writer:
        time.sleep(0.5)
        migrated = fleet.migrate(project)
        assert migrated.status_code == 200, migrated.text
        assert "until" in migrated.json()["rollback"], migrated.json()
        time.sleep(1.5)
        # Changes of every kind on the stack, besides the writer's inserts.
        _dedicated_sql(project, f"UPDATE {schema}.todos SET done = true WHERE title = 'w2'")
        _dedicated_sql(project, f"DELETE FROM {schema}.todos WHERE title = 'w1'")
        rolled = fleet.api("POST", f"projects/{project['summary']['hash']}/migration/rollback",
                           {"slug": project["summary"]["slug"]}, timeout=120)
        assert rolled.status_code == 200, rolled.text
        time.sleep(1.5)
    assert rolled.json()["mode"] == "v2_shared" and _mode(fleet, project) == "v2_shared"
    pooled = {t for (t,) in fleet.shared_sql(f"SELECT title FROM {schema}.todos WHERE owner = 'writer'")}
    acked = {f"w{i}" for i in writer.acked_ids} - {"w1"}
    assert len(acked) > 40 and acked <= pooled, sorted(acked - pooled)[:10]
    assert "w1" not in pooled
    assert fleet.shared_sql(f"SELECT done FROM {schema}.todos WHERE title = 'w2'") == [(True,)]
    assert _only_paused(writer.refused), writer.refused
    # Writes land on the pooled copy again, with ids after every one the stack handed out.
    token = app_token(project["projectJwtSecret"], sub="writer")
    after = fleet.gateway("POST", fleet.host(project), "/todos", token, json={"title": "back home"})
    assert after.status_code == 201, after.text
    assert _sync_objects(fleet) == [] and _stack_slots(project) == "0"
    again = fleet.api("POST", f"projects/{project['summary']['hash']}/migration/rollback", {}, timeout=60)
    assert again.status_code == 400 and "rolled_back" in again.json()["error"]


def test_finalize_ends_the_way_back_and_keeps_the_copy_read_only(fleet):
    from tests.support import run, script
    project = _new(fleet, "Sure Now")
    schema = _schema(fleet, project)
    assert fleet.migrate(project).status_code == 200
    assert _stack_slots(project) == "2"
    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token}
    s = project["summary"]
    refused = run(script("flux"), "migrate", "finalize", "-p", s["slug"], "--hash", s["hash"], env=env, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = run(script("flux"), "migrate", "finalize", "-p", s["slug"], "--hash", s["hash"], "--yes", env=env)
    assert "no longer follows" in done.stdout
    assert _stack_slots(project) == "0" and _sync_objects(fleet) == []
    # The kept copy stays read-only for the tenant, and the project stays dedicated.
    assert fleet.shared_sql(f"SELECT has_table_privilege('{schema.replace('_api', '_role')}', "
                            f"'{schema}.todos', 'INSERT')") == [(False,)]
    assert _mode(fleet, project) == "v1_dedicated"
    late = run(script("flux"), "migrate", "rollback", "-p", s["slug"], "--hash", s["hash"], "--yes", env=env,
               check=False)
    assert late.returncode == 1 and "rollback window ended (finalized)" in late.stderr, late.stderr


def test_a_staged_stack_stays_in_sync_until_the_cutover_takes_the_sync_over(fleet):
    project = _new(fleet, "Staged Sync")
    schema = _schema(fleet, project)
    staged = fleet.migrate(project, staged=True)
    assert staged.status_code == 200 and staged.json()["stagedSync"]["active"] is True, staged.text
    token = app_token(project["projectJwtSecret"], sub="later")
    assert fleet.gateway("POST", fleet.host(project), "/todos", token, json={"title": "after staging"}
                         ).status_code == 201
    wait_until(lambda: _dedicated_sql(project, f"SELECT count(*) FROM {schema}.todos WHERE title = 'after staging'")
               == "1", 30, "the staged stack to follow the pooled project")
    refused = fleet.push(project, {"003_more.sql": "create table public.more (id int primary key);"})
    assert refused.status_code == 409 and "kept in sync" in refused.json()["error"], refused.text
    assert [r[0] for r in _sync_objects(fleet)] == [f"flux_sync_{schema[2:14]}"] * 2
    with Writer(fleet, project) as writer:
        time.sleep(0.5)
        full = fleet.migrate(project)
        time.sleep(1)
    assert full.status_code == 200, full.text
    assert full.json()["syncTakenOver"] == staged.json()["migrationId"] and "dump" not in full.json()
    stored = set(_dedicated_sql(project, f"SELECT title FROM {schema}.todos").split("\n"))
    assert {f"w{i}" for i in writer.acked_ids} | {"after staging"} <= stored
    assert _sync_objects(fleet) == []


def test_discarding_a_staged_stack_ends_its_sync(fleet):
    project = _new(fleet, "Staged Then Not")
    assert fleet.migrate(project, staged=True).status_code == 200
    assert _sync_objects(fleet)
    gone = fleet.api("DELETE", f"projects/{project['summary']['hash']}/staged-stack",
                     params={"slug": project["summary"]["slug"]})
    assert gone.status_code == 200, gone.text
    assert _sync_objects(fleet) == []
    status = fleet.api("GET", f"projects/{project['summary']['hash']}/migration").json()
    assert status["stagedSync"] == {**status["stagedSync"], "active": False, "ended": "the staged stack was discarded"}
    assert fleet.push(project, {"003_more.sql": "create table public.more (id int primary key);"}).status_code == 200


def test_a_leader_killed_mid_migrate_is_replaced_and_the_migration_settled(fleet, tmp_path):
    """Two controllers on the fleet's catalog; the leader is killed while the migration syncs.
    The other one takes the lease, the agents fail over to it, and it settles the migration (rolled
    back, as a restarted controller does before the flip): no acknowledged write is lost, no slot
    or lock is left, and the project serves on."""
    import shutil
    import sys

    import httpx

    from tests.support import READY, free_port

    project = _new(fleet, "Failover Shop")
    schema = _schema(fleet, project)
    h = project["summary"]["hash"]
    fleet.shared_sql(f"INSERT INTO {schema}.todos (owner, title) SELECT 'seed', 'seed ' || g"
                     " FROM generate_series(1, 20000) g")
    second_dir = tmp_path / "second"
    shutil.copytree(fleet.fleet.dir / "controller", second_dir)
    ports = {name: free_port() for name in ("http", "grpc", "enroll")}
    log = tmp_path / "second.log"
    second = subprocess.Popen(
        [sys.executable, "-m", "controller.main", "run", "--state-dir", str(second_dir),
         "--http-listen", f"127.0.0.1:{ports['http']}", "--grpc-listen", f"127.0.0.1:{ports['grpc']}",
         "--enroll-listen", f"127.0.0.1:{ports['enroll']}"], stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    second_api = f"http://127.0.0.1:{ports['http']}/api/cli/v1"
    headers = {"Authorization": f"Bearer {fleet.token}"}
    try:
        wait_until(lambda: READY.search(log.read_text()), 30, "the second controller")
        assert "(follower; the leader is" in log.read_text()
        # The leader tells the connected agents of the new controller.
        agents = ["dev-db", "dev-docker", "dev-gateway", "dev-backup"]

        def known(name: str) -> list:
            return json.loads((fleet.fleet.dir / "agents" / name / "agent.json").read_text()).get("controllers", [])

        wait_until(lambda: all(f"127.0.0.1:{ports['grpc']}" in known(a) for a in agents), 20,
                   "the agents to hear of the second controller")

        def migration() -> dict:
            return httpx.get(f"{second_api}/projects/{h}/migration", headers=headers, timeout=30,
                             verify=NO_TLS).json()

        with Writer(fleet, project) as writer:
            time.sleep(1)
            outcome = {}

            def run():
                try:
                    outcome["response"] = fleet.migrate(project)
                except httpx.HTTPError as exc:  # the controller it asked is killed
                    outcome["error"] = exc

            runner = threading.Thread(target=run)
            runner.start()
            wait_until(lambda: migration().get("sync"), 120, "the migration to sync")
            fleet.kill_process("controller")
            killed = time.monotonic()
            wait_until(lambda: "settling migration" in log.read_text(), 15,
                       "the new leader to take the migration up within 15 s")
            taken_up = time.monotonic() - killed
            settled = wait_until(lambda: (m := migration()).get("state") not in (None, "running") and m, 120,
                                 "the migration to be settled")
            settled_after = time.monotonic() - killed
            runner.join(30)
            time.sleep(1)
        assert "error" in outcome or outcome["response"].status_code >= 500, outcome
        assert settled["state"] in ("rolled_back", "succeeded"), settled
        assert "leading the controllers on this catalog" in log.read_text()
        listed = httpx.get(f"{second_api}/list", headers=headers, timeout=30, verify=NO_TLS).json()
        item = next(p for p in listed if p["hash"] == h)
        acked = {f"w{i}" for i in writer.acked_ids}
        if settled["state"] == "rolled_back":
            assert item["mode"] == "v2_shared"
            kept = {r[0] for r in fleet.shared_sql(f"SELECT title FROM {schema}.todos WHERE owner = 'writer'")}
        else:
            kept = set(_dedicated_sql(project, f"SELECT title FROM {schema}.todos WHERE owner = 'writer'").split())
        assert len(acked) > 20 and acked <= kept, sorted(acked - kept)[:10]
        assert _sync_objects(fleet) == []
        [(maintenance,)] = fleet.catalog_sql("SELECT maintenance FROM projects WHERE hash = %s", (h,))
        assert maintenance is False
        # Writes go on through the gateway after the settle.
        token = app_token(project["projectJwtSecret"], sub="writer")
        after = fleet.gateway("POST", fleet.host(project), "/todos", token=token, json={"title": "after"})
        assert after.status_code in (200, 201), after.text
        print(f"new leader took the migration up {taken_up:.1f}s after the kill; settled "
              f"({settled['state']}) after {settled_after:.1f}s")
    finally:
        # The fleet's own controller comes back (a follower), then leads again once this one stops.
        fleet.restart()
        second.terminate()
        second.wait(30)
        wait_until(lambda: fleet.api("GET", "agents").headers.get("Flux-Controller", "").endswith("leader"), 15,
                   "the fleet's controller to lead again")


def _scrape(address: str) -> dict[tuple, float]:
    """Every sample at a /metrics address, by (name, sorted labels)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(address, timeout=10, verify=NO_TLS)
    assert response.status_code == 200, response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def _total(samples: dict, name: str, **labels) -> float:
    return sum(value for (n, found), value in samples.items()
               if n == name and all(dict(found).get(k) == v for k, v in labels.items()))


def test_the_metrics_of_the_controller_and_agents_move_with_a_migrate(fleet):
    """`flux dev up` gives every process's /metrics address; a migrate with a writer through the
    gateway moves the jobs, the migration's steps and pause, and the gateway's requests."""
    addresses = fleet.info["metrics"]
    assert set(addresses) == {"controller", "dev-db", "dev-gateway", "dev-docker", "dev-backup"}

    def settled():  # every agent on the fleet's controller (a test before may have failed it over)
        samples = {name: _scrape(address) for name, address in addresses.items()}
        return samples if (_total(samples["controller"], "flux_controller_agents_connected") == 4
                           and _total(samples["controller"], "flux_controller_leading") == 1
                           and all(_total(samples[n], "flux_agent_connected") == 1 for n in samples
                                   if n != "controller")) else None

    before = wait_until(settled, 30, "every agent connected to the leading controller, in its metrics")
    settled_at = time.monotonic()

    project = _new(fleet, "Metered Shop")
    project_id = fleet.catalog_sql("SELECT id FROM projects WHERE hash = %s", (project["summary"]["hash"],))[0][0]
    lag_seen = []
    with Writer(fleet, project) as writer:
        time.sleep(1)
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(response=fleet.migrate(project)))
        runner.start()
        while runner.is_alive():
            samples = _scrape(addresses["controller"])
            if ("flux_migration_replication_lag_bytes", (("project", str(project_id)),)) in samples:
                lag_seen.append(True)
            time.sleep(0.3)
        runner.join()
    time.sleep(2.5)  # the gateway counts its access log every second
    # Every agent sends a heartbeat each 10 s it is connected: at least one each since `before`.
    time.sleep(max(0.0, 11 - (time.monotonic() - settled_at)))
    assert outcome["response"].json()["state"] == "succeeded", outcome["response"].text
    assert writer.acked_ids
    after = {name: _scrape(address) for name, address in addresses.items()}
    grew = lambda name, metric, **labels: _total(after[name], metric, **labels) - _total(before[name], metric, **labels)  # noqa: E731
    assert grew("controller", "flux_controller_jobs_total") > 5
    assert grew("controller", "flux_controller_event_loop_lag_seconds_count") > 0
    assert grew("controller", "flux_controller_heartbeats_total") >= 4
    for name in set(addresses) - {"controller"}:
        assert grew(name, "flux_agent_event_loop_lag_seconds_count") > 0, name
    assert grew("controller", "flux_controller_job_duration_seconds_count", kind="tenant.sync_status") >= 1
    assert grew("controller", "flux_migrations_total", outcome="succeeded") == 1
    for step in ("provision", "sync", "catch_up", "lock", "drain", "flip", "unlock", "confirm"):
        assert grew("controller", "flux_migration_step_duration_seconds_count", step=step) == 1, step
    assert grew("controller", "flux_migration_write_pause_seconds_count") == 1
    assert 0 < grew("controller", "flux_migration_write_pause_seconds_sum") < 30
    assert lag_seen, "no replication lag was shown while the sync ran"
    assert ("flux_migration_replication_lag_bytes", (("project", str(project_id)),)) not in after["controller"]
    assert grew("dev-db", "flux_agent_jobs_total", outcome="succeeded") > 3
    assert grew("dev-docker", "flux_agent_jobs_total", kind="stack.provision") >= 1
    created = grew("dev-gateway", "flux_gateway_requests_total", project=str(project_id), status="201")
    assert created >= len(writer.acked_ids) > 0, (created, len(writer.acked_ids))
    assert grew("dev-gateway", "flux_gateway_request_duration_seconds_count", project=str(project_id)) >= created
