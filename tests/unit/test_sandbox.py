"""Tenant SQL parsed in a child process: a parser crash or a runaway parse is a refusal, never the agent's end."""

import os

import pytest

from agent.errors import AgentError
from agent.domain.sandbox import ChildLimits, rewrite_files
from contract.failures import FailureKind

SCHEMA, ROLE = "t_0123456789ab_api", "t_0123456789ab_role"
# ~200 KB: the parser recurses once per term and crashes the process that runs it.
CRASHER = "SELECT " + "+".join(["1"] * 100_000) + ";"


def test_files_are_rewritten_in_the_child():
    out = rewrite_files([("001_a.sql", "create table public.a (id int)"), ("002_b.sql", "select 1")], SCHEMA, ROLE)
    assert [r.sql for r in out] == [f"CREATE TABLE {SCHEMA}.a (id integer);\n", "select 1;\n"]
    assert out[0].tables_moved == 1


def test_a_parser_crash_is_a_refusal_naming_the_file():
    pid = os.getpid()
    with pytest.raises(AgentError, match=r"^002_hostile.sql: SQL is too large or too deeply nested") as refused:
        rewrite_files([("001_ok.sql", "select 1"), ("002_hostile.sql", CRASHER), ("003_ok.sql", "select 2")],
                      SCHEMA, ROLE)
    assert refused.value.kind is FailureKind.INVALID
    assert os.getpid() == pid


def test_rewrite_refusals_come_back_as_invalid():
    with pytest.raises(AgentError, match=r"^007_bad.sql: SET ROLE is not allowed") as refused:
        rewrite_files([("007_bad.sql", "SET ROLE postgres")], SCHEMA, ROLE)
    assert refused.value.kind is FailureKind.INVALID


def test_a_parse_past_its_time_is_refused():
    many = "".join(f"insert into public.t values ({i}, 'x');\n" for i in range(20_000))
    with pytest.raises(AgentError, match=r"^slow.sql: .*took longer than") as refused:
        rewrite_files([("slow.sql", many)], SCHEMA, ROLE, child=ChildLimits(base_seconds=0.3, seconds_per_mib=0))
    assert refused.value.kind is FailureKind.INVALID


def test_a_parse_past_its_memory_is_refused():
    many = "".join(f"insert into public.t values ({i}, 'x');\n" for i in range(20_000))
    with pytest.raises(AgentError, match=r"^huge.sql: .*(needs more than 60 MiB|exited|crashed)") as refused:
        rewrite_files([("huge.sql", many)], SCHEMA, ROLE, child=ChildLimits(memory_bytes=60 * 1024 * 1024))
    assert refused.value.kind is FailureKind.INVALID


def test_expressions_as_deep_as_allowed_are_rewritten():
    text = "create view public.v as select " + "+".join(["1"] * 480) + " as n from public.t"
    assert rewrite_files([("001_deep.sql", text)], SCHEMA, ROLE)[0].views_moved == 1
