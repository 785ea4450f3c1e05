"""The project routes existing clients call besides create, list, push and migrate: activity,
metadata, and the hosted service's routes a self-hosted fleet answers 501 to; on a real fleet."""

import json
import subprocess
import time

import pytest

from tests.support import LocalFleet, wait_until

pytestmark = pytest.mark.integration

NOTES = "create table public.notes (id bigserial primary key, body text not null);"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("surface") / "dev")
    yield fleet
    fleet.close()


def _activity(fleet, project, **params):
    return fleet.api("GET", f"projects/{project['summary']['hash']}/activity", params=params)


def test_activity_lists_what_was_done_newest_first_with_outcomes(fleet):
    project = fleet.create("Busy Notes")
    assert fleet.push(project, {"001_notes.sql": NOTES}).status_code == 200
    broken = fleet.push(project, {"002_broken.sql": "create table public.notes (id int);"})
    assert broken.status_code >= 400
    assert fleet.push(project, {"003_dry.sql": "select 1;"}, dryRun=True).status_code == 200
    dumped = fleet.migrate(project, dumpOnly=True)
    assert dumped.status_code == 200, dumped.text

    response = _activity(fleet, project)
    assert response.status_code == 200, response.text
    listed = response.json()["activity"]
    # A dry run changes nothing, so it is not activity.
    assert [(a["kind"], a["outcome"]) for a in listed] == [
        ("migrate (dump_only)", "succeeded"), ("push", "failed"), ("push", "succeeded"), ("create", "succeeded")]
    assert "already exists" in listed[1]["detail"] and listed[2]["detail"] == "applied 001_notes.sql"
    assert listed[0]["migrationId"] == dumped.json()["migrationId"]
    assert [a["at"] for a in listed] == sorted((a["at"] for a in listed), reverse=True)

    assert [a["kind"] for a in _activity(fleet, project, limit=2).json()["activity"]] == ["migrate (dump_only)", "push"]
    for bad in ("0", "201"):
        refused = _activity(fleet, project, limit=bad)
        assert refused.status_code == 400 and "limit must be between 1 and 200" in refused.json()["error"]
    # Another user's project is not found, whatever its hash.
    stranger = fleet.add_user("activity-stranger")
    assert fleet.api("GET", f"projects/{project['summary']['hash']}/activity", token=stranger).status_code == 404


def test_metadata_is_set_and_removed_by_key_and_bad_changes_change_nothing(fleet):
    project = fleet.create("Labelled Notes")
    path = f"projects/{project['summary']['hash']}/metadata"
    first = fleet.api("GET", path).json()
    assert first["metadata"] == {} and first["updatedAt"] is None
    assert (first["slug"], first["hash"], first["mode"]) == (project["summary"]["slug"], project["summary"]["hash"],
                                                             "v2_shared")
    changed = fleet.api("PATCH", path, {"metadata": {"team": "growth", "tier": "gold"}})
    assert changed.status_code == 200 and changed.json()["metadata"] == {"team": "growth", "tier": "gold"}
    changed = fleet.api("PATCH", path, {"metadata": {"tier": None, "owner.email": "ops@example.test"}})
    assert changed.json()["metadata"] == {"team": "growth", "owner.email": "ops@example.test"}

    refusals = [({"metadata": {"bad key!": "x"}}, "metadata key 'bad key!'"),
                ({"metadata": {"team": 7}}, "metadata key 'team': the value must be a string"),
                ({"metadata": {"team": "x" * 1025}}, "at most 1024 characters"),
                ({"metadata": {f"k{i}": "v" for i in range(63)}}, "at most 64 keys; this change would make 65"),
                ({"metadata": {}}, "non-empty object"),
                ({"labels": {"team": "x"}}, 'send {"metadata"')]
    for body, message in refusals:
        refused = fleet.api("PATCH", path, body)
        assert refused.status_code == 400 and message in refused.json()["error"], (body, refused.text)
    assert fleet.api("GET", path).json()["metadata"] == {"team": "growth", "owner.email": "ops@example.test"}
    stranger = fleet.add_user("metadata-stranger")
    assert fleet.api("PATCH", path, {"metadata": {"team": "mine"}}, token=stranger).status_code == 404


