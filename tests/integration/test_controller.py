"""The controller process: init, its HTTP API's behaviour, readiness and shutdown."""

import socket
import subprocess
import sys

import psycopg
import pytest

from controller.store import available_migrations
from tests.support import Controller, run

pytestmark = pytest.mark.integration


def test_init_is_idempotent_and_stores_only_token_hashes(tmp_path, catalog_url):
    ctl = Controller(tmp_path / "state", catalog_url)
    first = ctl.init_result
    assert first["changed"] is True
    latest = [m.version for m in available_migrations()]
    assert first["schema_version"] == latest[-1]
    assert first["admin_token"].startswith("flx_live_")
    for name in ("ca.key", "server.key", "master.key", "controller.json"):
        assert (ctl.state_dir / name).stat().st_mode & 0o077 == 0, name

    again = run(sys.executable, "-m", "controller.main", "init", "--catalog-url", catalog_url,
                "--state-dir", str(ctl.state_dir))
    assert "Nothing to do" in again.stdout
    assert "flx_live_" not in again.stdout
    assert ctl.init_result["ca_fingerprint"] in again.stdout

    with psycopg.connect(catalog_url) as conn:
        versions = conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        hashes = [r[0] for r in conn.execute("SELECT token_hash FROM api_tokens").fetchall()]
    assert [v for (v,) in versions] == latest
    assert len(hashes) == 1 and hashes[0] != first["admin_token"] and len(hashes[0]) == 64


def test_init_refuses_a_bad_catalog_url_and_writes_nothing(tmp_path):
    proc = run(sys.executable, "-m", "controller.main", "init", "--catalog-url", "mysql://x",
               "--state-dir", str(tmp_path / "s"), check=False)
    assert proc.returncode == 1
    assert "must be a postgresql:// URL" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_init_never_prints_the_catalog_password(tmp_path, pg_cluster):
    url = pg_cluster.url("no_such_database")
    proc = run(sys.executable, "-m", "controller.main", "init", "--catalog-url", url,
               "--state-dir", str(tmp_path / "s"), check=False)
    assert proc.returncode == 1
    assert "cannot connect to the catalog" in proc.stderr
    assert pg_cluster.password not in proc.stderr + proc.stdout


def test_auth_verify_and_unauthorized(controller):
    ok = controller.api("GET", "auth/verify")
    assert ok.status_code == 200
    assert ok.json() == {"ok": True, "user": "admin", "plan": "pro", "defaultMode": "v2_shared",
                         "cliRole": "admin"}
    for token in (None, "flx_live_" + "0" * 32 + "_0000", "not-a-token"):
        denied = controller.api("GET", "auth/verify", token=token)
        assert denied.status_code == 401
        assert denied.json() == {"error": "Unauthorized"}


def test_every_error_is_json_and_bad_requests_are_4xx(controller):
    unknown_route = controller.api("GET", "no/such/route")
    assert unknown_route.status_code == 404 and "error" in unknown_route.json()

    bad_json = controller.api("POST", "agents/tokens", content=b"{not json",
                              headers={"Content-Type": "application/json",
                                       "Authorization": f"Bearer {controller.token}"}, token=None)
    assert bad_json.status_code == 400 and "error" in bad_json.json()

    bad_role = controller.api("POST", "agents/tokens", {"roles": ["root"]})
    assert bad_role.status_code == 400
    assert bad_role.json()["error"].startswith("unknown role(s) root")

    bad_ttl = controller.api("POST", "agents/tokens", {"roles": ["db"], "ttl_seconds": -5})
    assert bad_ttl.status_code == 400 and "ttl_seconds" in bad_ttl.json()["error"]

    bad_name = controller.api("POST", "agents/Bad_Name/ping")
    assert bad_name.status_code == 400 and "invalid agent name" in bad_name.json()["error"]

    missing = controller.api("POST", "agents/nobody/ping")
    assert missing.status_code == 404 and missing.json() == {"error": "no agent named nobody"}

    bad_kind = controller.api("POST", "agents/nobody/jobs", {"kind": "shell"})
    assert bad_kind.status_code == 404

    wrong_method = controller.api("DELETE", "agents")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_openapi_description_is_published(controller):
    spec = controller.api("GET", "openapi.json", token=None)
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for route in ("auth/verify", "agents", "agents/tokens", "agents/{name}/revoke", "agents/{name}/ping"):
        assert f"/api/cli/v1/{route}" in paths, route


def test_join_token_response(controller):
    token = controller.join_token(["db", "docker"], ttl=120)
    assert token["token"].startswith("flx_join_")
    assert token["roles"] == ["db", "docker"]
    assert token["ca_fingerprint"] == controller.ca_fingerprint
    assert token["enroll_address"] == f"127.0.0.1:{controller.ports['enroll']}"


def test_run_tells_systemd_it_is_ready_and_stops_cleanly_on_sigterm(tmp_path, catalog_url):
    notify_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(30)
        ctl = Controller(tmp_path / "state", catalog_url).start(env={"NOTIFY_SOCKET": notify_path})
        assert "READY=1" in notify.recv(4096).decode()
        assert ctl.stop() == 0
        assert "STOPPING=1" in notify.recv(4096).decode()


def test_run_refuses_a_state_dir_that_was_never_initialised(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "controller.main", "run", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "run `flux-controller init" in proc.stderr
