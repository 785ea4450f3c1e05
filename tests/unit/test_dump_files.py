"""Dump files in a db agent's spool: one directory per tenant, named files removed on the
controller's word only, leftovers pruned, removed with the tenant."""

import asyncio
import base64
import json
import logging
import os
import pathlib
import time

import pytest

from contract.failures import FailureKind
from agent.adapters.dumps import (dump_file, prune_leftovers, remove_dumps, remove_files, stat_files,
                                  tenant_dumps)
from agent import handlers
from agent.adapters.tenants import Tenant
from agent.errors import AgentError
from agent.runtime.config import StateDir
from agent.runtime.settings import load

A = Tenant("0a0a0a0a-0000-4000-8000-000000000001", "0a0a0a0a0000")
B = Tenant("0b0b0b0b-0000-4000-8000-000000000002", "0b0b0b0b0000")


def _dump(spool, tenant, name: str, age_s: float = 0):
    directory = tenant_dumps(spool, tenant)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_bytes(b"FLUXDUMP...")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_only_leftovers_are_pruned_never_a_finished_dump(tmp_path):
    kept_old = _dump(tmp_path, A, "old.sql.enc", age_s=30 * 86400)
    stale = _dump(tmp_path, B, "stopped.sql.enc.partial", age_s=2 * 86400)
    running = _dump(tmp_path, B, "running.sql.enc.partial", age_s=600)
    legacy_old = _dump(tmp_path, A, "before-encryption.sql", age_s=8 * 86400)
    legacy_new = _dump(tmp_path, A, "recent-plain.sql", age_s=3600)
    assert sorted(prune_leftovers(tmp_path)) == ["before-encryption.sql", "stopped.sql.enc.partial"]
    assert kept_old.exists() and running.exists() and legacy_new.exists()
    assert not stale.exists() and not legacy_old.exists()


def test_dumps_go_with_their_tenant_only(tmp_path):
    _dump(tmp_path, A, "one.sql.enc")
    _dump(tmp_path, A, "two.sql.enc.partial")
    other = _dump(tmp_path, B, "kept.sql.enc")
    assert remove_dumps(tmp_path, A) == 2
    assert not tenant_dumps(tmp_path, A).exists() and other.exists()
    assert remove_dumps(tmp_path, A) == 0


def _refused(tmp_path) -> list:
    a = str(tenant_dumps(tmp_path, A))
    b = str(tenant_dumps(tmp_path, B))
    return [
        f"{b}/kept.sql.enc",                      # another tenant's file
        f"{a}/../{B.schema}/kept.sql.enc",        # its way there
        f"{a}/../../../etc/passwd",
        f"{a}/./one.sql.enc",
        f"{a}//one.sql.enc",
        f"{a}/sub/one.sql.enc",
        f"{a}/one.sql.enc/",
        "dumps/" + A.schema + "/one.sql.enc",     # relative
        f"{a}/one.sql",                           # not a dump file
        f"{a}/one.sql.enc.partial",
        f"{a}/.sql.enc",
        f"{a}/on e.sql.enc",
        a,
        str(tmp_path / "agent.json"),
        "/etc/passwd",
        "",
        None,
        42,
        ["x"],
    ]


def test_only_the_tenants_own_dump_files_can_be_named(tmp_path):
    one = _dump(tmp_path, A, "one.sql.enc")
    assert dump_file(tmp_path, A, str(one)) == one
    for path in _refused(tmp_path):
        with pytest.raises(AgentError, match="not a dump file of " + A.schema) as caught:
            dump_file(tmp_path, A, path)
        assert caught.value.kind == FailureKind.INVALID


