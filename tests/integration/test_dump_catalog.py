"""Dump files end to end: encrypted in the db agent's spool, recorded in the catalog, listed,
removed by the controller's retention and with their project, on a real local fleet."""

import base64
import hashlib
import json
import os
import pathlib
import sys
import time

import pytest

from controller.dumpfiles import key_context
from controller.secretbox import SecretBox, SecretBoxError
from tests.support import LocalFleet, run, script, wait_until

pytestmark = pytest.mark.integration

SECRET_WORD = "zebra-quartz-7741"
NOTES = f"""
create table public.notes (id bigserial primary key, body text not null);
grant select on public.notes to authenticated;
insert into public.notes (body) values ('the word is {SECRET_WORD}'), ('plain row');
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("dumps") / "dev")
    yield fleet
    fleet.close()


def _project(fleet, name: str) -> dict:
    project = fleet.create(name)
    pushed = fleet.push(project, {"001_notes.sql": NOTES})
    assert pushed.status_code == 200, pushed.text
    return project


def _dump_only(fleet, project) -> dict:
    response = fleet.migrate(project, dumpOnly=True)
    assert response.status_code == 200, response.text
    return response.json()


def _listing(fleet, project, **params) -> dict:
    response = fleet.api("GET", f"projects/{project['summary']['hash']}/dumps", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def _rows(fleet, project) -> list:
    return fleet.catalog_sql("SELECT path, removed_why, missing FROM dump_files WHERE project_id = %s"
                             " ORDER BY created_at", (_project_id(fleet, project),))


def _project_id(fleet, project) -> str:
    s = project["summary"]
    [(project_id,)] = fleet.catalog_sql("SELECT id::text FROM projects WHERE hash = %s", (s["hash"],))
    return project_id


def _cli(fleet, *args: str, check: bool = True):
    return run(script("flux"), *args, check=check, timeout=600,
               env={"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token})


def _agent_dir(fleet, name: str) -> pathlib.Path:
    return fleet.fleet.dir / "agents" / name


def _files_under(*roots: pathlib.Path):
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


def test_a_dump_is_encrypted_in_the_spool_recorded_and_listed(fleet):
    project = _project(fleet, "Sealed Notes")
    s = project["summary"]
    result = _dump_only(fleet, project)
    d = result["dump"]
    path = pathlib.Path(d["path"])
    stored = path.read_bytes()
    assert path.name.endswith(".sql.enc") and stored.startswith(b"FLUXDUMP")
    # Nothing of the tenant's data is on the db host's disk in the clear, job records included.
    spool = _agent_dir(fleet, "dev-db") / "spool"
    assert run("grep", "-r", "-l", "-a", SECRET_WORD, str(spool), check=False).returncode == 1
    assert SECRET_WORD.encode() not in stored and b"COPY " not in stored
    assert d["bytes"] == len(stored) and d["sha256"] == hashlib.sha256(stored).hexdigest()
    assert f"the word is {SECRET_WORD}".encode() in fleet.dump_sql(d["path"])

    # The data key is only in the catalog, sealed and bound to its row; never on an agent's disk or in a log.
    [(dump_id, sealed, migration_id)] = fleet.catalog_sql(
        "SELECT id::text, key_sealed, migration_id::text FROM dump_files WHERE path = %s", (d["path"],))
    assert migration_id == result["migrationId"] and sealed.startswith("v1:")
    box = SecretBox((fleet.fleet.dir / "controller" / "master.key").read_bytes())
    key = box.open(sealed, key_context(dump_id))
    assert len(key) == 32
    with pytest.raises(SecretBoxError):
        box.open(sealed, key_context(migration_id))
    for secret in (key, base64.b64encode(key)):
        leaks = [str(p) for p in _files_under(fleet.fleet.dir / "agents", fleet.fleet.dir / "logs",
                                              fleet.fleet.dir / "controller") if secret in p.read_bytes()]
        assert leaks == []

    listed = _listing(fleet, project)
    assert listed["retentionDays"] == 7
    [item] = listed["dumps"]
    assert item["host"] == "dev-db" and item["path"] == d["path"] and item["state"] == "kept"
    assert (item["bytes"], item["sha256"], item["migrationId"]) == (d["bytes"], d["sha256"], result["migrationId"])
    assert item["sqlBytes"] > 0 and item["expiresAt"] > item["createdAt"]

    shown = _cli(fleet, "dumps", "list", "-p", s["slug"], "--hash", s["hash"]).stdout
    assert "HOST" in shown and "SHA256" in shown and d["path"] in shown and d["sha256"] in shown
    assert "dev-db" in shown and "kept" in shown and "removed 7 days after" in shown
    as_json = json.loads(_cli(fleet, "dumps", "list", "-p", s["slug"], "--hash", s["hash"], "--json").stdout)
    assert as_json["dumps"][0]["sha256"] == d["sha256"]
    wrong_slug = _cli(fleet, "dumps", "list", "-p", "other", "--hash", s["hash"], check=False)
    assert wrong_slug.returncode == 1 and "does not match" in wrong_slug.stderr

    # The CLI prints where the dump is, as before.
    printed = _cli(fleet, "migrate", "-p", s["slug"], "--hash", s["hash"], "--to", "v1_dedicated", "--dump-only",
                   "--yes").stdout
    assert "Dump complete" in printed and ".sql.enc" in printed and "sha256" in printed
    assert len(_listing(fleet, project)["dumps"]) == 2


def test_a_file_gone_from_the_host_is_reported_and_does_not_stop_a_delete(fleet):
    project = _project(fleet, "Vanishing Dump")
    s = project["summary"]
    first = _dump_only(fleet, project)["dump"]
    second = _dump_only(fleet, project)["dump"]
    os.unlink(first["path"])
    with open(second["path"], "ab") as handle:
        handle.write(b"tampered")
    states = {d["path"]: d["state"] for d in _listing(fleet, project)["dumps"]}
    assert states == {first["path"]: "missing", second["path"]: "changed"}
    project_id = _project_id(fleet, project)

    deleted = _cli(fleet, "delete", "-p", s["slug"], "--hash", s["hash"], "--yes", "--skip-backup-check")
    assert f"Deleted {s['slug']}" in deleted.stdout
    assert not os.path.exists(second["path"])
    assert fleet.catalog_sql("SELECT count(*) FROM dump_files WHERE project_id = %s", (project_id,)) == [(0,)]
    log = (fleet.fleet.dir / "logs" / "controller.log").read_text()
    assert "already gone when removed (project_deleted)" in log and first["path"] in log


def test_a_migrated_project_keeps_its_dump_files_listed_and_delete_removes_them(fleet):
    project = _project(fleet, "Moved Notes")
    s = project["summary"]
    dumped = _dump_only(fleet, project)["dump"]
    migrated = fleet.migrate(project)
    assert migrated.status_code == 200, migrated.text
    full = migrated.json()["dump"]
    assert f"the word is {SECRET_WORD}".encode() in fleet.dump_sql(full["path"])
    # Dedicated now, with the pooled copy kept: its dump files are still its own.
    listed = _listing(fleet, project)["dumps"]
    assert [d["path"] for d in listed] == [dumped["path"], full["path"]]
    assert all(d["state"] == "kept" for d in listed)
    project_id = _project_id(fleet, project)

    assert fleet.api("DELETE", f"projects/{s['hash']}", params={"slug": s["slug"], "skipBackupCheck": "true"}).status_code == 200
    assert not os.path.exists(dumped["path"]) and not os.path.exists(full["path"])
    assert not pathlib.Path(full["path"]).parent.exists()
    assert fleet.catalog_sql("SELECT count(*) FROM dump_files WHERE project_id = %s", (project_id,)) == [(0,)]
    assert fleet.catalog_sql("SELECT count(*) FROM projects WHERE id = %s", (project_id,)) == [(0,)]


def test_an_offline_migrate_keeps_its_dump_file_after_the_cutover_from_the_frozen_copy(fleet):
    project = _project(fleet, "Offline Notes")
    migrated = fleet.migrate(project, online=False)
    assert migrated.status_code == 200, migrated.text
    result = migrated.json()
    status = fleet.api("GET", f"migrations/{result['migrationId']}").json()
    steps = [step["name"] for step in status["steps"]]
    # The copy under the lock writes no file; the file comes after writes resumed on the stack.
    assert steps.index("lock") < steps.index("copy") < steps.index("unlock") < steps.index("keep")
    assert "dump" not in steps and all(step["status"] == "done" for step in status["steps"])
    kept = result["dump"]
    assert kept["seconds"] > 0 and kept["host"] == "dev-db"
    text = fleet.dump_sql(kept["path"]).decode()
    assert f"the word is {SECRET_WORD}" in text and "plain row" in text
    [row] = fleet.catalog_sql("SELECT migration_id::text, sha256 FROM dump_files WHERE path = %s", (kept["path"],))
    assert row == (result["migrationId"], kept["sha256"])
    assert [d["path"] for d in _listing(fleet, project)["dumps"]] == [kept["path"]]


def test_a_project_with_kept_dump_files_cannot_leave_the_catalog_without_them(fleet):
    import psycopg

    project = _project(fleet, "Restricted Row")
    _dump_only(fleet, project)
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        fleet.catalog_sql("DELETE FROM projects WHERE id = %s", (_project_id(fleet, project),))


def test_the_controller_removes_expired_files_and_the_agent_no_longer_prunes_them(fleet):
    project = _project(fleet, "Expiring Notes")
    old = _dump_only(fleet, project)["dump"]
    young = _dump_only(fleet, project)["dump"]
    # Agents used to prune their spool by file age; a file the catalog keeps must not vanish so.
    month_ago = time.time() - 30 * 86400
    os.utime(young["path"], (month_ago, month_ago))
    third = _dump_only(fleet, project)["dump"]
    assert os.path.exists(young["path"])

    # The catalog's clock is what counts: the first file is past the 7 days now.
    fleet.catalog_sql("UPDATE dump_files SET created_at = now() - interval '8 days' WHERE path = %s",
                      (old["path"],))
    # A sweep runs when an agent connects (and every hour).
    fleet.stop_process("dev-db")
    fleet.restart()
    wait_until(lambda: not os.path.exists(old["path"]), 60, "the expired dump file to be removed")
    assert os.path.exists(young["path"]) and os.path.exists(third["path"])
    everything = {d["path"]: d for d in _listing(fleet, project, all="true")["dumps"]}
    assert everything[old["path"]]["state"] == "removed" and everything[old["path"]]["removedWhy"] == "retention"
    assert everything[old["path"]]["missingWhenRemoved"] is False
    assert [d["path"] for d in _listing(fleet, project)["dumps"]] == [young["path"], third["path"]]
    shown = _cli(fleet, "dumps", "list", "-p", project["summary"]["slug"], "--hash", project["summary"]["hash"],
                 "--all").stdout
    assert "removed (retention)" in shown


def test_the_retention_is_a_controller_setting_kept_across_init(tmp_path, catalog_url):
    state = tmp_path / "controller"

    def init(*extra: str, check: bool = True):
        return run(sys.executable, "-m", "controller.main", "init", "--catalog-url", catalog_url,
                   "--state-dir", str(state), "--json", *extra, check=check)

    init()
    assert json.loads((state / "controller.json").read_text())["dump_retention_days"] == 7
    changed = json.loads(init("--dump-retention-days", "2.5").stdout)
    assert changed["changed"] and json.loads((state / "controller.json").read_text())["dump_retention_days"] == 2.5
    assert not json.loads(init().stdout)["changed"]
    assert json.loads((state / "controller.json").read_text())["dump_retention_days"] == 2.5
    for bad in ("0", "-1", "nan", "100000"):
        refused = init("--dump-retention-days", bad, check=False)
        assert refused.returncode == 1 and "dump retention must be" in refused.stderr
