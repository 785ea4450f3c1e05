"""The migration runner at every step: a failure there, and a controller stop there followed by
recovery, each ending in the right state.

The runner runs in process against a real catalog; the agents are a model of what their hosts
hold (the pooled copy and its write guard, the dedicated stack, the gateway's routes), driven by
the same jobs the real agents take. After every job the model checks that at most one copy takes
writes. The real-fleet kill tests are in test_migrate.py.
"""

import asyncio
import datetime
import json
import secrets
from dataclasses import dataclass, field

import psycopg
import pytest

from contract.jobs import job_kind
from controller import store as catalog_module
from controller.store import Catalog
from controller.fleet import AgentFailed
from controller.gateways import Gateways
from controller.migrate import Migrations, Options
from controller.projects import DEDICATED, POOLED, Projects
from controller.secretbox import SecretBox, new_master_key

STACK_UPSTREAM = "127.0.0.1:18080"


class ControllerStopped(BaseException):
    """The controller process ends here: nothing after this point runs."""


@dataclass
class Hosts:
    """What the agents' hosts hold for one project."""

    pooled: bool = False  # the tenant schema exists on the shared cluster
    pooled_rows: int = 0
    guard: bool = False  # the write guard holds the pooled copy's writes
    frozen: bool = False  # the pooled copy refuses writes from every tenant role
    stack: dict | None = None  # {"secret": ..., "rows": ...}
    routes: dict = field(default_factory=dict)  # what the gateway serves, by project id
    sync_slot: bool = False  # an online sync's slot on the shared cluster
    back_slot: bool = False  # the slot on the stack that carries its changes back to the pooled copy
    syncing: bool = False  # the db agent applies the slot to the stack

    def pooled_takes_writes(self) -> bool:
        return self.pooled and not self.guard and not self.frozen

    def dedicated_takes_writes(self, project_id: str) -> bool:
        route = self.routes.get(project_id)
        return (self.stack is not None and route is not None and route["upstream"] == STACK_UPSTREAM
                and not route["maintenance"])


