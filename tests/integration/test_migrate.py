"""flux migrate end to end: pooled to dedicated on real Postgres, Docker, Caddy and agents."""

import hashlib
import json
import os
import pathlib
import sys
import subprocess
import threading
import time

import httpx
import pytest

from tests.support import LocalFleet, app_token, run, script, wait_until

pytestmark = pytest.mark.integration

FILES = {
    "001_todos.sql": """
create table public.todos (id bigserial primary key, owner text not null default auth.uid(), title text not null,
                           done boolean not null default false);
alter table public.todos enable row level security;
create policy own_todos on public.todos for all to authenticated using (owner = auth.uid())
  with check (owner = auth.uid());
grant select, insert, update, delete on public.todos to authenticated;
grant usage on sequence public.todos_id_seq to authenticated;
""",
    "002_tags.sql": """
create table public.tags (id int generated always as identity primary key, name text unique not null);
create sequence public.invoice_numbers start 1000;
grant select on public.tags to authenticated;
insert into public.tags (name) values ('home'), ('work'), ('garden');
select nextval('invoice_numbers'); select nextval('invoice_numbers');
""",
}


# Several tests hold a lock that a migration's write guard or a tenant's drop waits on until it
# gives up (15 s and 10 s by default, each attempt of three): shorter waits make the same failures.
LOCK_WAITS = {"db": {"write_guard_lock_timeout": "3s", "drop_lock_timeout": "3s"}}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("migrate") / "dev", agent_settings=LOCK_WAITS)
    yield fleet
    fleet.close()


def _tenant(fleet, name: str, rows: int = 3) -> tuple[dict, str]:
    project = fleet.create(name)
    assert fleet.push(project, FILES).status_code == 200
    secret = project["projectJwtSecret"]
    for user in ("alice", "bob"):
        for i in range(rows):
            response = fleet.gateway("POST", fleet.host(project), "/todos", app_token(secret, sub=user),
                                     json={"title": f"{user} {i}"})
            assert response.status_code == 201, response.text
    return project, secret


def _schema(fleet, project) -> str:
    return fleet.api("GET", f"projects/{project['summary']['hash']}").json()["apiSchema"]


def _containers(project) -> list[str]:
    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=flux.hash={project['summary']['hash']}",
                          "--format", "{{.Names}}"], capture_output=True, text=True, check=True).stdout
    return sorted(out.split())


def _dedicated_sql(project, query: str) -> str:
    s = project["summary"]
    return subprocess.run(["docker", "exec", f"flux-{s['hash']}-{s['slug']}-db", "psql", "-U", "postgres", "-Atc",
                           query], capture_output=True, text=True, check=True).stdout.strip()


def _mode(fleet, project) -> str:
    return next(p for p in fleet.api("GET", "list").json() if p["hash"] == project["summary"]["hash"])["mode"]