def test_removal_checks_every_path_first_and_reports_missing_files(tmp_path):
    one = _dump(tmp_path, A, "one.sql.enc")
    two = _dump(tmp_path, A, "two.sql.enc")
    other = _dump(tmp_path, B, "kept.sql.enc")
    with pytest.raises(AgentError):
        remove_files(tmp_path, A, [str(one), str(other)])
    assert one.exists() and other.exists()
    gone = str(tenant_dumps(tmp_path, A) / "gone.sql.enc")
    assert stat_files(tmp_path, A, [str(two), gone]) == {"files": [
        {"path": str(two), "exists": True, "bytes": len(b"FLUXDUMP...")},
        {"path": gone, "exists": False, "bytes": None}]}
    assert remove_files(tmp_path, A, [str(one), gone, str(two)]) == {"removed": [str(one), str(two)],
                                                                       "missing": [gone]}
    assert not one.exists() and not two.exists() and other.exists()


def _job(kind: str, state_dir: pathlib.Path, **params) -> dict:
    """Runs a job as the agent does: params checked against the contract, then the kind's handler."""
    result = asyncio.run(handlers.run(kind, {"project_id": A.project_id, "short_id": A.short_id, **params},
                                      job_id="job-1", progress=lambda *a: None, collect_facts=dict, settings={},
                                      gateway=None, state_dir=state_dir))
    return result.to_wire()


def test_the_agents_dump_file_jobs_refuse_paths_outside_the_tenants_directory(tmp_path):
    spool = tmp_path / "spool"
    mine = _dump(spool, A, "mine.sql.enc")
    theirs = _dump(spool, B, "theirs.sql.enc")
    for kind in ("tenant.dump_remove", "tenant.dump_stat"):
        for path in [str(theirs), f"{mine.parent}/../{B.schema}/theirs.sql.enc", str(tmp_path / "agent.json")]:
            with pytest.raises(AgentError) as caught:
                _job(kind, tmp_path, paths=[str(mine), path])
            assert caught.value.kind == FailureKind.INVALID
        with pytest.raises(AgentError, match="paths: expected a list"):
            _job(kind, tmp_path, paths=str(mine))
    assert mine.exists() and theirs.exists()
    assert _job("tenant.dump_stat", tmp_path, paths=[str(mine)])["files"][0]["exists"] is True
    assert _job("tenant.dump_remove", tmp_path, paths=[str(mine)]) == {"removed": [str(mine)], "missing": []}
    assert _job("tenant.dump_remove", tmp_path, paths=[str(mine)]) == {"removed": [], "missing": [str(mine)]}
    assert theirs.exists()


@pytest.mark.parametrize("key", [None, "", "not base64!", base64.b64encode(b"short secret").decode(),
                                 base64.b64encode(b"k" * 33).decode()])
def test_a_dump_without_its_data_key_is_refused_and_the_value_never_echoed(tmp_path, key):
    params = {"name": "x", "expected_bytes": 0, "table_count": 0}
    if key is not None:
        params["dump_key"] = key
    message = "dump_key: missing required key" if key is None else "dump_key must be the base64 of 32 bytes"
    with pytest.raises(AgentError, match=message) as caught:
        _job("tenant.dump", tmp_path, **params)
    assert caught.value.kind == FailureKind.INVALID
    if key:
        assert key not in caught.value.message
    assert not (tmp_path / "spool" / "dumps").exists()


def test_the_retired_retention_setting_still_loads_with_a_warning(tmp_path, caplog):
    (tmp_path / "settings.json").write_text(json.dumps(
        {"db": {"shared_cluster_url": "postgresql://x@127.0.0.1/db", "dump_retention_days": 7}}))
    with caplog.at_level(logging.WARNING):
        settings = load(StateDir(tmp_path))
    assert settings["db"].shared_cluster_url == "postgresql://x@127.0.0.1/db"
    assert "db.dump_retention_days is no longer used" in caplog.text


def test_db_settings_must_be_an_object(tmp_path):
    (tmp_path / "settings.json").write_text(json.dumps({"db": ["shared_cluster_url"]}))
    with pytest.raises(AgentError, match="db must be an object"):
        load(StateDir(tmp_path))