def test_hosted_only_routes_answer_501_with_a_reason(fleet):
    project = fleet.create("Plain Notes")
    hash_ = project["summary"]["hash"]
    for method, path in (("GET", "ai/summaries"), ("POST", f"projects/{hash_}/ai-summary"),
                         ("POST", "mcp/intents"), ("GET", f"projects/{hash_}/mcp/intents/1")):
        answered = fleet.api(method, path, {} if method == "POST" else None)
        assert answered.status_code == 501, (method, path, answered.text)
        assert "self-hosted" in answered.json()["error"]
        anonymous = fleet.api(method, path, token="none-such")
        assert anonymous.status_code in (401, 429) and "error" in anonymous.json()


def _containers(hash_: str) -> list[str]:
    import subprocess

    out = subprocess.run(["docker", "ps", "-a", "--filter", f"label=flux.hash={hash_}", "--format", "{{.Names}}"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(out.split())


def test_delete_answers_its_mode_and_force_removes_only_what_no_catalog_project_owns(fleet):
    orphan = fleet.create("Orphan Stack", mode="v1_dedicated")["summary"]["hash"]
    assert len(_containers(orphan)) == 2
    # As a catalog restored from an older backup would leave it: the stack is there, its project is not.
    assert fleet.catalog_sql("DELETE FROM projects WHERE hash = %s RETURNING 1", (orphan,)) == [(1,)]

    missing = fleet.api("DELETE", f"projects/{orphan}")
    assert missing.status_code == 404 and "force" in missing.json()["error"]
    operator = fleet.add_user("nuke-operator")
    refused = fleet.api("DELETE", f"projects/{orphan}", params={"force": "1"}, token=operator)
    assert refused.status_code == 403 and "needs an admin" in refused.json()["error"]
    malformed = fleet.api("DELETE", f"projects/{orphan}", params={"force": "yes"})
    assert malformed.status_code == 400 and "force must be" in malformed.json()["error"]
    assert len(_containers(orphan)) == 2  # nothing was touched by the refusals

    nuked = fleet.api("DELETE", f"projects/{orphan}", params={"force": "1", "skipBackupCheck": "true"})
    assert nuked.status_code == 200, nuked.text
    body = nuked.json()
    assert body["ok"] is True and body["mode"] == "orphan"
    # Its two containers, its volume and its network, each named with the host it was on.
    assert len(body["removed"]) == 4 and all(item.startswith(f"dev-docker: flux-{orphan}-") for item in body["removed"])
    assert _containers(orphan) == []
    assert fleet.api("DELETE", f"projects/{orphan}", params={"force": "1"}).status_code == 404

    # Another owner's project is no orphan, whoever asks and however hard.
    theirs = fleet.create("Their Stack", token=operator, mode="v1_dedicated")["summary"]
    left = fleet.api("DELETE", f"projects/{theirs['hash']}", params={"force": "1"})
    assert left.status_code == 404 and "belongs to a project in the catalog" in left.json()["error"]
    assert len(_containers(theirs["hash"])) == 2
    deleted = fleet.api("DELETE", f"projects/{theirs['hash']}", params={"slug": theirs["slug"], "skipBackupCheck": "true"}, token=operator)
    assert deleted.status_code == 200 and deleted.json()["mode"] == "catalog"
    assert _containers(theirs["hash"]) == []


def test_logs_of_a_dedicated_project_are_served_as_events_and_followed(fleet):
    import subprocess
    import threading
    import time

    import psycopg

    from tests.support import script

    project = fleet.create("Logged Stack", mode="v1_dedicated")
    s = project["summary"]
    params = {"slug": s["slug"], "hash": s["hash"], "service": "db", "tail": 50}
    answer = fleet.api("GET", "logs", params=params)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = [line for line in answer.text.splitlines() if line]
    assert events and all(line.startswith("data: {") for line in events)
    assert any("ready to accept connections" in line for line in events), events[-5:]
    # The lines passed through: the catalog's job records keep none of them.
    [(asked, kept)] = fleet.catalog_sql("SELECT count(*), count(output) FROM jobs WHERE kind = 'stack.logs'")
    assert asked >= 1 and kept == 0

    for bad, message in (({"service": "web"}, "service must be api or db"), ({"tail": 0}, "tail must be between"),
                         ({"follow": "maybe"}, "follow must be")):
        refused = fleet.api("GET", "logs", params={**params, **bad})
        assert refused.status_code == 400 and message in refused.json()["error"], refused.text
    pooled = fleet.create("Logless Notes")["summary"]
    refused = fleet.api("GET", "logs", params={"slug": pooled["slug"], "hash": pooled["hash"], "service": "db"})
    assert refused.status_code == 400 and "shared cluster" in refused.json()["error"]

    # Followed through our CLI: a line the database writes after it started comes through.
    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token, "PATH": "/usr/bin:/bin"}
    follower = subprocess.Popen([script("flux"), "logs", "-p", s["slug"], "--hash", s["hash"], "--service", "db",
                                 "--tail", "1", "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                text=True)
    try:
        time.sleep(2)
        url = fleet.api("GET", f"projects/{s['hash']}/credentials").json()["postgresConnectionString"]
        with psycopg.connect(url) as conn:
            with pytest.raises(psycopg.errors.UndefinedFunction):
                conn.execute("SELECT follow_marker_4711()")
        seen: list[str] = []
        reader = threading.Thread(target=lambda: seen.extend(iter(follower.stdout.readline, "")), daemon=True)
        reader.start()
        wait_until(lambda: any("follow_marker_4711" in line for line in seen), 30, "the new line to be followed")
    finally:
        follower.terminate()
        follower.wait(10)


def _api_env(hash_: str) -> dict:
    import json
    import subprocess

    name = subprocess.run(["docker", "ps", "-a", "--filter", f"label=flux.hash={hash_}", "--filter",
                           "label=flux.component=api", "--format", "{{.Names}}"], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    env = json.loads(subprocess.run(["docker", "inspect", name], capture_output=True, text=True,
                                    check=True).stdout)[0]["Config"]["Env"]
    return dict(item.split("=", 1) for item in env if item.startswith("PGRST_"))


def test_a_dedicated_apis_settings_are_shown_without_secrets_and_changed_by_key(fleet):
    created = fleet.create("Tuned Stack", mode="v1_dedicated")
    s = created["summary"]
    path = f"projects/{s['hash']}/api-env"
    shown = fleet.api("GET", path, params={"slug": s["slug"]})
    assert shown.status_code == 200, shown.text
    assert shown.json()["chosen"] == {} and "PGRST_JWT_SECRET" in shown.json()["managed"]
    secrets = created["secrets"]
    assert secrets["pgrstJwtSecret"] not in shown.text and secrets["postgresPassword"] not in shown.text

    changed = fleet.api("PATCH", path, {"env": {"PGRST_DB_MAX_ROWS": "2", "PGRST_SERVER_TIMING_ENABLED": "true"}})
    assert changed.status_code == 200, changed.text
    assert changed.json()["chosen"] == {"PGRST_DB_MAX_ROWS": "2", "PGRST_SERVER_TIMING_ENABLED": "true"}
    running = _api_env(s["hash"])
    assert running["PGRST_DB_MAX_ROWS"] == "2" and running["PGRST_JWT_SECRET"] == secrets["pgrstJwtSecret"]
    # The API answers again behind the gateway, on the same route.
    assert fleet.api("POST", f"projects/{s['hash']}/probe").status_code == 200

    for body, message in (({"env": {"PGRST_JWT_SECRET": "mine"}}, "is set by Flux"),
                          ({"env": {"LD_PRELOAD": "/x.so"}}, "is not a PostgREST setting"),
                          ({"env": {"PGRST_DB_MAX_ROWS": "1\nPGRST_JWT_SECRET=x"}}, "one line"),
                          ({"env": {}}, "non-empty object"),
                          ({"settings": {}}, 'send {"env"')):
        refused = fleet.api("PATCH", path, body)
        assert refused.status_code == 400 and message in refused.json()["error"], (body, refused.text)
    assert _api_env(s["hash"]) == running  # no refusal touched the API

    removed = fleet.api("PATCH", path, {"env": {"PGRST_DB_MAX_ROWS": None}})
    assert removed.json()["chosen"] == {"PGRST_SERVER_TIMING_ENABLED": "true"}
    assert "PGRST_DB_MAX_ROWS" not in _api_env(s["hash"])
    # A repair keeps what the owner chose.
    assert fleet.api("POST", f"projects/{s['hash']}/repair").status_code == 200
    assert _api_env(s["hash"])["PGRST_SERVER_TIMING_ENABLED"] == "true"

    # A stopped project stays stopped: its settings change once it runs again.
    assert fleet.api("POST", f"projects/{s['hash']}/lifecycle", {"action": "stop"}).status_code == 200
    stopped = fleet.api("PATCH", path, {"env": {"PGRST_DB_MAX_ROWS": "9"}})
    assert stopped.status_code == 400 and "is stopped: start it first" in stopped.json()["error"]
    assert fleet.api("GET", path).json()["chosen"] == {"PGRST_SERVER_TIMING_ENABLED": "true"}

    pooled = fleet.create("Pooled Tuning")["summary"]
    refused = fleet.api("GET", f"projects/{pooled['hash']}/api-env")
    assert refused.status_code == 400 and "applies to v1_dedicated projects" in refused.json()["error"]


def test_our_cli_shows_and_changes_activity_metadata_and_api_settings(fleet):
    import json

    from tests.support import run, script

    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token}
    s = fleet.create("Cli Stack", mode="v1_dedicated")["summary"]
    where = ("-p", s["slug"], "--hash", s["hash"])

    def flux(*args, check=True):
        return run(script("flux"), "project", *args, *where, env=env, check=check, timeout=300)

    assert "No metadata recorded" in flux("metadata").stdout
    assert flux("metadata", "team=growth", "tier=gold").stdout.splitlines() == ["team=growth", "tier=gold"]
    assert flux("metadata", "--unset", "tier").stdout.splitlines() == ["team=growth"]
    bad = flux("metadata", "team", check=False)
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    shown = flux("api-env", "PGRST_DB_MAX_ROWS=5").stdout
    assert "PGRST_DB_MAX_ROWS=5\n" in shown and "PGRST_JWT_SECRET=(hidden" in shown and "# set by Flux" in shown
    refused = flux("api-env", "PGRST_JWT_SECRET=mine", check=False)
    assert refused.returncode == 1 and "is set by Flux" in refused.stderr
    activity = json.loads(flux("activity", "--json").stdout)["activity"]
    assert [a["kind"] for a in activity][:2] == ["api-env", "create"]


def test_a_pooled_projects_api_lines_are_the_requests_the_gateway_served_for_it(fleet):
    import threading

    from tests.support import app_token, script

    project = fleet.create("Served Notes")
    other = fleet.create("Other Notes")
    s = project["summary"]
    assert fleet.push(project, {"001_notes.sql": NOTES + "grant select on public.notes to authenticated;"}
                      ).status_code == 200
    token = app_token(project["projectJwtSecret"])
    assert fleet.gateway("GET", fleet.host(project), "/notes?body=neq.first-marker", token).status_code == 200
    assert fleet.gateway("GET", fleet.host(other), "/notes?body=neq.other-marker", token).status_code == 401
    params = {"slug": s["slug"], "hash": s["hash"], "service": "api"}

    def lines():
        answer = fleet.api("GET", "logs", params=params)
        assert answer.status_code == 200, answer.text
        return [json.loads(line[6:])["line"] for line in answer.text.splitlines() if line.startswith("data: ")]

    seen = wait_until(lambda: [line for line in lines() if "first-marker" in line], 15, "the request's line")
    assert seen[0].startswith("GET /notes?body=neq.first-marker 200 ")
    assert not [line for line in lines() if "other-marker" in line]
    assert all(token not in line for line in lines())
    # Followed: a request made after the follow began comes through, once.
    env = {"FLUX_API_BASE": fleet.info["api_base"], "FLUX_API_TOKEN": fleet.token, "PATH": "/usr/bin:/bin"}
    follower = subprocess.Popen([script("flux"), "logs", "-p", s["slug"], "--hash", s["hash"], "--tail", "1", "-f"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        followed: list[str] = []
        threading.Thread(target=lambda: followed.extend(iter(follower.stdout.readline, "")), daemon=True).start()
        wait_until(lambda: followed, 15, "the follow to start")
        assert fleet.gateway("GET", fleet.host(project), "/notes?body=neq.second-marker", token).status_code == 200
        wait_until(lambda: any("second-marker" in line for line in followed), 30, "the new request to be followed")
        time.sleep(2.5)
        assert len([line for line in followed if "second-marker" in line]) == 1
    finally:
        follower.terminate()
        follower.wait(10)