def test_dry_run_dump_only_staged_and_full(fleet):
    project, secret = _tenant(fleet, "Bloom Atelier")
    schema = _schema(fleet, project)
    alice = app_token(secret, sub="alice")
    before = fleet.gateway("GET", fleet.host(project), "/todos?order=id", alice).json()
    assert len(before) == 3

    dry = fleet.migrate(project, dryRun=True, yes=False)
    assert dry.status_code == 200, dry.text
    plan, pre = dry.json()["plan"], dry.json()["preflight"]
    assert plan["docker_host"] == "dev-docker" and plan["kind"] == "full"
    assert {t["name"]: t["rows"] for t in pre["tables"]} == {"todos": 6, "tags": 3}
    assert all(t["bytes"] > 0 for t in pre["tables"])
    assert {s["name"] for s in pre["sequences"]} >= {"todos_id_seq", "invoice_numbers"}
    assert [m["filename"] for m in pre["ledger"]] == ["001_todos.sql", "002_tags.sql"]
    assert pre["policy_roles"] == [schema.replace("_api", "_role")]
    assert pre["tools"]["dev-db"]["pg_dump"] and pre["tools"]["dev-docker"]["docker"]
    assert pre["target_postgres_major"] == 15 and pre["estimated_seconds"] > 0 and pre["errors"] == []
    assert any("tags" in w for w in pre["warnings"])  # tags has no row-level security
    assert _containers(project) == [] and _mode(fleet, project) == "v2_shared"

    dump = fleet.migrate(project, dumpOnly=True)
    assert dump.status_code == 200, dump.text
    d = dump.json()["dump"]
    assert dump.json()["message"].startswith("Dump complete")
    with open(d["path"], "rb") as handle:
        content = handle.read()
    assert len(content) == d["bytes"] and hashlib.sha256(content).hexdigest() == d["sha256"]
    assert content.startswith(b"FLUXDUMP") and b"COPY " not in content
    sql_text = fleet.dump_sql(d["path"])
    assert b"COPY " in sql_text and b"\\restrict" not in sql_text
    assert _containers(project) == [] and _mode(fleet, project) == "v2_shared"

    staged = fleet.migrate(project, staged=True)
    assert staged.status_code == 200, staged.text
    assert staged.json()["message"] == "Staged migration complete (catalog mode unchanged; target DB populated)."
    assert _mode(fleet, project) == "v2_shared"
    assert _dedicated_sql(project, f"SELECT count(*) FROM {schema}.todos") == "6"
    # Still served by the pooled engine, writes included.
    assert fleet.gateway("POST", fleet.host(project), "/todos", alice, json={"title": "after staged"}).status_code == 201

    full = fleet.migrate(project)
    assert full.status_code == 200, full.text
    assert full.json()["message"] == "Migration complete. Project is now v1_dedicated."
    listed = next(p for p in fleet.api("GET", "list").json() if p["hash"] == project["summary"]["hash"])
    assert listed["mode"] == "v1_dedicated" and listed["apiUrl"] == project["summary"]["apiUrl"]
    assert listed["status"] == "running"
    s = project["summary"]
    running = subprocess.run(["docker", "ps", "--format", "{{.Names}}"], capture_output=True, text=True).stdout.split()
    assert f"flux-{s['hash']}-{s['slug']}-db" in running and f"flux-{s['hash']}-{s['slug']}-api" in running

    # The app's own tokens give the same answers, now from the dedicated stack.
    after = fleet.gateway("GET", fleet.host(project), "/todos?order=id", alice).json()
    assert after[:3] == before and after[3]["title"] == "after staged"
    assert fleet.gateway("GET", fleet.host(project), "/todos", app_token(secret, sub="bob")).json() != after
    assert fleet.gateway("GET", fleet.host(project), "/todos").status_code == 401
    assert _dedicated_sql(project, f"SELECT last_value FROM {schema}.invoice_numbers") == "1001"
    new_row = fleet.gateway("POST", fleet.host(project), "/todos", alice, json={"title": "on dedicated"},
                            headers={"Prefer": "return=representation"})
    assert new_row.status_code == 201 and new_row.json()[0]["id"] == 8

    # The ledger came along: push applies only new files.
    pushed = fleet.push(project, {**FILES, "003_more.sql": "create table public.more (id int);"})
    assert pushed.status_code == 200 and pushed.json()["applied"] == ["003_more.sql"]
    creds = fleet.api("GET", f"projects/{s['hash']}/credentials").json()
    assert creds["mode"] == "v1_dedicated" and creds["postgresConnectionString"].startswith("postgresql://")
    assert creds["projectJwtSecret"] == secret

    # The pooled copy is kept (no --drop-source-after) and follows the stack for the rollback window
    # (the row written on dedicated reaches it), but takes no writes of the tenant's own.
    wait_until(lambda: fleet.shared_sql(f"SELECT count(*) FROM {schema}.todos") == [(8,)], 30,
               "the pooled copy to follow the stack")
    with pytest.raises(Exception, match="permission denied"):
        fleet.shared_sql(f"SET ROLE {schema.replace('_api', '_role')}; INSERT INTO {schema}.todos (owner, title) "
                         "VALUES ('x', 'sneaky')")


def test_refusals_change_nothing(fleet):
    project, _ = _tenant(fleet, "Refusals", rows=1)
    dedicated = fleet.create("Already Dedicated", mode="v1_dedicated")
    cases = [
        (dict(project=dedicated), "moves v2_shared projects only"),
        (dict(slug="not-the-owner"), "does not own hash"),
        (dict(to="v2_shared"), "the only target is v1_dedicated"),
        (dict(yes=False), "pass --yes"),
        (dict(staged=True, newJwtSecret=True), "--staged cannot be combined with --new-jwt-secret"),
        (dict(staged=True, dropSourceAfter=True), "--drop-source-after needs a full migrate"),
    ]
    for flags, message in cases:
        target = flags.pop("project", project)
        if "slug" in flags:
            response = fleet.api("POST", "migrate", {"slug": flags.pop("slug"), "hash": target["summary"]["hash"],
                                                     "yes": True})
        else:
            response = fleet.migrate(target, **flags)
        assert response.status_code == 400, (flags, response.text)
        assert message in response.json()["error"], response.json()
    assert _containers(project) == [] and _mode(fleet, project) == "v2_shared"
    missing = fleet.api("POST", "migrate", {"slug": "x", "hash": "0000000", "yes": True})
    assert missing.status_code == 404 and missing.json()["error"] == "Project not found for this API key"

    # A second migrate while one runs is refused.
    migration_id, thread, box = _start_streaming(fleet, project, staged=True)
    assert migration_id
    second = fleet.migrate(project, staged=True)
    thread.join(300)
    assert second is not None and second.status_code == 400 and "already migrating" in second.json()["error"]
    assert box["events"][-1]["event"] == "result" and box["events"][-1]["ok"] is True


def test_writes_during_a_full_migrate_are_never_lost(fleet):
    project, secret = _tenant(fleet, "Busy Writer", rows=1)
    schema = _schema(fleet, project)
    token = app_token(secret, sub="alice")
    acked, refused = [], []
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            title = f"w{i}"
            i += 1
            try:
                response = fleet.gateway("POST", fleet.host(project), "/todos", token, json={"title": title})
            except Exception:
                continue
            (acked if 200 <= response.status_code < 300 else refused).append((title, response.status_code))

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(1)
    migrated = fleet.migrate(project)
    time.sleep(1)
    stop.set()
    thread.join(30)
    assert migrated.status_code == 200, migrated.text
    dedicated = set(_dedicated_sql(project, f"SELECT title FROM {schema}.todos").split("\n"))
    source = {t for (t,) in fleet.shared_sql(f"SELECT title FROM {schema}.todos")}
    acked_titles = {t for t, _ in acked}
    assert acked_titles and acked_titles <= dedicated, acked_titles - dedicated
    # Nothing reached the pooled copy that the dedicated one lacks: no 2xx came from the source after the dump.
    assert source <= dedicated
    assert all(code == 503 for _, code in refused), refused


