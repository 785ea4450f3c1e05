"""A pooled tenant's pushed SQL reaches its own schema and nothing else.

Each attack is pushed the way a customer with an ordinary API token would push it; then the
effect is checked on the cluster and the db host, not just the status code.
"""

import pathlib
import secrets

import pytest

from tests.support import LocalFleet, app_token

pytestmark = pytest.mark.integration

TODOS = """
create table public.todos (id bigserial primary key, owner text default auth.uid(), title text not null);
grant select, insert on public.todos to authenticated;
grant usage on sequence public.todos_id_seq to authenticated;
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("escape") / "dev")
    yield fleet
    fleet.close()


@pytest.fixture(scope="module")
def victim(fleet):
    """Another tenant, with a row the attacker must never read."""
    project = fleet.create("Victim Co")
    assert fleet.push(project, {"001_todos.sql": TODOS}).status_code == 200
    written = fleet.gateway("POST", fleet.host(project), "/todos", app_token(project["projectJwtSecret"]),
                            json={"title": "victim-secret"})
    assert written.status_code == 201, written.text
    return project


def _schema(fleet, project) -> str:
    return fleet.api("GET", f"projects/{project['summary']['hash']}").json()["apiSchema"]


def _marker() -> pathlib.Path:
    return pathlib.Path("/tmp") / f"flux-escape-{secrets.token_hex(6)}"


ESCAPES = {
    "set_config": "SELECT set_config('role', 'none', true);\nCOPY (SELECT 1) TO PROGRAM 'touch {marker}';",
    "reset_role_in_do": "DO $$ BEGIN EXECUTE 'RESET ROLE'; END $$;\nCOPY (SELECT 1) TO PROGRAM 'touch {marker}';",
    "session_authorization": "DO $$ BEGIN EXECUTE 'SET SESSION AUTHORIZATION flux'; END $$;\n"
                             "COPY (SELECT 1) TO PROGRAM 'touch {marker}';",
    "function_set_role": "CREATE FUNCTION public.up() RETURNS void LANGUAGE sql SET role = 'flux'\n"
                         "  AS $f$ COPY (SELECT 1) TO PROGRAM 'touch {marker}' $f$;\nSELECT public.up();",
    "function_set_config": "CREATE FUNCTION public.up() RETURNS void LANGUAGE plpgsql AS $f$\n"
                           "BEGIN PERFORM set_config('role', 'none', true);"
                           " EXECUTE $c$COPY (SELECT 1) TO PROGRAM 'touch {marker}'$c$; END $f$;\nSELECT public.up();",
    "event_trigger": "DO $$ BEGIN EXECUTE 'RESET ROLE'; END $$;\n"
                     "CREATE FUNCTION public.evt() RETURNS event_trigger LANGUAGE plpgsql AS $f$\n"
                     "BEGIN EXECUTE $c$COPY (SELECT 1) TO PROGRAM 'touch {marker}'$c$; END $f$;\n"
                     "CREATE EVENT TRIGGER evt ON ddl_command_end EXECUTE FUNCTION public.evt();\n"
                     "CREATE TABLE public.fires (x int);",
    "default_privileges": "DO $$ BEGIN EXECUTE 'RESET ROLE';"
                          " EXECUTE 'ALTER DEFAULT PRIVILEGES FOR ROLE flux GRANT ALL ON TABLES TO PUBLIC'; END $$;",
    "server_file": "DO $$ BEGIN EXECUTE 'RESET ROLE'; END $$;\n"
                   "CREATE TABLE public.f AS SELECT pg_read_file('/etc/hostname') AS x;\n"
                   "COPY (SELECT 1) TO '{marker}';",
}


@pytest.mark.parametrize("attack", sorted(ESCAPES))
def test_pushed_sql_cannot_leave_the_tenant(fleet, attack):
    project = fleet.create(f"Attacker {attack.replace('_', ' ')}")
    marker = _marker()
    response = fleet.push(project, {"001_escape.sql": ESCAPES[attack].format(marker=marker)})
    assert response.status_code == 400, response.text
    assert "001_escape.sql" in response.json()["error"]
    assert not marker.exists(), f"{attack}: the pushed SQL ran a program on the db host"
    # Nothing of the failed push stayed behind, and no role but the cluster's owner is a superuser.
    schema = _schema(fleet, project)
    assert fleet.shared_sql("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                            " WHERE n.nspname = %s", (schema,)) == [(0,)]
    assert fleet.shared_sql("SELECT rolname FROM pg_roles WHERE rolsuper ORDER BY 1") == [("flux",)]
    assert fleet.shared_sql("SELECT count(*) FROM pg_event_trigger") == [(0,)]
    assert fleet.shared_sql("SELECT count(*) FROM pg_default_acl WHERE defaclrole = 'flux'::regrole") == [(0,)]


def test_push_session_is_the_tenant_and_reaches_nothing_else(fleet, victim):
    project = fleet.create("Curious Tenant")
    victim_schema = _schema(fleet, victim)
    probe = """
    create table public.who as
      select session_user::text as session_role, current_user::text as current_role,
             (select rolsuper from pg_roles where rolname = session_user) as superuser,
             has_schema_privilege('{v}', 'USAGE') as victim_schema,
             has_table_privilege('pg_authid', 'SELECT') as authid,
             has_database_privilege(current_database(), 'CREATE') as create_db,
             has_database_privilege(current_database(), 'TEMP') as temp,
             (select count(*) from flux.flux_migrations) as ledger_rows_seen;
    """.format(v=victim_schema)
    response = fleet.push(project, {"001_who.sql": probe})
    assert response.status_code == 200, response.text
    schema = _schema(fleet, project)
    short = schema.removeprefix("t_").removesuffix("_api")
    row = fleet.shared_sql(f'SELECT * FROM "{schema}".who')[0]
    assert row == (f"t_{short}_ddl", f"t_{short}_ddl", False, False, False, False, False, 0)

    for attack in (f'select * from "{victim_schema}".todos', "select * from pg_authid",
                   "create schema elsewhere", "create temp table scratch (x int)", "set role flux"):
        refused = fleet.push(project, {"002_attack.sql": attack + ";"})
        assert refused.status_code == 400, (attack, refused.text)
    # Older PostgreSQL releases let a session user grant its own role; refused or taken back, none stays.
    fleet.push(project, {"003_share.sql": f"grant t_{short}_ddl to authenticator, t_{short}_role;"})
    assert fleet.shared_sql("SELECT count(*) FROM pg_auth_members WHERE roleid = %s::regrole",
                            (f"t_{short}_ddl",)) == [(0,)]
    # Its own ledger holds its own file only; the victim's row is untouched and unread.
    ledger = fleet.api("GET", f"projects/{project['summary']['hash']}/migrations").json()["applied"]
    assert [m["filename"] for m in ledger][:1] == ["001_who.sql"]
    assert fleet.shared_sql(f'SELECT title FROM "{victim_schema}".todos') == [("victim-secret",)]


def test_pooled_api_login_can_become_only_runtime_roles_and_anon(fleet, victim):
    granted = [r[0] for r in fleet.shared_sql(
        "SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
        " WHERE m.member = 'authenticator'::regrole ORDER BY 1")]
    assert "anon" in granted and len(granted) >= 2
    for role in granted:
        assert role == "anon" or (role.startswith("t_") and role.endswith("_role")), granted
    # anon holds nothing in any tenant schema.
    assert fleet.shared_sql(
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 't\\_%%\\_api'"
        " AND has_schema_privilege('anon', oid, 'USAGE')") == [(0,)]
    owners = fleet.shared_sql("SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
                              " FROM pg_roles WHERE rolname LIKE 't\\_%%\\_ddl'")
    assert owners and all(not any(flags) for _, *flags in owners)


def test_agent_survives_the_attacks_and_serves_other_tenants(fleet, victim):
    fleet.push(fleet.create("One More Attacker"), {"001_x.sql": ESCAPES["set_config"].format(marker=_marker())})
    db_agent = next(a for a in fleet.api("GET", "agents").json() if "db" in a["roles"])
    assert db_agent["connected"], db_agent
    project = fleet.create("Honest Tenant")
    response = fleet.push(project, {"001_todos.sql": TODOS})
    assert response.status_code == 200 and response.json()["applied"] == ["001_todos.sql"], response.text
    token = app_token(project["projectJwtSecret"])
    assert fleet.gateway("POST", fleet.host(project), "/todos", token, json={"title": "ok"}).status_code == 201
    assert fleet.gateway("GET", fleet.host(project), "/todos?select=title", token).json() == [{"title": "ok"}]


def test_sql_that_crashes_the_parser_is_refused_and_the_agent_keeps_serving(fleet):
    from tests.support import pid_alive

    pid = fleet.fleet.state["pids"]["dev-db"]
    project = fleet.create("Parser Crasher")
    crasher = "SELECT " + "+".join(["1"] * 100_000) + ";"
    assert len(crasher) > 190_000
    response = fleet.push(project, {"001_ok.sql": "create table public.a (x int);", "002_deep.sql": crasher})
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("002_deep.sql: SQL is too large or too deeply nested")
    # The db agent is the same process, still connected, and serves another tenant.
    assert pid_alive(pid) and fleet.fleet.state["pids"]["dev-db"] == pid
    agents = {a["name"]: a for a in fleet.api("GET", "agents").json()}
    assert agents["dev-db"]["connected"] is True
    honest = fleet.create("After The Crasher")
    pushed = fleet.push(honest, {"001_todos.sql": TODOS})
    assert pushed.status_code == 200 and pushed.json()["applied"] == ["001_todos.sql"], pushed.text
    assert fleet.shared_sql("SELECT to_regclass(%s)", (f"{_schema(fleet, project)}.a",)) == [(None,)]
