"""The project routes existing clients call besides create, list, push and migrate: activity,
metadata, and the hosted service's routes a self-hosted fleet answers 501 to; on a real fleet."""

import pytest

from tests.support import LocalFleet

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