def test_new_jwt_secret_rotates_on_cutover(fleet):
    project, secret = _tenant(fleet, "Rotating", rows=1)
    migrated = fleet.migrate(project, newJwtSecret=True)
    assert migrated.status_code == 200, migrated.text
    creds = fleet.api("GET", f"projects/{project['summary']['hash']}/credentials").json()
    assert creds["projectJwtSecret"] != secret
    old = fleet.gateway("GET", fleet.host(project), "/todos", app_token(secret))
    assert old.status_code == 401
    new = fleet.gateway("GET", fleet.host(project), "/todos", app_token(creds["projectJwtSecret"]))
    assert new.status_code == 200 and [r["title"] for r in new.json()] == ["alice 0"]


def test_no_lock_writes_is_honoured_and_drop_source_after_removes_the_source(fleet):
    project, _ = _tenant(fleet, "Unlocked Drop", rows=1)
    schema = _schema(fleet, project)
    dry = fleet.migrate(project, dryRun=True, yes=False, lockWrites=False, dropSourceAfter=True).json()
    assert "lock" not in dry["plan"]["steps"] and "drop_source" in dry["plan"]["steps"]
    assert any("--no-lock-writes" in w for w in dry["preflight"]["warnings"])
    cli = run(script("flux"), "migrate", "-p", project["summary"]["slug"], "--hash", project["summary"]["hash"],
              "--to", "v1_dedicated", "--yes", "--no-lock-writes", "--drop-source-after", "--skip-backup-check",
              timeout=600,
              env={"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token})
    assert "Migration complete. Project is now v1_dedicated." in cli.stdout
    assert "warning: --no-lock-writes" in cli.stderr
    assert "• dump" in cli.stderr and "• lock" not in cli.stderr
    assert fleet.shared_sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(0,)]
    assert fleet.shared_sql("SELECT count(*) FROM pg_roles WHERE rolname LIKE %s",
                            (schema.replace("_api", "") + "%",)) == [(0,)]
    # Its dump files went with it.
    dumps = fleet.fleet.dir / "agents" / "dev-db" / "spool" / "dumps" / schema
    assert dumps.parent.is_dir() and not dumps.exists()


def _wait_phase(fleet, migration_id: str, phases: tuple[str, ...], timeout: float = 60) -> None:
    def reached():
        status = fleet.api("GET", f"migrations/{migration_id}").json()
        return status.get("phase") in phases or status.get("running") is not True
    wait_until(reached, timeout, f"phase {phases}")


def _start_streaming(fleet, project, on_event=None, **flags) -> tuple[str, threading.Thread, dict]:
    """Starts a migration and returns its id while it runs; `on_event(event)` hears each event of
    its stream as it comes, on the stream's thread."""
    body = {"slug": project["summary"]["slug"], "hash": project["summary"]["hash"], "to": "v1_dedicated",
            "yes": True, "skipBackupCheck": True, **flags}
    box: dict = {}
    started = threading.Event()

    def consume():
        try:
            with httpx.stream("POST", f"{fleet.info['api_base']}/cli/v1/migrate", json=body, timeout=600,
                              headers={"Authorization": f"Bearer {fleet.token}", "Accept": "application/x-ndjson"}
                              ) as response:
                for line in response.iter_lines():
                    event = json.loads(line)
                    box.setdefault("events", []).append(event)
                    if on_event is not None:
                        on_event(event)
                    if event.get("event") == "started":
                        box["id"] = event["migrationId"]
                        started.set()
        except httpx.HTTPError as exc:
            box["error"] = str(exc)
        started.set()

    thread = threading.Thread(target=consume)
    thread.start()
    started.wait(30)
    return box.get("id"), thread, box


# Rows enough for a copy to last a second or more here: a process killed as the stream reports
# the copy's step dies inside it.
BIG_ROWS = 100_000


def _big_tenant(fleet, name: str) -> tuple[dict, str, str]:
    """A tenant of BIG_ROWS rows, and the 2 that _tenant writes."""
    project, secret = _tenant(fleet, name, rows=1)
    schema = _schema(fleet, project)
    fleet.shared_sql(f"INSERT INTO {schema}.todos (owner, title) SELECT 'load', repeat('x', 200) || g"
                     f" FROM generate_series(1, {BIG_ROWS}) g")
    return project, secret, schema


def _kill_at(fleet, key: str, phase: str, before=None):
    """An `on_event` for _start_streaming that kills `key` as the stream reports `phase` (after
    `before()`, when given), and the Event set once it did."""
    done = threading.Event()

    def on_event(event: dict) -> None:
        if event.get("event") == "phase" and event["phase"] == phase and not done.is_set():
            if before is not None:
                before()
            fleet.kill_process(key)
            done.set()

    return on_event, done


# The copy under the write lock (offline), and the copy from a slot's snapshot that the sync follows.
COPY_PHASE = {False: "copy", True: "sync"}


def _sync_left(fleet, schema: str) -> list:
    """The tenant's replication slot and publication on the shared cluster, if any is there."""
    name = f"flux_sync_{schema.removeprefix('t_').removesuffix('_api')}"
    return fleet.shared_sql("SELECT slot_name FROM pg_replication_slots WHERE slot_name = %s"
                            " UNION ALL SELECT pubname FROM pg_publication WHERE pubname = %s", (name, name))


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_controller_killed_during_restore_rolls_back(fleet, online):
    project, secret, schema = _big_tenant(fleet, f"Killed Controller {'On' if online else 'Off'}")
    kill, killed = _kill_at(fleet, "controller", COPY_PHASE[online])
    migration_id, thread, _ = _start_streaming(fleet, project, on_event=kill, online=online)
    assert migration_id
    assert killed.wait(120)
    thread.join(30)
    fleet.restart()
    wait_until(lambda: fleet.api("GET", f"migrations/{migration_id}").json().get("running") is not True, 60,
               "the migration to settle")
    status = fleet.api("GET", f"migrations/{migration_id}").json()
    assert status["ok"] is False and "controller stopped" in status["error"]
    assert status["state"] == "rolled_back" and "rollback incomplete" not in status["error"]
    assert COPY_PHASE[online] in [step["name"] for step in status["steps"]] and _sync_left(fleet, schema) == []
    detail = fleet.api("GET", f"projects/{project['summary']['hash']}").json()
    assert detail["mode"] == "v2_shared" and detail["maintenance"] is False
    # The stack this run made went with the rollback, though the controller died mid-run.
    assert _containers(project) == []
    # The pooled copy serves, writes included, and a re-run succeeds.
    write = fleet.gateway("POST", fleet.host(project), "/todos", app_token(secret), json={"title": "after crash"})
    assert write.status_code == 201
    rerun = fleet.migrate(project)
    assert rerun.status_code == 200, rerun.text
    assert _dedicated_sql(project, f"SELECT count(*) FROM {schema}.todos") == str(BIG_ROWS + 3)


def test_db_agent_killed_during_the_copy_rolls_back_and_keeps_the_source(fleet):
    project, secret, schema = _big_tenant(fleet, "Killed Agent")
    kill, killed = _kill_at(fleet, "dev-db", "copy")
    migration_id, thread, box = _start_streaming(fleet, project, on_event=kill, dropSourceAfter=True, online=False)
    assert killed.wait(120)
    fleet.restart()
    thread.join(120)
    result = box["events"][-1]
    assert result["event"] == "result" and result["ok"] is False and result["phase"] == "copy"
    # Only the project's owner (or an admin) reads a migration by its id.
    stranger = fleet.add_user(f"stranger-{migration_id[:8]}")
    assert fleet.api("GET", f"migrations/{migration_id}", token=stranger).status_code == 404
    assert fleet.api("GET", f"migrations/{migration_id}").json()["phase"] == "copy"
    detail = fleet.api("GET", f"projects/{project['summary']['hash']}").json()
    assert detail["mode"] == "v2_shared" and detail["maintenance"] is False
    assert fleet.shared_sql(f"SELECT count(*) FROM {schema}.todos") == [(BIG_ROWS + 2,)]
    write = fleet.gateway("POST", fleet.host(project), "/todos", app_token(secret), json={"title": "still pooled"})
    assert write.status_code == 201


@pytest.mark.parametrize("phase", ["sync", "bootstrap", "catch_up"])
def test_db_agent_killed_during_an_online_sync_ends_well_and_leaves_no_slot(fleet, phase):
    """Without a write guard to lose, the copy is sent again (a new slot) or the sync resumes from
    its slot (also while the stack restarts out of bulk-load mode, at bootstrap); whichever way,
    nothing acknowledged is lost and no slot stays behind."""
    project, secret, schema = _big_tenant(fleet, f"Killed In {phase}")
    writes = []

    def write():
        writes.append(fleet.gateway("POST", fleet.host(project), "/todos", app_token(secret),
                                    json={"title": "during sync"}).status_code)

    kill, killed = _kill_at(fleet, "dev-db", phase, before=write)
    migration_id, thread, box = _start_streaming(fleet, project, on_event=kill, online=True)
    assert killed.wait(120) and writes == [201]
    fleet.restart()
    thread.join(180)
    result = box["events"][-1]
    assert result["event"] == "result" and result["state"] in ("succeeded", "rolled_back"), result
    assert "rollback incomplete" not in (result.get("error") or "") and _sync_left(fleet, schema) == []
    detail = fleet.api("GET", f"projects/{project['summary']['hash']}").json()
    assert detail["maintenance"] is False
    if result["state"] == "succeeded":
        assert detail["mode"] == "v1_dedicated"
        assert _dedicated_sql(project, f"SELECT count(*) FROM {schema}.todos") == str(BIG_ROWS + 3)
    else:
        assert detail["mode"] == "v2_shared"
        assert fleet.shared_sql(f"SELECT count(*) FROM {schema}.todos") == [(BIG_ROWS + 3,)]


class _Writer:
    """Writes through the gateway as an app would, one row at a time, until stopped; a refused
    write (maintenance, 503) is sent again. Keeps the titles whose writes were acknowledged."""

    def __init__(self, fleet, project, secret: str, tag: str):
        self.fleet, self.project, self.token, self.tag = fleet, project, app_token(secret), tag
        self.acked: list[str] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while not self.stopped.is_set():
            title = f"{self.tag}-{n}"
            try:
                r = self.fleet.gateway("POST", self.fleet.host(self.project), "/todos", self.token,
                                       json={"title": title})
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 201:
                self.acked.append(title)
                n += 1
            time.sleep(0.05)

    def stop(self) -> list[str]:
        self.stopped.set()
        self.thread.join(30)
        return self.acked


def _serving_titles(fleet, project, schema: str, tag: str) -> set[str]:
    """The writer's rows on whichever copy the project now serves from."""
    query = f"SELECT title FROM {schema}.todos WHERE starts_with(title, '{tag}-')"
    if _mode(fleet, project) == "v1_dedicated":
        return set(filter(None, _dedicated_sql(project, query).splitlines()))
    return {r[0] for r in fleet.shared_sql(query)}


@pytest.mark.parametrize("killed,at", [("dev-db", "lock"), ("controller", "drain")],
                         ids=["db-agent-at-the-pause", "controller-in-the-drain"])
def test_a_process_killed_during_the_online_cutover_ends_well_with_no_write_lost(fleet, killed, at):
    """The pause of an online run lasts well under a second: the kill is sent as the stream reports
    the step, so it lands inside the cutover. Whichever way the run ends (rolled back before the
    flip, finished after it), every acknowledged write is where the project serves, nothing is
    left in maintenance and no replication slot stays on the shared cluster."""
    project, secret, schema = _big_tenant(fleet, f"Cut {killed}")
    writer = _Writer(fleet, project, secret, f"cut-{killed}")
    seen: list[str] = []
    done = threading.Event()

    def kill_at_the_step(event: dict) -> None:
        if event.get("event") == "phase":
            seen.append(event["phase"])
            if event["phase"] == at and not done.is_set():
                fleet.kill_process(killed)
                seen.append("killed")
                done.set()

    migration_id, thread, box = _start_streaming(fleet, project, on_event=kill_at_the_step, online=True)
    assert migration_id
    assert done.wait(240), (seen, box.get("events", [])[-1:])
    # Killed as the step began: no later step had been reported.
    assert seen.index("killed") == seen.index(at) + 1 and "unlock" not in seen, seen
    fleet.restart()
    thread.join(240)
    wait_until(lambda: fleet.api("GET", f"migrations/{migration_id}").json().get("running") is not True, 180,
               "the migration to settle")
    status = fleet.api("GET", f"migrations/{migration_id}").json()
    assert status["state"] in ("succeeded", "rolled_back"), status
    assert "rollback incomplete" not in (status.get("error") or "")
    wait_until(lambda: fleet.gateway("POST", fleet.host(project), "/todos", app_token(secret),
                                     json={"title": "after the cut"}).status_code == 201, 30, "writes to resume")
    acked = writer.stop()
    detail = fleet.api("GET", f"projects/{project['summary']['hash']}").json()
    assert detail["maintenance"] is False
    assert detail["mode"] == ("v1_dedicated" if status["state"] == "succeeded" else "v2_shared")
    missing = set(acked) - _serving_titles(fleet, project, schema, f"cut-{killed}")
    assert acked and not missing, sorted(missing)[:5]
    assert _sync_left(fleet, schema) == []


def test_missing_pg_dump_on_the_db_host_is_reported_by_the_dry_run_and_refused(fleet):
    from devtools.fleet import spawn, terminate

    project, _ = _tenant(fleet, "No Pg Dump", rows=1)
    agent_dir = fleet.fleet.dir / "agents" / "dev-db"
    terminate(fleet.fleet.state["pids"]["dev-db"])
    # The same agent, on a host whose PATH has no PostgreSQL client.
    pid = spawn([sys.executable, "-m", "agent.runtime.main", "run", "--state-dir", str(agent_dir)],
                fleet.fleet.dir / "logs" / "dev-db-no-pg-dump.log", {"PATH": "/nonexistent"})
    try:
        wait_until(lambda: next(a for a in fleet.api("GET", "agents").json() if a["name"] == "dev-db")["connected"],
                   30, "dev-db without pg_dump")
        dry = fleet.migrate(project, dryRun=True, yes=False)
        assert dry.status_code == 200 and dry.json()["ok"] is False
        errors = dry.json()["preflight"]["errors"]
        assert any("pg_dump not found on db agent dev-db (host" in e for e in errors), errors
        refused = fleet.migrate(project)
        assert refused.status_code == 400
        assert refused.json()["phase"] == "preflight" and "pg_dump not found" in refused.json()["error"]
        assert _containers(project) == [] and _mode(fleet, project) == "v2_shared"
    finally:
        terminate(pid)
        fleet.restart()


def test_large_objects_are_reported_by_the_dry_run_and_refused(fleet):
    project, _ = _tenant(fleet, "Large Objects", rows=1)
    pushed = fleet.push(project, {"003_blobs.sql": "select lo_from_bytea(0, 'one'::bytea);"
                                                   " select lo_from_bytea(0, 'two'::bytea);"})
    assert pushed.status_code == 200, pushed.text
    short = _schema(fleet, project).removeprefix("t_").removesuffix("_api")
    dry = fleet.migrate(project, dryRun=True, yes=False)
    assert dry.status_code == 200 and dry.json()["ok"] is False
    assert dry.json()["preflight"]["large_objects"]["count"] == 2
    errors = dry.json()["preflight"]["errors"]
    assert any(e.startswith(f"2 large objects owned by t_{short}_ddl") for e in errors), errors
    refused = fleet.migrate(project)
    assert refused.status_code == 400
    assert refused.json()["phase"] == "preflight" and "2 large objects" in refused.json()["error"]
    assert _containers(project) == [] and _mode(fleet, project) == "v2_shared"
    # Once they are gone, nothing stands in the way.
    fleet.shared_sql("SELECT lo_unlink(m.oid) FROM pg_largeobject_metadata m"
                     " WHERE m.lomowner = %s::regrole", (f"t_{short}_ddl",))
    again = fleet.migrate(project, dryRun=True, yes=False).json()
    assert again["preflight"]["large_objects"]["count"] == 0
    assert not any("large object" in e for e in again["preflight"]["errors"])


def _api_secret(project) -> str:
    s = project["summary"]
    env = subprocess.run(["docker", "inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}",
                          f"flux-{s['hash']}-{s['slug']}-api"], capture_output=True, text=True, check=True).stdout
    return next(line.split("=", 1)[1] for line in env.splitlines() if line.startswith("PGRST_JWT_SECRET="))


def test_staged_then_a_rotating_cutover_works(fleet):
    """The product page's order: --staged, then the full migrate with --new-jwt-secret."""
    project, secret = _tenant(fleet, "Staged Then Rotated", rows=1)
    staged = fleet.migrate(project, staged=True)
    assert staged.status_code == 200, staged.text
    assert _api_secret(project) == secret
    rotated = fleet.migrate(project, newJwtSecret=True)
    assert rotated.status_code == 200, rotated.text
    creds = fleet.api("GET", f"projects/{project['summary']['hash']}/credentials").json()
    assert creds["projectJwtSecret"] != secret and _api_secret(project) == creds["projectJwtSecret"]
    assert fleet.gateway("GET", fleet.host(project), "/todos", app_token(secret)).status_code == 401
    new = fleet.gateway("GET", fleet.host(project), "/todos?select=title", app_token(creds["projectJwtSecret"]))
    assert new.status_code == 200 and new.json() == [{"title": "alice 0"}]


def test_a_rotating_run_that_fails_leaves_the_old_secret_in_force_everywhere(fleet):
    import psycopg

    project, secret = _tenant(fleet, "Rotation Rolled Back", rows=1)
    assert fleet.migrate(project, staged=True).status_code == 200
    schema = _schema(fleet, project)
    # A session holding a lock on a tenant table makes the write guard give up: the run fails after provision.
    with psycopg.connect(fleet.fleet.cluster("shared").url("flux_shared")) as blocker:
        blocker.execute(f"LOCK TABLE {schema}.todos IN ROW EXCLUSIVE MODE")  # as an open INSERT does
        failed = fleet.migrate(project, newJwtSecret=True)
    assert failed.status_code == 400 and failed.json()["state"] == "rolled_back", failed.text
    assert failed.json()["phase"] == "lock"
    creds = fleet.api("GET", f"projects/{project['summary']['hash']}/credentials").json()
    assert creds["projectJwtSecret"] == secret and _api_secret(project) == secret
    assert _mode(fleet, project) == "v2_shared"
    assert fleet.gateway("GET", fleet.host(project), "/todos", app_token(secret)).status_code == 200


def test_a_failure_after_cutover_is_not_a_rollback_and_resume_finishes_it(fleet):
    import psycopg

    project, secret = _tenant(fleet, "Fails After Cutover", rows=1)
    schema = _schema(fleet, project)
    short = schema.removeprefix("t_").removesuffix("_api")
    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token}
    s = project["summary"]
    # A session reading a tenant table holds a lock the source drop needs: the drop fails after the flip.
    with psycopg.connect(fleet.fleet.cluster("shared").url("flux_shared")) as reader:
        reader.execute(f"SELECT count(*) FROM {schema}.todos")
        out = run(script("flux"), "migrate", "-p", s["slug"], "--hash", s["hash"], "--to", "v1_dedicated", "--yes",
                  "--skip-backup-check",
                  "--drop-source-after", check=False, env=env, timeout=300)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "failed after cutover in phase drop_source" in out.stderr and "rolled back" not in out.stderr
        migration_id = out.stderr.split("flux migrate resume ")[1].split()[0].rstrip(".")
        status = fleet.api("GET", f"migrations/{migration_id}").json()
        assert status["state"] == "failed_after_cutover" and status["ok"] is False
        assert "left to do: drop_source" in status["error"]
        shown = run(script("flux"), "migrate", "status", "-p", s["slug"], "--hash", s["hash"], env=env).stdout
        assert "failed_after_cutover" in shown and "drop_source  FAILED" in shown and "flip         done" in shown
        # Cutover stands: the dedicated stack serves, the pooled copy takes no writes and is not locked.
        assert _mode(fleet, project) == "v1_dedicated"
        detail = fleet.api("GET", f"projects/{s['hash']}").json()
        assert detail["maintenance"] is False
        write = fleet.gateway("POST", fleet.host(project), "/todos", app_token(secret), json={"title": "after"})
        assert write.status_code == 201, write.text
        assert _dedicated_sql(project, f"SELECT count(*) FROM {schema}.todos") == "3"
        reader.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            reader.execute(f"SET ROLE t_{short}_role; INSERT INTO {schema}.todos (owner, title) VALUES ('x', 'y')")
        reader.rollback()
        reader.execute(f"SELECT count(*) FROM {schema}.todos")
        # Resuming while the lock is still held fails the same way, and stays resumable.
        again = run(script("flux"), "migrate", "resume", migration_id, check=False, env=env, timeout=300)
        assert again.returncode == 1 and "failed after cutover" in again.stderr
    resumed = run(script("flux"), "migrate", "resume", migration_id, env=env, timeout=300)
    assert "Migration complete" in resumed.stdout
    assert fleet.api("GET", f"migrations/{migration_id}").json()["state"] == "succeeded"
    assert fleet.shared_sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(0,)]
    # A finished migration cannot be resumed again.
    refused = fleet.api("POST", f"migrations/{migration_id}/resume")
    assert refused.status_code == 400 and "only a migration that failed after cutover" in refused.json()["error"]


