"""The pooled engine end to end: projects, push, the gateway (Caddy + forward_auth), maintenance."""

import datetime
import json
import os

import pytest

from tests.support import LocalFleet, app_token

pytestmark = pytest.mark.integration

TODOS = """
create table public.todos (id bigserial primary key, owner text default auth.uid(), title text not null);
alter table public.todos enable row level security;
create policy own on public.todos for all to authenticated using (owner = auth.uid()) with check (owner = auth.uid());
grant select, insert, update, delete on public.todos to authenticated;
grant usage on sequence public.todos_id_seq to authenticated;
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("pooled") / "dev")
    yield fleet
    fleet.close()


def _tenant(fleet, name: str) -> tuple[dict, str]:
    project = fleet.create(name)
    response = fleet.push(project, {"001_todos.sql": TODOS})
    assert response.status_code == 200, response.text
    return project, project["projectJwtSecret"]


def _write(fleet, project, token, title):
    return fleet.gateway("POST", fleet.host(project), "/todos", token, json={"title": title},
                         headers={"Prefer": "return=representation"})


def test_rows_written_and_read_back_through_the_gateway(fleet):
    project, secret = _tenant(fleet, "Rows Demo")
    alice = app_token(secret, sub="alice")
    written = _write(fleet, project, alice, "buy flour")
    assert written.status_code == 201, written.text
    assert written.json()[0]["owner"] == "alice"
    read = fleet.gateway("GET", fleet.host(project), "/todos?select=title", alice)
    assert read.status_code == 200 and read.json() == [{"title": "buy flour"}]
    # Row-level security applies to the tenant's runtime role: another user sees nothing.
    bob = app_token(secret, sub="bob")
    assert fleet.gateway("GET", fleet.host(project), "/todos", bob).json() == []
    # The legacy host form routes too.
    legacy = f"api.{project['summary']['slug']}.{project['summary']['hash']}.{fleet.base_domain}"
    assert fleet.gateway("GET", legacy, "/todos?select=title", alice).json() == [{"title": "buy flour"}]


def test_tenants_are_isolated(fleet):
    a, a_secret = _tenant(fleet, "Tenant A")
    b, b_secret = _tenant(fleet, "Tenant B")
    assert _write(fleet, b, app_token(b_secret, sub="alice"), "b-secret-row").status_code == 201
    a_token = app_token(a_secret, sub="alice")

    on_b = fleet.gateway("GET", fleet.host(b), "/todos", a_token)
    assert on_b.status_code == 401 and "error" in on_b.json()

    b_schema = fleet.api("GET", f"projects/{b['summary']['hash']}").json()["apiSchema"]
    spoofed = fleet.gateway("GET", fleet.host(a), "/todos", a_token, headers={"Accept-Profile": b_schema})
    assert "b-secret-row" not in spoofed.text
    spoofed_write = fleet.gateway("POST", fleet.host(a), "/todos", a_token, json={"title": "planted"},
                                  headers={"Content-Profile": b_schema})
    assert "b-secret-row" not in spoofed_write.text
    rows = fleet.shared_sql(f'SELECT title FROM "{b_schema}".todos ORDER BY id')
    assert rows == [("b-secret-row",)]
    # A forged role claim does not escape the tenant either.
    forged = app_token(a_secret, sub="alice", role="postgres")
    assert "b-secret-row" not in fleet.gateway("GET", fleet.host(a), "/todos", forged).text


def test_gateway_errors_are_json(fleet):
    project, secret = _tenant(fleet, "Errors Demo")
    # No certificate exists for a host no project has; without SNI the gateway's own one is shown.
    unknown = fleet.gateway("GET", f"api--nope--0000000.{fleet.base_domain}", "/todos", "x", sni=False)
    assert unknown.status_code == 404 and unknown.json() == {"error": "no project at this host"}
    missing = fleet.gateway("GET", fleet.host(project), "/todos")
    assert missing.status_code == 401 and missing.json()["error"] == "missing bearer token"
    bad = fleet.gateway("GET", fleet.host(project), "/todos", app_token("another-secret-of-32-bytes-or-more!!"))
    assert bad.status_code == 401 and bad.json()["error"].startswith("invalid token")
    import jwt
    no_sub = jwt.encode({"name": "x"}, secret, algorithm="HS256")
    assert fleet.gateway("GET", fleet.host(project), "/todos", no_sub).status_code == 401


def test_injection_shaped_input_is_rejected_or_quoted(fleet):
    project = fleet.create("x'; DROP TABLE users; --")
    assert project["summary"]["slug"] == "x-drop-table-users"
    assert fleet.api("GET", "projects/abc'--1").status_code == 400
    assert fleet.api("GET", "projects/abc%27--").status_code == 400
    bad = fleet.api("POST", "push", {"slug": "x-drop-table-users'; --", "hash": project["summary"]["hash"],
                                     "sql": "select 1"})
    assert bad.status_code == 400 and "does not match" in bad.json()["error"]
    response = fleet.push(project, {"001_todos.sql": TODOS})
    assert response.status_code == 200
    token = app_token(project["projectJwtSecret"])
    assert _write(fleet, project, token, "it's fine").status_code == 201
    quoted = fleet.gateway("GET", fleet.host(project), "/todos?title=eq.' or 1=1 --", token)
    assert quoted.status_code == 200 and quoted.json() == []
    bad_column = fleet.gateway("GET", fleet.host(project), '/todos?select=title";drop table x;--', token)
    assert bad_column.status_code == 400
    assert fleet.gateway("GET", fleet.host(project), "/todos?title=eq.it's fine", token).json()[0]["title"] == "it's fine"


def test_push_applies_once_and_refuses_conflicts_role_changes_and_oversize(fleet):
    project = fleet.create("Push Demo")
    h = project["summary"]["hash"]
    first = fleet.push(project, {"001_todos.sql": TODOS})
    assert first.status_code == 200, first.text
    assert first.json()["applied"] == ["001_todos.sql"] and first.json()["tablesMoved"] == 1

    again = fleet.push(project, {"001_todos.sql": TODOS})
    assert again.status_code == 200 and again.json()["applied"] == [] and again.json()["skipped"] is True

    edited = fleet.push(project, {"001_todos.sql": TODOS + "\n-- edited", "002_more.sql": "create table more (x int);"})
    assert edited.status_code == 409
    assert "001_todos.sql" in edited.json()["error"] and "nothing was applied" in edited.json()["error"]
    ledger = fleet.api("GET", f"projects/{h}/migrations").json()["applied"]
    assert [m["filename"] for m in ledger] == ["001_todos.sql"]
    assert len(ledger[0]["checksum"]) == 64

    role = fleet.push(project, {"002_more.sql": "create table more (x int);", "003_escape.sql": "SET ROLE postgres;"})
    assert role.status_code == 400 and "SET ROLE is not allowed" in role.json()["error"]
    assert fleet.shared_sql("SELECT to_regclass(%s)", (f"{fleet.api('GET', f'projects/{h}').json()['apiSchema']}.more",)) == [(None,)]

    dry = fleet.push(project, {"002_more.sql": "create table more (x int);"}, dryRun=True)
    assert dry.status_code == 200 and dry.json()["applied"] == ["002_more.sql"] and dry.json()["dryRun"] is True
    assert len(fleet.api("GET", f"projects/{h}/migrations").json()["applied"]) == 1

    oversize = fleet.push(project, {"004_big.sql": "-- " + "x" * (4 * 1024 * 1024)})
    assert oversize.status_code == 413 and "error" in oversize.json()

    other_schema = fleet.push(project, {"002_more.sql": "create table pg_catalog.evil (x int);"})
    assert other_schema.status_code == 400


def test_maintenance_blocks_writes_as_soon_as_it_is_on(fleet):
    project, secret = _tenant(fleet, "Maintenance Demo")
    h = project["summary"]["hash"]
    token = app_token(secret)
    on = fleet.api("POST", f"projects/{h}/maintenance", {"enabled": True})
    assert on.status_code == 200 and on.json()["gateways"] == ["dev-gateway"]
    # No waiting: the call returned after the gateway acknowledged.
    blocked = _write(fleet, project, token, "during")
    assert blocked.status_code == 503
    assert blocked.json() == {"error": "project is migrating; try again later"}
    assert blocked.headers["Retry-After"]
    assert fleet.gateway("GET", fleet.host(project), "/todos", token).status_code == 200

    off = fleet.api("POST", f"projects/{h}/maintenance", {"enabled": False})
    assert off.status_code == 200
    assert _write(fleet, project, token, "after").status_code == 201
    titles = [r["title"] for r in fleet.gateway("GET", fleet.host(project), "/todos", token).json()]
    assert titles == ["after"]


def test_create_failing_midway_leaves_nothing_behind(fleet):
    before = {p["slug"] for p in fleet.api("GET", "list").json()}
    schemas_before = fleet.shared_sql("SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\\_%%'")
    roles_before = fleet.shared_sql("SELECT rolname FROM pg_roles WHERE rolname LIKE 't\\_%%'")
    fleet.stop_process("dev-gateway")
    try:
        failed = fleet.api("POST", "create", {"name": "Doomed"})
        assert failed.status_code == 503, failed.text
        assert "gateway" in failed.json()["error"]
    finally:
        fleet.fleet.up()
    assert {p["slug"] for p in fleet.api("GET", "list").json()} == before
    assert fleet.shared_sql("SELECT nspname FROM pg_namespace WHERE nspname LIKE 't\\_%%'") == schemas_before
    assert fleet.shared_sql("SELECT rolname FROM pg_roles WHERE rolname LIKE 't\\_%%'") == roles_before


def test_gateway_keeps_serving_with_the_controller_down(fleet):
    project, secret = _tenant(fleet, "Controller Down")
    token = app_token(secret)
    assert _write(fleet, project, token, "before").status_code == 201
    fleet.stop_process("controller")
    try:
        assert fleet.gateway("GET", fleet.host(project), "/todos?select=title", token).json() == [{"title": "before"}]
        assert _write(fleet, project, token, "while down").status_code == 201
    finally:
        fleet.fleet.up()
    # `up` returns once the restarted controller has granted the gateway a lease. Its first request,
    # sent as it connected, came before its routes and was refused: it asked again a second later,
    # not a third of a lease (20 s) later.
    returned = datetime.datetime.now()
    said = (fleet.fleet.dir / "logs" / "dev-gateway.log").read_text().splitlines()
    connected = [line for line in said if "connected to the controller at" in line][-1]
    at = datetime.datetime.strptime(connected[:23], "%Y-%m-%d %H:%M:%S,%f")
    assert (returned - at).total_seconds() < 10, connected


def test_projects_of_other_users_are_not_found(fleet):
    project = fleet.create("Private Project")
    other = fleet.add_user("mallory")
    h = project["summary"]["hash"]
    assert fleet.api("GET", "list", token=other).json() == []
    for path in (f"projects/{h}", f"projects/{h}/credentials"):
        response = fleet.api("GET", path, token=other)
        assert response.status_code == 404 and response.json() == {"error": "Project not found for this hash."}
    pushed = fleet.push(project, {"001.sql": "create table x (i int);"}, token=other)
    assert pushed.status_code == 404


def test_duplicate_names_conflict_and_credentials_show_the_secret(fleet):
    project = fleet.create("Twin")
    assert fleet.api("POST", "create", {"name": "twin"}).status_code == 409
    creds = fleet.api("GET", f"projects/{project['summary']['hash']}/credentials").json()
    assert creds["mode"] == "v2_shared"
    assert creds["projectJwtSecret"] == project["projectJwtSecret"]
    assert len(creds["projectJwtSecret"]) >= 43
    listed = next(p for p in fleet.api("GET", "list").json() if p["slug"] == "twin")
    assert listed["mode"] == "v2_shared" and listed["status"] == "running"
    assert listed["apiUrl"] == f"https://api--twin--{project['summary']['hash']}.{fleet.base_domain}"
    # The secret is sealed at rest, never stored in the clear.
    assert project["projectJwtSecret"] not in str(fleet.api("GET", "list").json())


def test_a_connection_header_cannot_unpin_the_profile(fleet):
    # Another tenant first, so the API's default schema (used when no profile arrives) is not ours.
    _tenant(fleet, "Hop Decoy")
    project, secret = _tenant(fleet, "Hop By Hop")
    schema = fleet.api("GET", f"projects/{project['summary']['hash']}").json()["apiSchema"]
    token = app_token(secret)
    assert _write(fleet, project, token, "mine").status_code == 201
    # Caddy drops the headers a client's Connection names; the pinned profile must not be one.
    for named in ("Accept-Profile", "Accept-Profile, Content-Profile", "X-Flux-Profile"):
        read = fleet.gateway("GET", fleet.host(project), "/todos?select=title", token,
                             headers={"Connection": named})
        assert read.status_code == 200 and read.json() == [{"title": "mine"}], (named, read.text)
        assert read.headers["Content-Profile"] == schema
    written = fleet.gateway("POST", fleet.host(project), "/todos", token, json={"title": "via connection"},
                            headers={"Connection": "Content-Profile", "Prefer": "return=representation"})
    assert written.status_code == 201, written.text
    assert written.headers["Content-Profile"] == schema
    assert ("via connection",) in fleet.shared_sql(f'SELECT title FROM "{schema}".todos')


def test_tokens_must_expire_within_the_gateways_maximum(fleet):
    import time

    import jwt

    project, secret = _tenant(fleet, "Token Lifetimes")
    never = jwt.encode({"sub": "alice"}, secret, algorithm="HS256")
    refused = fleet.gateway("GET", fleet.host(project), "/todos", never)
    assert refused.status_code == 401 and "exp" in refused.json()["error"]
    now = int(time.time())
    ten_years = jwt.encode({"sub": "alice", "iat": now, "exp": now + 10 * 365 * 24 * 3600}, secret, algorithm="HS256")
    assert fleet.gateway("GET", fleet.host(project), "/todos", ten_years).status_code == 401
    assert fleet.gateway("GET", fleet.host(project), "/todos", app_token(secret)).status_code == 200


def test_caddys_admin_api_is_on_a_private_unix_socket(fleet):
    import socket
    import stat

    settings = json.loads((fleet.fleet.dir / "agents" / "dev-gateway" / "settings.json").read_text())
    path = settings["gateway"]["caddy_admin"]
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and not mode & 0o002
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"GET /config/admin HTTP/1.1\r\nHost: \r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert b" 200 " in answer.split(b"\r\n", 1)[0] and f"unix/{path}".encode() in answer
    # Nothing answers Caddy's admin API on the old TCP port.
    assert "caddy_admin" not in fleet.fleet.ports