class Agents:
    """The agent-jobs interface the controller uses (`run`, `connected`), over `Hosts`.

    `fault = (step, kind, how)` makes the first `kind` job during `step` fail (`how="fail"`,
    nothing done) or take effect and then stop the controller (`how="stop"`): the migration's
    task is cancelled, so nothing of it runs past its next await.
    """

    def __init__(self, hosts: Hosts):
        self.hosts = hosts
        self.step: str | None = None
        self.fault: tuple[str, str, str] | None = None
        self.seen: list[tuple[str | None, str]] = []
        self.migration_task: asyncio.Task | None = None
        self.dumps: list[str] = []
        self.lease_granter = None
        self.hello_listeners: list = []
        self.report_listeners: list = []

    def connected(self, name: str) -> bool:
        return True

    def leading(self) -> bool:
        return True

    async def wait_connected(self, names: list[str], timeout: float) -> bool:
        return True

    def watch(self, project_id, event: dict) -> None:
        if event.get("event") == "phase":
            self.step = event["phase"]

    async def run(self, agent: str, kind: str, params: dict, timeout: float = 60, on_progress=None) -> dict:
        self.seen.append((self.step, kind))
        contract = job_kind(kind)
        contract.parse_params(params)  # the runner sends what the real agents take
        how = None
        if self.fault and self.fault[:2] == (self.step, kind):
            how, self.fault = self.fault[2], None
        if how == "fail":
            raise AgentFailed(f"injected failure of {kind} during {self.step} (agent {agent})")
        out = contract.parse_result(getattr(self, kind.replace(".", "_"))(params)).to_wire()
        self.check_one_writable_copy(params)
        if how == "stop":
            self.migration_task.cancel()
            raise ControllerStopped(f"{kind} during {self.step}")
        await asyncio.sleep(0)
        return out

    def check_one_writable_copy(self, params: dict) -> None:
        for project_id in self.hosts.routes:
            assert not (self.hosts.pooled_takes_writes() and self.hosts.dedicated_takes_writes(project_id)), \
                f"two writable copies after a job during {self.step}"

    # the jobs

    def tenant_create(self, p):
        self.hosts.pooled, self.hosts.pooled_rows = True, 42
        short = p["short_id"]
        return {"schema": f"t_{short}_api", "runtime_role": f"t_{short}_role", "owner_role": f"t_{short}_ddl",
                "steps": {}}

    def tenant_preflight(self, p):
        return {"schema": f"t_{p['short_id']}_api", "tools": {"pg_dump": "15.8", "psql": "15.8"},
                "total_bytes": 8192, "spool_free_bytes": 1 << 30, "views": [], "sequences": [], "extensions": [],
                "ledger": [], "policy_roles": [], "roles": [],
                "tables": [{"name": "orders", "rows": self.hosts.pooled_rows, "bytes": 8192, "rls": True}],
                "large_objects": {"count": 0, "owners": []},
                "logical": {"wal_level": "logical", "max_slots": 10, "free_slots": 10, "max_senders": 10,
                            "free_senders": 10, "max_slot_wal_keep_mb": 4096, "tables_without_key": []}}

    def stack_provision(self, p):
        self.hosts.stack = {"secret": p["jwt_secret"], "rows": (self.hosts.stack or {}).get("rows")}
        return {"steps": {}, "changed": True, "api_upstream": STACK_UPSTREAM, "api_port": 18080,
                "db_host": "127.0.0.1", "db_port": 15432}

    def stack_image_info(self, p):
        return {"postgres_major": 15, "postgres_image": "pg", "postgrest_image": "pgrst"}

    def stack_remove(self, p):
        self.hosts.stack = None
        return {"removed": ["stack"]}

    def tenant_lock(self, p):
        self.hosts.guard = True
        return {"locked": True, "changed": True, "tables": 1}

    def tenant_dump(self, p):
        if p.get("require_guard") and not self.hosts.guard:
            raise AssertionError("dump without the guard")
        if p.get("target_url"):
            assert p["target_major"] == 15
            self.require_stack()["rows"] = self.hosts.pooled_rows
        if self.step == "keep":
            # After the cutover, from the pooled copy as it was frozen: what the stack started from.
            assert self.hosts.pooled and not self.hosts.pooled_takes_writes(), "keep from a copy that takes writes"
            assert p["frozen_copy"]
        self.dumps.append(p["name"])
        if p.get("sync"):
            assert not p.get("require_guard")
            self.hosts.sync_slot = self.hosts.syncing = True
        return {**({"sync_lsn": "0/16B3748"} if p.get("sync") else {}), "path": f"/spool/dumps/{p['name']}.sql.enc", "bytes": 1040, "sha256": "ab" * 32, "sql_bytes": 1000,
                "sql_sha256": "cd" * 32, "seconds": 0.1, "tables": 1, "restored": True, "ledger_rows": 0}

    def tenant_copy(self, p):
        if p.get("require_guard") and not self.hosts.guard:
            raise AssertionError("copy without the guard")
        self.require_stack()["rows"] = self.hosts.pooled_rows
        return {"tables": 1, "rows": self.hosts.pooled_rows, "bytes": 1000, "ledger_rows": 0, "seconds": 0.1,
                "phases": {"total": 0.1}}

    def tenant_sync_status(self, p):
        if p.get("direction") == "back":
            return {"slot": self.hosts.back_slot, "running": self.hosts.back_slot, "lag_bytes": 0, "lag_s": 0.0}
        if self.hosts.sync_slot and not self.hosts.syncing:
            self.hosts.syncing = True  # resumed from the slot
        return {"slot": self.hosts.sync_slot, "running": self.hosts.syncing, "lag_bytes": 120, "lag_s": 0.0,
                "transactions": 3}

    def tenant_sync_check(self, p):
        if p.get("direction") == "back":
            assert self.hosts.back_slot and self.hosts.pooled, "a check after the cutover with no way back"
            return {"lsn": "0/16B3A00", "tables": {"orders": self.hosts.pooled_rows}, "seconds": 0.01,
                    "problems": []}
        assert self.hosts.syncing, "a checkpoint without a running sync"
        return {"lsn": "0/16B3800", "tables": {"orders": self.hosts.pooled_rows}, "seconds": 0.01}

    def tenant_sync_drain(self, p):
        assert self.hosts.guard and self.hosts.syncing, "a drain without the guard or the sync"
        self.require_stack()["rows"] = self.hosts.pooled_rows
        self.hosts.syncing = False
        if p.get("reverse"):
            self.hosts.back_slot = True
        return {"lsn": "0/16B3900", "applied_lsn": "0/16B38F0", "waited_s": 0.02, "sequences": 0,
                "reverse": p.get("reverse") or None}

    def tenant_sync_stop(self, p):
        if p.get("direction") == "back":
            self.hosts.back_slot = False
        else:
            self.hosts.sync_slot = self.hosts.syncing = False
        return {"slot_dropped": True, "publication_dropped": True}

    def tenant_dump_remove(self, p):
        return {"removed": p["paths"], "missing": []}

    def stack_bootstrap(self, p):
        self.require_stack()
        return {"role bootstrap": "ok"}

    def tenant_verify(self, p):
        assert self.require_stack()["rows"] == self.hosts.pooled_rows
        return {"tables": {"orders": self.hosts.pooled_rows}, "sequences": 0, "ledger_rows": 0, "ok": True}

    def stack_probe(self, p):
        assert self.require_stack()["secret"] == p["jwt_secret"], "probe with a secret the stack does not hold"
        return {"status": 200}

    def tenant_unlock(self, p):
        self.hosts.guard = False
        if p["revoke_writes"]:
            self.hosts.frozen = True
        return {"locked": False, "held": True, "source_read_only": p["revoke_writes"],
                **({"frozen": True, "bytes": 8192} if p["revoke_writes"] else {})}

    def tenant_drop(self, p):
        self.hosts.pooled = False
        return {"schema_dropped": True, "roles_dropped": [], "dumps_removed": 0}

    def gateway_sync(self, p):
        if p["base_version"] is None and p["part"] == 0:
            self.hosts.routes = {}
        for route in p["upsert"]:
            self.hosts.routes[route["project_id"]] = route
        for project_id in p["remove"]:
            self.hosts.routes.pop(project_id, None)
        return {"version": p["version"]}

    def require_stack(self) -> dict:
        assert self.hosts.stack is not None, f"no stack during {self.step}"
        return self.hosts.stack


