"""Migration SQL made to run in a pooled tenant schema."""

import pytest

from agent.domain.sqlrewrite import RewriteError, rewrite

SCHEMA, ROLE = "t_0123456789ab_api", "t_0123456789ab_role"


def test_objects_aimed_at_public_land_in_the_tenant_schema():
    out = rewrite("CREATE TABLE public.todos (id int); CREATE SEQUENCE public.s; "
                  "CREATE VIEW public.v AS SELECT * FROM public.todos; "
                  "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS $$ select 1 $$;", SCHEMA, ROLE)
    assert "public." not in out.sql
    assert f"CREATE TABLE {SCHEMA}.todos" in out.sql
    assert f"CREATE FUNCTION {SCHEMA}.f()" in out.sql
    assert (out.tables_moved, out.sequences_moved, out.views_moved) == (1, 1, 1)


def test_grants_and_policies_for_authenticated_apply_to_the_runtime_role():
    out = rewrite("GRANT SELECT ON public.t TO authenticated, anon;"
                  "CREATE POLICY p ON public.t TO authenticated USING (true);", SCHEMA, ROLE)
    assert f"TO {ROLE}, anon" in out.sql
    assert f"TO {ROLE} USING" in out.sql
    assert "authenticated" not in out.sql


def test_statements_needing_no_change_are_kept_as_written():
    text = "create table plain (id   int);\ninsert into plain values (1)"
    assert rewrite(text, SCHEMA, ROLE).sql == "create table plain (id   int);\ninsert into plain values (1);\n"


def test_search_path_to_public_is_pinned_to_the_tenant():
    assert f"'{SCHEMA}'" in rewrite("SET search_path = public", SCHEMA, ROLE).sql


@pytest.mark.parametrize("text, message", [
    ("SET ROLE postgres", "SET ROLE is not allowed"),
    ("set role none", "SET ROLE is not allowed"),
    ("RESET ROLE", "RESET ROLE is not allowed"),
    ("SET SESSION AUTHORIZATION postgres", "SET SESSION AUTHORIZATION is not allowed"),
    ("create table a (i int); COMMIT; create table b (i int)", "transaction control"),
    ("create tabel x", "does not parse"),
])
def test_refusals_name_the_file(text, message):
    with pytest.raises(RewriteError, match=message) as refused:
        rewrite(text, SCHEMA, ROLE, "007_bad.sql")
    assert str(refused.value).startswith("007_bad.sql:")


def test_identifiers_that_only_look_like_public_are_left_alone():
    out = rewrite('CREATE TABLE "Public".t (id int); SELECT \'public.x\';', SCHEMA, ROLE)
    assert '"Public".t' in out.sql and "'public.x'" in out.sql


def test_files_past_the_limits_are_refused_by_name():
    from agent.domain.sqlrewrite import Limits

    with pytest.raises(RewriteError, match=r"^big.sql: 101 bytes; .* at most 100"):
        rewrite("-- " + "x" * 98, SCHEMA, ROLE, "big.sql", Limits(max_bytes=100))
    with pytest.raises(RewriteError, match=r"^many.sql: 4 statements; .* at most 3"):
        rewrite("select 1; select 2; select 3; select 4;", SCHEMA, ROLE, "many.sql", Limits(max_statements=3))


def test_deep_expressions_are_refused_by_name_and_line():
    deep = "select 1;\nselect " + "+".join(["1"] * 2_000) + ";"
    with pytest.raises(RewriteError, match=r"^deep.sql: the statement at line 2 nests deeper than 500"):
        rewrite(deep, SCHEMA, ROLE, "deep.sql")