def test_status_shows_the_plan_and_follow_reattaches_to_a_running_migration(fleet):
    project, secret, schema = _big_tenant(fleet, "Reattached")
    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token}
    dry = fleet.migrate(project, dryRun=True).json()
    migration_id, thread, box = _start_streaming(fleet, project)
    assert migration_id
    _wait_phase(fleet, migration_id, ("sync",))
    # A second client attaches to the running migration, as one would after its connection dropped.
    follow = subprocess.run([script("flux"), "migrate", "status", migration_id, "--follow", "--json"],
                            capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert follow.returncode == 0, follow.stderr
    events = [json.loads(line) for line in follow.stdout.splitlines()]
    assert events[0]["event"] == "status" and events[0]["running"] is True
    assert any(e.get("event") == "phase" for e in events[1:])
    assert events[-1]["ok"] is True and events[-1]["state"] == "succeeded"
    thread.join(60)
    status = json.loads(run(script("flux"), "migrate", "status", "-p", project["summary"]["slug"], "--hash",
                            project["summary"]["hash"], "--json", env=env).stdout)
    # The dry run's plan is the list of steps the run recorded, all done.
    assert [step["name"] for step in status["steps"]] == dry["plan"]["steps"]
    assert {step["status"] for step in status["steps"]} == {"done"}


def test_every_token_the_pooled_project_accepted_keeps_its_rights_after_cutover(fleet):
    project, secret = _tenant(fleet, "Same Tokens", rows=1)
    tokens = {claims: app_token(secret, sub="alice", **dict(claims)) for claims in
              ((), (("role", "authenticated"),), (("role", "anon"),), (("role", "service_role"),))}

    def answers():
        return {claims: (r.status_code, sorted(t["title"] for t in r.json()) if r.status_code == 200 else None)
                for claims, token in tokens.items()
                for r in [fleet.gateway("GET", fleet.host(project), "/todos?select=title", token)]}

    before = answers()
    assert all(status == 200 and titles == ["alice 0"] for status, titles in before.values()), before
    assert fleet.migrate(project).status_code == 200
    assert answers() == before


def test_the_kept_pooled_copy_is_read_only_for_every_tenant_role_shown_and_dropped_by_cleanup(fleet):
    import psycopg

    project, secret = _tenant(fleet, "Kept Copy", rows=1)
    s = project["summary"]
    schema = _schema(fleet, project)
    short = schema.removeprefix("t_").removesuffix("_api")
    migrated = fleet.migrate(project)
    assert migrated.status_code == 200, migrated.text
    dump = pathlib.Path(migrated.json()["dump"]["path"])
    assert dump.exists() and dump.parent.name == schema and (dump.parent.stat().st_mode & 0o077) == 0
    with psycopg.connect(fleet.fleet.cluster("shared").url("flux_shared")) as conn:
        for role in (f"t_{short}_role", f"t_{short}_ddl"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"SET ROLE {role}; INSERT INTO {schema}.todos (owner, title) VALUES ('x', 'y')")
            conn.rollback()
        assert conn.execute("SELECT rolcanlogin FROM pg_roles WHERE rolname = %s",
                            (f"t_{short}_ddl",)).fetchone() == (False,)
        assert conn.execute(f"SELECT count(*) FROM {schema}.todos").fetchone() == (2,)
    listed = next(p for p in fleet.api("GET", "list").json() if p["hash"] == s["hash"])
    assert listed["mode"] == "v1_dedicated" and listed["pooledCopy"]["readOnly"] is True
    assert listed["pooledCopy"]["bytes"] > 0
    assert fleet.api("GET", f"projects/{s['hash']}").json()["pooledCopy"]["schema"] == schema
    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token}
    assert "keeps its pooled copy, read-only" in run(script("flux"), "list", env=env).stdout

    refused = run(script("flux"), "migrate", "cleanup", "-p", s["slug"], "--hash", s["hash"], check=False, env=env)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert fleet.shared_sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(1,)]
    cleaned = run(script("flux"), "migrate", "cleanup", "-p", s["slug"], "--hash", s["hash"], "--yes", env=env)
    assert f"Dropped the pooled copy of {s['slug']}" in cleaned.stdout
    assert fleet.shared_sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(0,)]
    assert not dump.exists() and not dump.parent.exists()
    # The catalog saw it go: removed with the tenant, not found missing later.
    assert fleet.catalog_sql("SELECT removed_why, missing FROM dump_files WHERE path = %s",
                             (str(dump),)) == [("tenant_dropped", False)]
    assert "pooledCopy" not in next(p for p in fleet.api("GET", "list").json() if p["hash"] == s["hash"])
    # The dedicated project serves on, untouched.
    assert fleet.gateway("GET", fleet.host(project), "/todos", app_token(secret)).status_code == 200
    again = fleet.api("DELETE", f"projects/{s['hash']}/pooled-copy", params={"slug": s["slug"]})
    assert again.status_code == 400 and "no kept pooled copy" in again.json()["error"]