class Controller:
    """The controller's services over one catalog and the model agents; a new one is a restart."""

    def __init__(self, url: str, box: SecretBox, agents: Agents):
        self.catalog = Catalog(url, max_size=4)
        self.agents = agents
        self.gateways = Gateways(self.catalog, agents, box, "flux.test")
        self.projects = Projects(self.catalog, agents, box, self.gateways)
        self.migrations = Migrations(self.catalog, agents, self.projects, self.gateways)
        self.migrations.watchers.append(agents.watch)


async def _catalog(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await catalog_module.migrate(conn)


async def _enrolled(catalog: Catalog) -> object:
    user = await catalog.create_user("owner", secrets.token_hex(16))
    expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    for name, role in (("db-1", "db"), ("docker-1", "docker"), ("gw-1", "gateway")):
        token = secrets.token_hex(16)
        await catalog.create_join_token(token, [role], expires, user.id)
        await catalog.enroll(token, name, [role], lambda: (secrets.randbits(64), expires))
        await catalog.agents_seen({name: json.dumps({"hostname": f"{name}.test"})})
    return user


async def _scenario(url: str, options: Options, fault: tuple[str, str, str] | None, staged_first: bool = False):
    """Migrates a fresh pooled project with `fault` injected; returns what the model and catalog hold."""
    await _catalog(url)
    hosts, box = Hosts(), SecretBox(new_master_key())
    agents = Agents(hosts)
    ctl = Controller(url, box, agents)
    await ctl.catalog.open()
    try:
        user = await _enrolled(ctl.catalog)
        project, _ = await ctl.projects.create(user, "shop")
        if staged_first:
            row = await ctl.migrations.start(project, STAGED)
            assert (await ctl.migrations.wait(row.id))["state"] == "succeeded"
        old_secret = ctl.projects.jwt_secret(await ctl.catalog.project(project.id))
        agents.fault = fault
        row = await ctl.migrations.start(await ctl.catalog.project(project.id), options)
        agents.migration_task = ctl.migrations._tasks[row.id]
        try:
            final = await ctl.migrations.wait(row.id)
        except (ControllerStopped, asyncio.CancelledError):
            final = None
    finally:
        await ctl.catalog.close()
    assert agents.fault is None, f"the fault {fault} never fired: the step or job is not where the plan says"
    if final is None:
        # A new controller over the same catalog and hosts settles what the stopped one left.
        ctl = Controller(url, box, agents)
        await ctl.catalog.open()
        await ctl.migrations.recover()
    else:
        ctl = Controller(url, box, agents)
        await ctl.catalog.open()
    try:
        migration = await ctl.catalog.migration(row.id)
        status = await ctl.migrations.wait_status(row.id, None)
        resumed = None
        if migration.state == "failed_after_cutover":
            before = _state(hosts, await ctl.catalog.project(project.id), migration)
            await ctl.migrations.resume(row.id, None)
            resumed = await ctl.migrations.wait(row.id)
            migration = await ctl.catalog.migration(row.id)
        else:
            before = None
        current = await ctl.catalog.project(project.id)
        files = await ctl.catalog.dump_files_of(project.id, removed_too=True)
        return {"dump_files": [(f.path, f.removed_why) for f in files], "final": final, "status": status,
                "after_cutover": before, "resumed": resumed,
                "end": _state(hosts, current, migration), "old_secret": old_secret,
                "secret": ctl.projects.jwt_secret(current), "hosts": hosts, "seen": agents.seen,
                "hosts_dumps": agents.dumps}
    finally:
        await ctl.catalog.close()


def _state(hosts: Hosts, project, migration) -> dict:
    route = hosts.routes.get(project.id) or {}
    return {"migration": migration.state, "mode": project.mode, "route": route.get("upstream"),
            "maintenance": (project.maintenance, route.get("maintenance")), "guard": hosts.guard,
            "pooled_takes_writes": hosts.pooled_takes_writes(), "pooled": hosts.pooled,
            "dedicated_takes_writes": hosts.dedicated_takes_writes(project.id),
            "stack": hosts.stack is not None, "docker_agent": project.docker_agent,
            "kept_copy": project.kept_copy_bytes, "slots": (hosts.sync_slot, hosts.back_slot)}


# The copy under the write lock (offline): the fallback without logical replication.
FULL = Options(yes=True, new_jwt_secret=True, drop_source_after=True, online=False)
STAGED = Options(yes=True, staged=True, online=False)
# Every job of every step, in the order a full rotating migration with --drop-source-after runs them.
FULL_JOBS = [("preflight", "tenant.preflight"), ("provision", "stack.provision"), ("provision", "stack.image_info"),
             ("lock", "gateway.sync"), ("lock", "tenant.lock"), ("copy", "tenant.copy"),
             ("bootstrap", "stack.bootstrap"), ("verify", "tenant.verify"), ("probe", "stack.probe"),
             ("flip", "gateway.sync"), ("unlock", "tenant.unlock"), ("unlock", "gateway.sync"),
             ("keep", "tenant.dump"), ("drop_source", "tenant.dump_remove"), ("drop_source", "tenant.drop")]
# A staged run keeps the pooled copy writable after it, so its dump file is written under the lock.
STAGED_JOBS = FULL_JOBS[:5] + [("dump", "tenant.dump")] + FULL_JOBS[6:9] + [("unlock", "tenant.unlock"),
                                                                          ("unlock", "gateway.sync")]
AFTER_CUTOVER = {"unlock", "keep", "drop_source"}

ROLLED_BACK = {"migration": "rolled_back", "mode": POOLED, "route": "pool", "maintenance": (False, False),
               "guard": False, "pooled_takes_writes": True, "pooled": True, "dedicated_takes_writes": False,
               "stack": False, "docker_agent": None, "kept_copy": None, "slots": (False, False)}
MIGRATED = {"migration": "succeeded", "mode": DEDICATED, "route": STACK_UPSTREAM, "maintenance": (False, False),
            "guard": False, "pooled_takes_writes": False, "pooled": False, "dedicated_takes_writes": True,
            "stack": True, "docker_agent": "docker-1", "kept_copy": None, "slots": (False, False)}


def test_the_matrix_covers_every_job_of_every_step(catalog_url):
    """The runs the matrix faults call exactly these jobs, so no step escapes it."""
    done = asyncio.run(_scenario(catalog_url, FULL, None))
    assert done["end"] == MIGRATED and done["final"]["state"] == "succeeded"
    migrating = [s for s in done["seen"] if s[0] in {step for step, _ in FULL_JOBS}]
    assert migrating == FULL_JOBS, migrating
    assert [s["status"] for s in done["status"]["steps"]] == ["done"] * 11
    assert done["secret"] != done["old_secret"] and done["hosts"].stack["secret"] == done["secret"]
    # The dump file is in the catalog, and went (named) before the pooled copy was dropped.
    assert done["dump_files"] == [(f"/spool/dumps/{done['hosts_dumps'][0]}.sql.enc", "tenant_dropped")]


@pytest.mark.parametrize("step,kind", FULL_JOBS, ids=[f"{s}-{k}" for s, k in FULL_JOBS])
def test_a_failure_at_each_step_of_a_full_migration(catalog_url, step, kind):
    out = asyncio.run(_scenario(catalog_url, FULL, (step, kind, "fail")))
    if step in AFTER_CUTOVER:
        # Forward only: dedicated serves, the pooled copy takes no writes, and resume finishes.
        assert out["final"]["state"] == "failed_after_cutover", out["final"]
        assert f"flux migrate resume {out['final']['migrationId']}" in out["final"]["error"]
        cut = out["after_cutover"]
        assert cut["mode"] == DEDICATED and cut["route"] == STACK_UPSTREAM and cut["stack"]
        assert not cut["pooled_takes_writes"]
        assert out["resumed"]["state"] == "succeeded", out["resumed"]
        assert out["end"] == MIGRATED
        assert out["secret"] != out["old_secret"]
    else:
        assert out["final"]["state"] == "rolled_back", out["final"]
        assert "rollback incomplete" not in out["final"]["error"], out["final"]
        assert out["final"]["phase"] == step
        assert out["end"] == ROLLED_BACK
        assert out["secret"] == out["old_secret"]
        statuses = {s["name"]: s["status"] for s in out["status"]["steps"]}
        assert statuses[step] == ("undone" if step in ("provision", "lock") else "failed"), statuses


@pytest.mark.parametrize("step,kind", FULL_JOBS, ids=[f"{s}-{k}" for s, k in FULL_JOBS])
def test_a_controller_stop_at_each_step_of_a_full_migration(catalog_url, step, kind):
    out = asyncio.run(_scenario(catalog_url, FULL, (step, kind, "stop")))
    assert out["final"] is None
    if step in AFTER_CUTOVER or step == "flip":
        # The flip had committed: the restarted controller finishes forward.
        assert out["end"] == MIGRATED, out["status"]
        assert out["secret"] != out["old_secret"] and out["hosts"].stack["secret"] == out["secret"]
    else:
        assert out["end"] == ROLLED_BACK, out["status"]
        assert "controller stopped" in out["status"]["error"]
        assert out["secret"] == out["old_secret"]


@pytest.mark.parametrize("how", ["fail", "stop"])
@pytest.mark.parametrize("step,kind", STAGED_JOBS, ids=[f"{s}-{k}" for s, k in STAGED_JOBS])
def test_a_staged_migration_fails_or_stops_at_each_step_and_leaves_nothing(catalog_url, step, kind, how):
    out = asyncio.run(_scenario(catalog_url, STAGED, (step, kind, how)))
    assert out["end"] == ROLLED_BACK, (out["final"], out["status"])


@pytest.mark.parametrize("step,kind", [("provision", "stack.provision"), ("probe", "stack.probe"),
                                       ("flip", "gateway.sync")])
def test_a_rotating_run_over_a_staged_stack_that_fails_keeps_the_old_secret_everywhere(catalog_url, step, kind):
    out = asyncio.run(_scenario(catalog_url, Options(yes=True, new_jwt_secret=True, online=False), (step, kind, "fail"),
                                staged_first=True))
    assert out["final"]["state"] == "rolled_back", out["final"]
    end = out["end"]
    assert end["mode"] == POOLED and end["route"] == "pool" and end["pooled_takes_writes"]
    # The staged stack stays, with the secret the catalog (and every gateway) still holds.
    assert end["stack"] and end["docker_agent"] == "docker-1"
    assert out["secret"] == out["old_secret"] == out["hosts"].stack["secret"]


async def _settled_again(url: str, row_id: str, agents: "Agents", box: SecretBox, sql_text: str,
                         resume: bool) -> tuple[dict, list]:
    """Edits a migration's rows as an older controller or a stop would have left them, then lets a new
    controller resume (or recover) it; returns its end and the jobs it sent."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(sql_text, (row_id,))
    ctl = Controller(url, box, agents)
    await ctl.catalog.open()
    try:
        agents.seen = []
        if resume:
            await ctl.migrations.resume(row_id, None)
            await ctl.migrations.wait(row_id)
        else:
            await ctl.migrations.recover()
        row = await ctl.catalog.migration(row_id)
        project = await ctl.catalog.project(row.project_id)
        return _state(agents.hosts, project, row), agents.seen
    finally:
        await ctl.catalog.close()


async def _migrated(url: str, name: str, options: Options, fault, state: str) -> tuple[str, Agents, SecretBox]:
    """A fresh project migrated with `options` (and `fault`), ending in `state`; its migration's id."""
    await _catalog(url)
    box, agents = SecretBox(new_master_key()), Agents(Hosts())
    ctl = Controller(url, box, agents)
    await ctl.catalog.open()
    try:
        user = await _enrolled(ctl.catalog)
        project, _ = await ctl.projects.create(user, name)
        agents.fault = fault
        row = await ctl.migrations.start(project, options)
        assert (await ctl.migrations.wait(row.id))["state"] == state
        return row.id, agents, box
    finally:
        await ctl.catalog.close()


def test_a_migration_recorded_before_steps_had_rows_resumes_after_cutover_without_moving_data_again(catalog_url):
    async def scenario():
        row_id, agents, box = await _migrated(catalog_url, "legacy", Options(yes=True, online=False),
                                              ("unlock", "tenant.unlock", "fail"), "failed_after_cutover")
        # As an older controller left it: the phase only, no step rows.
        return await _settled_again(catalog_url, row_id, agents, box,
                                    "DELETE FROM migration_steps WHERE migration_id = %s", resume=True)

    end, seen = asyncio.run(scenario())
    # The dump file the run had not kept yet is made from the frozen pooled copy; nothing else moves.
    assert [kind for _, kind in seen] == ["tenant.unlock", "gateway.sync", "tenant.dump"], seen
    assert end == {**MIGRATED, "pooled": True, "kept_copy": 8192}


def test_a_staged_migration_stopped_after_its_last_step_is_finished_not_rolled_back(catalog_url):
    async def scenario():
        row_id, agents, box = await _migrated(catalog_url, "staged-done", STAGED, None, "succeeded")
        # Stopped between the last step and the end state.
        return await _settled_again(catalog_url, row_id, agents, box,
                                    "UPDATE migrations SET state = 'running', finished_at = NULL WHERE id = %s",
                                    resume=False)

    end, seen = asyncio.run(scenario())
    assert seen == [] and end["migration"] == "succeeded" and end["stack"] and end["pooled_takes_writes"]


ONLINE = Options(yes=True, online=True)
# Every job of every step of an online migration (the pooled copy kept, following the stack).
ONLINE_JOBS = [("preflight", "tenant.preflight"), ("provision", "stack.provision"),
               ("provision", "stack.image_info"), ("sync", "tenant.dump"), ("bootstrap", "stack.bootstrap"),
               ("bootstrap", "tenant.sync_status"),
               ("catch_up", "tenant.sync_check"), ("catch_up", "tenant.sync_status"), ("probe", "stack.probe"),
               ("lock", "gateway.sync"), ("lock", "tenant.lock"), ("drain", "tenant.sync_status"),
               ("drain", "tenant.sync_drain"), ("flip", "gateway.sync"), ("unlock", "tenant.unlock"),
               ("unlock", "gateway.sync"), ("sync_end", "tenant.sync_stop"), ("follow_back", "tenant.sync_status"),
               ("confirm", "tenant.sync_status"), ("confirm", "tenant.sync_check")]
ONLINE_AFTER_CUTOVER = {"flip", "unlock", "sync_end", "follow_back", "confirm"}
MIGRATED_ONLINE = {**MIGRATED, "pooled": True, "kept_copy": 8192, "slots": (False, True)}


def test_the_online_matrix_covers_every_job_of_every_step(catalog_url):
    done = asyncio.run(_scenario(catalog_url, ONLINE, None))
    assert done["end"] == MIGRATED_ONLINE and done["final"]["state"] == "succeeded"
    assert [s for s in done["seen"] if s[0] in {step for step, _ in ONLINE_JOBS}] == ONLINE_JOBS
    assert "until" in done["final"]["rollback"] and done["final"]["sync"]["pauseLsn"] == "0/16B3900"
    assert done["final"]["confirmed"] == {"lsn": "0/16B3A00", "tables": {"orders": 42}, "seconds": 0.01,
                                          "problems": []}


@pytest.mark.parametrize("how", ["fail", "stop"])
@pytest.mark.parametrize("step,kind", ONLINE_JOBS, ids=[f"{s}-{k}" for s, k in ONLINE_JOBS])
def test_an_online_migration_fails_or_stops_at_each_step_and_ends_well(catalog_url, step, kind, how):
    """Rolled back with no slot left before the flip; finished forward after it (resume after a failure)."""
    out = asyncio.run(_scenario(catalog_url, ONLINE, (step, kind, how)))
    if step in ONLINE_AFTER_CUTOVER and not (how == "fail" and step == "flip"):
        assert out["end"] == MIGRATED_ONLINE, (out["final"], out["status"])
    else:
        assert out["end"] == ROLLED_BACK, (out["final"], out["status"])
        assert "rollback incomplete" not in (out["final"] or out["status"])["error"]


def test_an_offline_run_recorded_with_the_older_dump_step_resumes_without_copying_again(catalog_url):
    async def scenario():
        row_id, agents, box = await _migrated(catalog_url, "older-plan", Options(yes=True, online=False),
                                              ("unlock", "tenant.unlock", "fail"), "failed_after_cutover")
        # As the plan before the copy and keep steps recorded it: one dump step that copied and kept the file.
        return await _settled_again(catalog_url, row_id, agents, box,
                                    "UPDATE migration_steps SET step = 'dump' WHERE migration_id = %s"
                                    " AND step = 'copy'", resume=True)

    end, seen = asyncio.run(scenario())
    assert [kind for _, kind in seen] == ["tenant.unlock", "gateway.sync"], seen
    assert end == {**MIGRATED, "pooled": True, "kept_copy": 8192}
