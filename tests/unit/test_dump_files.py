"""Dump files in a db agent's spool: one directory per tenant, pruned by age, removed with the tenant."""

import json
import os
import time

import pytest

from agent.runtime.config import StateDir
from agent.adapters.dumps import prune_dumps, remove_dumps, tenant_dumps
from agent.errors import AgentError
from agent.runtime.settings import load
from agent.adapters.tenants import Tenant

A = Tenant("0a0a0a0a-0000-4000-8000-000000000001", "0a0a0a0a0000")
B = Tenant("0b0b0b0b-0000-4000-8000-000000000002", "0b0b0b0b0000")


def _dump(spool, tenant, name: str, age_s: float = 0):
    directory = tenant_dumps(spool, tenant)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("-- dump\n")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_old_dumps_are_pruned_and_new_ones_kept(tmp_path):
    old = _dump(tmp_path, A, "old.sql", age_s=8 * 86400)
    partial = _dump(tmp_path, B, "stopped.sql.partial", age_s=9 * 86400)
    fresh = _dump(tmp_path, A, "fresh.sql", age_s=3600)
    assert sorted(prune_dumps(tmp_path, 7 * 86400)) == ["old.sql", "stopped.sql.partial"]
    assert not old.exists() and not partial.exists() and fresh.exists()


def test_dumps_go_with_their_tenant_only(tmp_path):
    _dump(tmp_path, A, "one.sql")
    _dump(tmp_path, A, "two.sql")
    other = _dump(tmp_path, B, "kept.sql")
    assert remove_dumps(tmp_path, A) == 2
    assert not tenant_dumps(tmp_path, A).exists() and other.exists()
    assert remove_dumps(tmp_path, A) == 0


@pytest.mark.parametrize("value", [-1, "7", True, None])
def test_a_bad_retention_is_refused_naming_the_field(tmp_path, value):
    (tmp_path / "settings.json").write_text(json.dumps(
        {"db": {"shared_cluster_url": "postgresql://x@127.0.0.1/db", "dump_retention_days": value}}))
    with pytest.raises(AgentError, match="db.dump_retention_days"):
        load(StateDir(tmp_path))