def test_a_staged_stack_can_be_inspected_and_discarded(fleet):
    project, secret = _tenant(fleet, "Staged Discard", rows=1)
    s = project["summary"]
    schema = _schema(fleet, project)
    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token}
    assert fleet.migrate(project, staged=True).status_code == 200
    creds = fleet.api("GET", f"projects/{s['hash']}/credentials").json()
    assert creds["mode"] == "v2_shared"
    import psycopg
    with psycopg.connect(creds["stagedStack"]["postgresConnectionString"]) as conn:
        assert conn.execute(f"SELECT count(*) FROM {schema}.todos").fetchone() == (2,)
    shown = run(script("flux"), "project", "credentials", "-p", s["slug"], "--hash", s["hash"], env=env).stdout
    assert "STAGED_DATABASE_URL=postgresql://" in shown

    refused = run(script("flux"), "migrate", "discard", "-p", s["slug"], "--hash", s["hash"], check=False, env=env)
    assert refused.returncode == 2 and "--yes" in refused.stderr and len(_containers(project)) == 2
    discarded = run(script("flux"), "migrate", "discard", "-p", s["slug"], "--hash", s["hash"], "--yes", env=env)
    assert "Discarded the staged stack" in discarded.stdout
    assert _containers(project) == []
    assert "stagedStack" not in fleet.api("GET", f"projects/{s['hash']}/credentials").json()
    # The pooled project serves on, and a later migrate starts from nothing and succeeds.
    assert fleet.gateway("GET", fleet.host(project), "/todos", app_token(secret)).status_code == 200
    again = fleet.api("DELETE", f"projects/{s['hash']}/staged-stack", params={"slug": s["slug"]})
    assert again.status_code == 400 and "no staged stack" in again.json()["error"]
    migrated = fleet.migrate(project)
    assert migrated.status_code == 200, migrated.text
    assert _dedicated_sql(project, f"SELECT count(*) FROM {schema}.todos") == "2"


