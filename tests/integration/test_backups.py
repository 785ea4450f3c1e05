"""Backups on a real fleet: made next to the data, kept encrypted on the backup agent, proven by a
restore into a scratch container, restored into projects; and the gate on migrate and delete."""

import hashlib
import json
import pathlib
import subprocess

import pytest

from tests.support import LocalFleet, app_token, run, script, wait_until

pytestmark = pytest.mark.integration

ORDERS = """
create table public.orders (id bigserial primary key, who text not null, item text not null, qty int not null,
                            made_by text default auth.uid());
grant select, insert on public.orders to authenticated;
grant usage on sequence public.orders_id_seq to authenticated;
"""
MORE = "create table public.notes (id bigserial primary key, body text not null);"
ENTRY_KEYS = {"id", "format", "status", "kind", "sizeBytes", "checksumSha256", "createdAt", "completedAt",
              "artifactValidationStatus", "artifactValidationAt", "artifactValidationError",
              "restoreVerificationStatus", "restoreVerificationAt", "restoreVerificationError",
              "primaryArtifactRelativePath"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("backups") / "dev")
    yield fleet
    fleet.close()


def _cli(fleet, cwd=None):
    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token}

    def flux(*args, check=True):
        return run(script("flux"), *args, env=env, check=check, timeout=600, cwd=cwd)

    return flux


def _backup_dir(fleet) -> pathlib.Path:
    return fleet.fleet.dir / "agents" / "dev-backup" / "backups"


def _write_orders(fleet, host: str, secret: str, rows: list[tuple[str, str, int]], **claims) -> None:
    for who, item, qty in rows:
        token = app_token(secret, sub=who, **claims)
        written = fleet.gateway("POST", host, "/orders", token, json={"who": who, "item": item, "qty": qty})
        assert written.status_code in (200, 201), written.text


def _read_orders(fleet, host: str, secret: str, **claims) -> list:
    read = fleet.gateway("GET", host, "/orders?select=who,item,qty&order=id", app_token(secret, sub="reader", **claims))
    assert read.status_code == 200, read.text
    return read.json()