def test_a_failed_migrate_removes_the_stack_it_made(fleet):
    import psycopg

    project, secret = _tenant(fleet, "Failed Leaves Nothing", rows=1)
    schema = _schema(fleet, project)
    with psycopg.connect(fleet.fleet.cluster("shared").url("flux_shared")) as blocker:
        blocker.execute(f"LOCK TABLE {schema}.todos IN ROW EXCLUSIVE MODE")  # as an open INSERT does
        failed = fleet.migrate(project)
    assert failed.status_code == 400 and failed.json()["state"] == "rolled_back", failed.text
    assert failed.json()["phase"] == "lock" and "rollback incomplete" not in failed.json()["error"]
    assert _containers(project) == []
    assert "stagedStack" not in fleet.api("GET", f"projects/{project['summary']['hash']}/credentials").json()
    assert fleet.gateway("POST", fleet.host(project), "/todos", app_token(secret), json={"title": "x"}).status_code == 201


def test_a_controller_killed_while_finishing_after_cutover_finishes_forward_when_back(fleet):
    import psycopg

    project, secret = _tenant(fleet, "Killed After Cutover", rows=1)
    schema = _schema(fleet, project)
    with psycopg.connect(fleet.fleet.cluster("shared").url("flux_shared")) as reader:
        reader.execute(f"SELECT count(*) FROM {schema}.todos")  # holds a lock the source drop needs
        failed = fleet.migrate(project, dropSourceAfter=True)
        assert failed.json()["state"] == "failed_after_cutover", failed.text
        migration_id = failed.json()["migrationId"]
        # Resume runs the drop, which waits on the lock; the controller dies meanwhile.
        def resume_until_killed():
            try:
                fleet.api("POST", f"migrations/{migration_id}/resume")
            except httpx.HTTPError:
                pass  # the controller dies under it

        resume = threading.Thread(target=resume_until_killed)
        resume.start()
        wait_until(lambda: fleet.api("GET", f"migrations/{migration_id}").json().get("running") is True
                   and fleet.api("GET", f"migrations/{migration_id}").json().get("phase") == "drop_source",
                   30, "the resumed migration to be dropping the source")
        fleet.kill_process("controller")
        resume.join(30)
        reader.rollback()
    fleet.restart()
    wait_until(lambda: fleet.api("GET", f"migrations/{migration_id}").json().get("state") == "succeeded", 60,
               "the restarted controller to finish the migration forward")
    assert _mode(fleet, project) == "v1_dedicated"
    assert fleet.shared_sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(0,)]
    assert fleet.gateway("GET", fleet.host(project), "/todos", app_token(secret)).status_code == 200