def test_backup_verify_the_gate_and_a_restore_into_a_new_project_through_the_cli(fleet, tmp_path):
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "001_orders.sql").write_text(ORDERS)
    flux = _cli(fleet, cwd=str(tmp_path))
    created = json.loads(flux("create", "Backed Orders", "--json").stdout)
    slug, hash_ = created["summary"]["slug"], created["summary"]["hash"]
    where = ("-p", slug, "--hash", hash_)
    host, secret = created["summary"]["apiUrl"].removeprefix("https://"), created["projectJwtSecret"]
    flux("push", *where)
    _write_orders(fleet, host, secret, [("ada", "loom", 2), ("grace", "compiler", 1), ("ada", "thread", 40)])
    rows = _read_orders(fleet, host, secret)
    assert len(rows) == 3

    # The gate: no backup at all.
    refused = flux("migrate", *where, "--to", "v1_dedicated", "--yes", check=False)
    assert refused.returncode == 1
    assert "needs a restore-verified backup and it has none" in refused.stderr
    assert "flux backup create --verify" in refused.stderr and "--skip-backup-check" in refused.stderr

    made = json.loads(flux("backup", "create", *where, "--json").stdout)["backup"]
    assert (made["status"], made["artifactValidationStatus"], made["restoreVerificationStatus"]) == \
        ("complete", "artifact_valid", None)
    assert made["kind"] == "tenant_export" and made["backupHost"] == "dev-backup" and made["rows"] == 3
    # Stored on the backup host, encrypted: none of the rows' text is in the file.
    stored = _backup_dir(fleet) / made["primaryArtifactRelativePath"]
    blob = stored.read_bytes()
    assert len(blob) == made["sizeBytes"] and hashlib.sha256(blob).hexdigest() == made["checksumSha256"]
    assert blob.startswith(b"FLUXDUMP") and b"compiler" not in blob and b"PGDMP" not in blob

    # A backup that was never restored does not open the gate.
    refused = flux("migrate", *where, "--to", "v1_dedicated", "--yes", check=False)
    assert refused.returncode == 1 and f"its newest, {made['id']}, is not verified" in refused.stderr

    verified = json.loads(flux("backup", "verify", made["id"], *where, "--json").stdout)
    assert verified["ok"] and verified["restoreVerificationStatus"] == "restore_verified"
    assert verified["backup"]["restoreVerificationError"] is None
    # The scratch database is gone.
    leftover = subprocess.run(["docker", "ps", "-aq", "--filter", "label=flux.scratch"], capture_output=True,
                              text=True, check=True).stdout
    assert leftover.strip() == ""

    # A push after the backup closes the gate again.
    (tmp_path / "migrations" / "002_notes.sql").write_text(MORE)
    flux("push", *where)
    refused = flux("migrate", *where, "--to", "v1_dedicated", "--yes", check=False)
    assert refused.returncode == 1 and "needs a backup newer than its last push" in refused.stderr

    second = json.loads(flux("backup", "create", "--verify", *where, "--json").stdout)["backup"]
    assert second["restoreVerificationStatus"] == "restore_verified"
    listed = json.loads(flux("backup", "list", *where, "--json").stdout)["backups"]
    assert [b["id"] for b in listed] == [second["id"], made["id"]]
    moved = flux("migrate", *where, "--to", "v1_dedicated", "--yes")
    assert "v1_dedicated" in moved.stdout
    assert _read_orders(fleet, host, secret) == rows

    # The first backup (a pooled tenant's) into a new project: a dedicated one, serving the same rows.
    restored = json.loads(flux("backup", "restore", made["id"], "--to-new-project", "Orders Copy", "--json").stdout)
    assert restored["ok"] and restored["created"] and restored["problems"] == [] and restored["rows"] == 3
    copy = next(p for p in fleet.api("GET", "list").json() if p["hash"] == restored["hash"])
    assert copy["mode"] == "v1_dedicated" and copy["slug"] == "orders-copy"
    creds = fleet.api("GET", f"projects/{restored['hash']}/credentials").json()
    copy_host = copy["apiUrl"].removeprefix("https://")
    assert _read_orders(fleet, copy_host, creds["projectJwtSecret"]) == rows
    # The copy takes writes of its own, with the ledger of the backup.
    _write_orders(fleet, copy_host, creds["projectJwtSecret"], [("linus", "kernel", 1)])
    ledger = fleet.api("GET", f"projects/{restored['hash']}/migrations").json()["applied"]
    assert [m["filename"] for m in ledger] == ["001_orders.sql"]
    assert _read_orders(fleet, host, secret) == rows


def test_an_altered_backup_file_fails_verify_with_a_clear_reason(fleet):
    project = fleet.create("Tampered Orders")
    s = project["summary"]
    assert fleet.push(project, {"001_orders.sql": ORDERS}).status_code == 200
    _write_orders(fleet, fleet.host(project), project["projectJwtSecret"], [("ada", "loom", 2)])
    made = fleet.api("POST", f"projects/{s['hash']}/backups", {})
    assert made.status_code == 200, made.text
    backup = made.json()["backup"]
    stored = _backup_dir(fleet) / backup["primaryArtifactRelativePath"]
    blob = bytearray(stored.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    stored.write_bytes(bytes(blob))

    checked = fleet.api("POST", f"projects/{s['hash']}/backups/{backup['id']}/verify")
    assert checked.status_code == 200, checked.text
    body = checked.json()
    assert body["ok"] is False and body["restoreVerificationStatus"] == "failed"
    assert body["artifactValidationStatus"] == "artifact_invalid"
    assert "was altered" in body["error"] and backup["checksumSha256"] in body["error"]
    assert hashlib.sha256(bytes(blob)).hexdigest() in body["error"]
    refused = fleet.migrate(project, skipBackupCheck=False)
    assert refused.status_code == 400
    assert refused.json()["phase"] == "backup" and "failed" in refused.json()["error"]
    # A restore refuses it too, and changes nothing.
    again = fleet.api("POST", f"backups/{backup['id']}/restore", {})
    assert again.status_code == 409 and "not restore-verified" in again.json()["error"]


def test_a_backup_survives_the_loss_of_the_database_host(fleet):
    project = fleet.create("Lost Stack", mode="v1_dedicated")
    s = project["summary"]
    assert fleet.push(project, {"001_orders.sql": ORDERS}).status_code == 200
    host, secret = fleet.host(project), project["projectJwtSecret"]
    # A project created dedicated: app tokens name their role.
    _write_orders(fleet, host, secret, [("ada", "loom", 2), ("grace", "compiler", 1)], role="authenticated")
    rows = _read_orders(fleet, host, secret, role="authenticated")
    made = fleet.api("POST", f"projects/{s['hash']}/backups", {"verify": True}).json()["backup"]
    assert made["kind"] == "project_db" and made["restoreVerificationStatus"] == "restore_verified"
    # Nothing of the backup stays where the data lives.
    docker_dir = fleet.fleet.dir / "agents" / "dev-docker"
    assert not list(docker_dir.rglob("*.fluxbackup*"))

    # The database host loses the project's database: container and volume.
    names = subprocess.run(["docker", "ps", "-a", "--filter", f"label=flux.hash={s['hash']}",
                            "--filter", "label=flux.component=db", "--format", "{{.Names}}"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(names) == 1
    volumes = subprocess.run(["docker", "inspect", "-f", "{{range .Mounts}}{{.Name}} {{end}}", names[0]],
                             capture_output=True, text=True, check=True).stdout.split()
    subprocess.run(["docker", "rm", "-f", names[0]], check=True, capture_output=True)
    subprocess.run(["docker", "volume", "rm", *volumes], check=True, capture_output=True)
    # A new, empty database; the API's connections to the lost one die with it (probed until it answers).
    wait_until(lambda: fleet.api("POST", f"projects/{s['hash']}/repair").status_code == 200, 60, "the repair")
    assert fleet.gateway("GET", host, "/orders", app_token(secret, sub="x", role="authenticated")).status_code != 200

    # Its copy on the backup host restores, into the project, and is checked against the manifest.
    restored = fleet.api("POST", f"backups/{made['id']}/restore", {})
    assert restored.status_code == 200, restored.text
    body = restored.json()
    assert body["ok"] and body["problems"] == [] and body["rows"] == 2 and body["hash"] == s["hash"]
    assert _read_orders(fleet, host, secret, role="authenticated") == rows
    ledger = fleet.api("GET", f"projects/{s['hash']}/migrations").json()["applied"]
    assert [m["filename"] for m in ledger] == ["001_orders.sql"]
    activity = fleet.api("GET", f"projects/{s['hash']}/activity").json()["activity"]
    assert activity[0]["kind"] == "restore" and activity[0]["outcome"] == "succeeded"
    shown = fleet.api("GET", f"projects/{s['hash']}").json()
    assert shown["maintenance"] is False


def test_a_pooled_restore_replaces_the_schema_in_one_transaction(fleet):
    project = fleet.create("Rewound Orders")
    s = project["summary"]
    assert fleet.push(project, {"001_orders.sql": ORDERS}).status_code == 200
    host, secret = fleet.host(project), project["projectJwtSecret"]
    _write_orders(fleet, host, secret, [("ada", "loom", 2)])
    made = fleet.api("POST", f"projects/{s['hash']}/backups", {"verify": True}).json()["backup"]
    assert made["restoreVerificationStatus"] == "restore_verified"
    _write_orders(fleet, host, secret, [("grace", "compiler", 1)])
    assert fleet.push(project, {"002_notes.sql": MORE}).status_code == 200

    restored = fleet.api("POST", f"backups/{made['id']}/restore", {})
    assert restored.status_code == 200, restored.text
    assert restored.json()["problems"] == []
    assert _read_orders(fleet, host, secret) == [{"who": "ada", "item": "loom", "qty": 2}]
    [(project_id,)] = fleet.catalog_sql("SELECT id::text FROM projects WHERE hash = %s", (s["hash"],))
    schema = f"t_{project_id.replace('-', '')[:12]}_api"
    tables = fleet.shared_sql("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,))
    assert tables == [("orders",)]
    ledger = fleet.api("GET", f"projects/{s['hash']}/migrations").json()["applied"]
    assert [m["filename"] for m in ledger] == ["001_orders.sql"]
    # The tenant's roles still work: writes go on after the restore.
    _write_orders(fleet, host, secret, [("linus", "kernel", 1)])


def test_backup_routes_answer_the_contract_shapes(fleet, tmp_path):
    project = fleet.create("Shaped Orders")
    s = project["summary"]
    base = f"projects/{s['hash']}/backups"
    assert fleet.api("GET", base).json()["backups"] == []
    assert fleet.push(project, {"001_orders.sql": ORDERS}).status_code == 200
    _write_orders(fleet, fleet.host(project), project["projectJwtSecret"], [("ada", "loom", 2)])

    made = fleet.api("POST", base)
    assert made.status_code == 200, made.text
    entry = made.json()["backup"]
    assert ENTRY_KEYS <= set(entry)
    assert isinstance(entry["id"], str) and entry["format"] == "custom" and entry["status"] == "complete"
    assert isinstance(entry["sizeBytes"], int) and len(entry["checksumSha256"]) == 64
    for key in ("createdAt", "completedAt", "artifactValidationAt"):
        assert "T" in entry[key]

    checked = fleet.api("POST", f"{base}/{entry['id']}/verify")
    assert checked.status_code == 200
    assert {"ok", "backupId", "restoreVerificationStatus"} <= set(checked.json())
    assert checked.json()["backupId"] == entry["id"] and checked.json()["restoreVerificationStatus"] == "restore_verified"

    newer = fleet.api("POST", base, {"verify": True}).json()["backup"]
    listed = fleet.api("GET", base).json()
    assert [b["id"] for b in listed["backups"]] == [newer["id"], entry["id"]]
    assert all(ENTRY_KEYS <= set(b) for b in listed["backups"])

    download = fleet.api("GET", f"{base}/{entry['id']}/download")
    assert download.status_code == 200
    assert download.content.startswith(b"PGDMP")  # the archive pg_restore reads, decrypted
    assert hashlib.sha256(download.content).hexdigest() == download.headers["x-flux-sha256"]
    archive = tmp_path / "orders.dump"
    archive.write_bytes(download.content)
    toc = subprocess.run(["pg_restore", "-l", str(archive)], capture_output=True, text=True, check=True).stdout
    assert "TABLE DATA" in toc and "orders" in toc
    # The CLI's download checks the sha256 too.
    out = tmp_path / "latest.dump"
    flux = _cli(fleet)
    said = flux("backup", "download", "-p", s["slug"], "--hash", s["hash"], "-o", str(out)).stdout
    assert hashlib.sha256(out.read_bytes()).hexdigest() in said

    for bad in ("not-a-uuid", "00000000-0000-4000-8000-000000000000"):
        missing = fleet.api("POST", f"{base}/{bad}/verify")
        assert missing.status_code in (400, 404) and missing.json()["error"]
    stranger = fleet.add_user("backup-stranger")
    assert fleet.api("GET", base, token=stranger).status_code == 404
    assert fleet.api("POST", f"backups/{entry['id']}/restore", {"toNewProject": "Stolen"},
                     token=stranger).status_code == 404
    assert fleet.api("POST", base, {"verify": "yes"}).status_code == 400


def test_delete_needs_a_verified_backup_unless_skipped(fleet):
    project = fleet.create("Deleted Orders")
    s = project["summary"]
    refused = fleet.api("DELETE", f"projects/{s['hash']}", params={"slug": s["slug"]})
    assert refused.status_code == 400 and "delete of deleted-orders needs a restore-verified backup" in \
        refused.json()["error"]
    assert any(p["hash"] == s["hash"] for p in fleet.api("GET", "list").json())
    fleet.api("POST", f"projects/{s['hash']}/backups", {"verify": True})
    deleted = fleet.api("DELETE", f"projects/{s['hash']}", params={"slug": s["slug"]})
    assert deleted.status_code == 200, deleted.text
    # Its backups outlive it.
    assert list(_backup_dir(fleet).glob("*/*.fluxbackup"))


def test_a_due_schedule_backs_up_verifies_and_applies_retention(fleet):
    project = fleet.create("Scheduled Orders")
    s = project["summary"]
    flux = _cli(fleet)
    where = ("-p", s["slug"], "--hash", s["hash"])
    assert fleet.push(project, {"001_orders.sql": ORDERS}).status_code == 200
    older = [fleet.api("POST", f"projects/{s['hash']}/backups").json()["backup"] for _ in range(2)]
    too_often = flux("backup", "schedule", *where, "--every", "10s", check=False)
    assert too_often.returncode == 1 and "at most every 60s" in too_often.stderr
    said = flux("backup", "schedule", *where, "--every", "24h", "--keep-daily", "1", "--keep-weekly", "0").stdout
    assert "backed up every 86400s" in said
    # Due now (as it would be a day later).
    fleet.catalog_sql("UPDATE backup_schedules SET next_at = now() WHERE project_id = "
                      "(SELECT id FROM projects WHERE hash = %s)", (s["hash"],))

    def pruned():
        listed = fleet.api("GET", f"projects/{s['hash']}/backups").json()
        return [b["madeBy"] for b in listed["backups"]] == ["schedule"] and listed

    listed = wait_until(pruned, 90, "the scheduled backup and the retention after it")
    made = listed["backups"][0]
    assert made["madeBy"] == "schedule" and made["restoreVerificationStatus"] == "restore_verified"
    # Retention kept the newest of the day only; the older files are gone from the backup host.
    assert [b["id"] for b in listed["backups"]] == [made["id"]]
    for old in older:
        assert not (_backup_dir(fleet) / old["primaryArtifactRelativePath"]).exists()
    assert listed["schedule"]["nextAt"] > made["createdAt"] and listed["schedule"]["lastError"] is None
    assert "No backup schedule" in flux("backup", "schedule", *where, "--off").stdout


def test_dump_streams_pg_dump_sql_with_its_flags(fleet, tmp_path):
    project = fleet.create("Dumped Orders")
    s = project["summary"]
    assert fleet.push(project, {"001_orders.sql": ORDERS}).status_code == 200
    _write_orders(fleet, fleet.host(project), project["projectJwtSecret"], [("ada", "loom-dumped", 2)])
    path = f"projects/{s['hash']}/dump"

    whole = fleet.api("GET", path)
    assert whole.status_code == 200 and whole.headers["content-type"].startswith("application/sql")
    text = whole.text
    assert "CREATE TABLE" in text and "loom-dumped" in text and "PostgreSQL database dump complete" in text
    schema_only = fleet.api("GET", path, params={"schemaOnly": "1", "clean": "1"}).text
    assert "CREATE TABLE" in schema_only and "DROP TABLE IF EXISTS" in schema_only and "loom-dumped" not in schema_only
    data_only = fleet.api("GET", path, params={"dataOnly": "true"}).text
    assert "CREATE TABLE" not in data_only and "loom-dumped" in data_only
    both = fleet.api("GET", path, params={"schemaOnly": "1", "dataOnly": "1"})
    assert both.status_code == 400 and "exclude each other" in both.json()["error"]
    assert fleet.api("GET", path, params={"clean": "yes"}).status_code == 400

    out = tmp_path / "orders.sql"
    _cli(fleet)("dump", "-p", s["slug"], "--hash", s["hash"], "-o", str(out))
    assert "loom-dumped" in out.read_text() and not (tmp_path / "orders.sql.partial").exists()

    dedicated = fleet.create("Dumped Stack", mode="v1_dedicated")
    d = dedicated["summary"]
    assert fleet.push(dedicated, {"001_orders.sql": ORDERS}).status_code == 200
    full = fleet.api("GET", f"projects/{d['hash']}/dump").text
    api_only = fleet.api("GET", f"projects/{d['hash']}/dump", params={"publicOnly": "1"}).text
    assert "CREATE SCHEMA auth" in full and "CREATE SCHEMA auth" not in api_only
    assert "CREATE TABLE api.orders" in api_only
