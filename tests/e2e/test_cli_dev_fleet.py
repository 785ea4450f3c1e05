"""Whole flows through the `flux` CLI on a local fleet started by `flux dev up`."""

import json
import os
import pathlib
import shutil
import signal
import stat

import pytest

from tests.support import pid_alive, run, script

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    env = {"FLUX_CONFIG_DIR": str(tmp_path / "cfg")}
    directory = tmp_path / "dev"

    def flux(*args, check=True):
        return run(script("flux"), *args, env=env, check=check, timeout=180)

    up = flux("dev", "up", "--dir", str(directory), "--json")
    yield flux, json.loads(up.stdout), directory, env
    # Stacks live in the Docker engine, which outlives the fleet: delete every project.
    for project in json.loads(flux("list", "--json").stdout):
        flux("delete", "-p", project["slug"], "--hash", project["hash"], "--yes", "--skip-backup-check")
    flux("dev", "down", "--dir", str(directory))
    remove_dev_data(directory)


def remove_dev_data(directory):
    state = json.loads((directory / "dev.json").read_text())
    for cluster in state["clusters"].values():
        shutil.rmtree(pathlib.Path(cluster["datadir"]).parent, ignore_errors=True)


def test_dev_up_starts_a_fleet_the_cli_can_use(fleet):
    flux, info, directory, env = fleet
    tmp_path = directory.parent
    assert info["api_base"].endswith("/api")
    assert info["token"].startswith("flx_live_")
    assert info["dir"] == str(directory)
    for key in ("http", "grpc", "enroll", "catalog"):
        assert info[key].startswith("127.0.0.1:")

    config = tmp_path / "cfg" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"api_base": info["api_base"], "token": info["token"]}

    listed = json.loads(flux("agents", "list", "--json").stdout)
    assert [(a["name"], a["roles"], a["connected"]) for a in listed] == [
        ("dev-backup", ["backup"], True), ("dev-db", ["db"], True), ("dev-docker", ["docker"], True),
        ("dev-gateway", ["gateway"], True)]
    docker_facts = next(a for a in listed if a["name"] == "dev-docker")["facts"]
    assert docker_facts["tools"]["docker"]
    assert "dev-gateway" in flux("agents", "list").stdout

    ping = json.loads(flux("agents", "ping", "dev-db", "--json").stdout)
    assert ping["rtt_ms"] > 0

    token = flux("agents", "token", "--roles", "docker", "--ttl", "10m")
    assert "flux-agent enroll --controller" in token.stdout and "--roles docker" in token.stdout
    # The whole install for the new host: the package, enrolling as its user, the role's drop-in.
    assert "apt install ./flux-agent_" in token.stdout and "runuser -u flux-agent --" in token.stdout
    assert "/usr/share/flux-agent/systemd/docker.conf" in token.stdout
    assert "gateway.conf" not in token.stdout and "systemctl enable --now flux-agent" in token.stdout

    shown = flux("dev", "up", "--dir", str(directory)).stdout
    for key in ("api_base", "gateway_url", "base_domain", "gateway_ca", "token", "metrics controller",
                "metrics dev-db"):
        assert key in shown
    again = json.loads(flux("dev", "up", "--dir", str(directory), "--json").stdout)
    assert set(again["reused"]) == {"catalog cluster", "shared cluster", "docker engine", "controller", "dev-db",
                                    "dev-gateway", "dev-docker", "dev-backup", "pooled-postgrest"}
    assert again["token"] == info["token"]


def test_login_verifies_and_stores_the_token(fleet):
    flux, info, directory, env = fleet
    tmp_path = directory.parent
    (tmp_path / "cfg" / "config.json").unlink()

    bad = flux("login", "--token", "flx_live_" + "0" * 32 + "_0000", "--api-base", info["api_base"], check=False)
    assert bad.returncode == 1 and "Unauthorized" in bad.stderr
    assert not (tmp_path / "cfg" / "config.json").exists()

    malformed = flux("login", "--token", "hunter2", "--api-base", info["api_base"], check=False)
    assert malformed.returncode == 2 and "not a Flux API token" in malformed.stderr

    ok = flux("login", "--token", info["token"], "--api-base", info["api_base"].removesuffix("/api"), "--json")
    assert json.loads(ok.stdout)["user"] == "admin"
    saved = json.loads((tmp_path / "cfg" / "config.json").read_text())
    assert saved == {"api_base": info["api_base"], "token": info["token"]}

    # The environment wins over the stored file.
    wrong = run(script("flux"), "agents", "list", check=False,
                env={**env, "FLUX_API_TOKEN": "flx_live_" + "1" * 32 + "_1111"})
    assert wrong.returncode == 1 and "Unauthorized" in wrong.stderr


def test_cli_errors_are_one_line(fleet):
    flux, *_ = fleet
    missing = flux("agents", "ping", "nobody", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: no agent named nobody"
    usage = flux("agents", "token", "--roles", "db", "--ttl", "soon", check=False)
    assert usage.returncode == 2 and "not a duration" in usage.stderr


def test_dev_down_stops_everything(tmp_path):
    env = {"FLUX_CONFIG_DIR": str(tmp_path / "cfg")}
    directory = tmp_path / "dev"
    run(script("flux"), "dev", "up", "--dir", str(directory), "--json", env=env, timeout=180)
    state = json.loads((directory / "dev.json").read_text())
    pids = list(state["pids"].values())
    caddy_pid = int((directory / "agents" / "dev-gateway" / "caddy.pid").read_text())
    # A dedicated project's stack is the fleet's too: down stops it, and up starts it again.
    api = {"FLUX_API_BASE": f"http://127.0.0.1:{state['ports']['http']}/api",
           "FLUX_API_TOKEN": state["token"], **env}
    created = json.loads(run(script("flux"), "create", "Down Stack", "--mode", "v1_dedicated", "--json",
                             env=api, timeout=300).stdout)
    hash_ = created["summary"]["hash"]

    def stack_states() -> set:
        out = run("docker", "ps", "-a", "--filter", f"label=flux.hash={hash_}", "--format", "{{.State}}").stdout
        return set(out.split())

    assert stack_states() == {"running"}
    engine_was_running = "dockerd" not in state["pids"]
    down = json.loads(run(script("flux"), "dev", "down", "--dir", str(directory), "--json", env=env).stdout)
    assert {"dev-db", "dev-gateway", "dev-docker", "pooled-postgrest", "controller", "shared cluster",
            "catalog cluster", "2 container(s) of its projects"} <= set(down["stopped"])
    assert not any(pid_alive(pid) for pid in pids + [caddy_pid])
    for cluster in state["clusters"].values():
        assert not os.path.exists(os.path.join(cluster["datadir"], "postmaster.pid"))
    assert stack_states() == {"exited"}
    # An engine it did not start keeps running.
    if engine_was_running:
        assert run("docker", "info", "--format", "{{.ID}}").returncode == 0
    run(script("flux"), "dev", "up", "--dir", str(directory), "--json", env=env, timeout=180)
    try:
        assert stack_states() == {"running"}
    finally:
        run(script("flux"), "delete", "-p", "down-stack", "--hash", hash_, "--yes", "--skip-backup-check", env=api,
            timeout=300, check=False)
        run(script("flux"), "dev", "down", "--dir", str(directory), "--json", env=env)
        remove_dev_data(directory)


def test_projects_through_the_cli(fleet, tmp_path):
    flux, info, directory, env = fleet
    created = json.loads(flux("create", "Bloom Atelier", "--json").stdout)
    slug, hash_ = created["summary"]["slug"], created["summary"]["hash"]
    assert slug == "bloom-atelier" and created["mode"] == "v2_shared"

    table = flux("list").stdout.splitlines()
    assert table[0].split() == ["PROJECT", "HASH", "MODE", "LIFECYCLE", "STATUS", "API", "URL"]
    row = next(line for line in table if line.startswith("bloom-atelier"))
    assert row.split() == [slug, hash_, "v2_shared", "active", "running", created["summary"]["apiUrl"]]

    creds = flux("project", "credentials", slug, "--hash", hash_).stdout
    assert f"FLUX_GATEWAY_JWT_SECRET={created['projectJwtSecret']}" in creds
    assert f"FLUX_URL={created['summary']['apiUrl']}" in creds

    repo = tmp_path / "app"
    (repo / "migrations").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / "flux.json").write_text(json.dumps({"slug": slug, "hash": hash_}))
    (repo / "migrations" / "001_todos.sql").write_text("create table public.todos (id serial primary key, title text);")
    (repo / "migrations" / "002_seed.sql").write_text("insert into todos (title) values ('first');")

    def flux_in_repo(*args, check=True):
        return run(script("flux"), *args, env=env, check=check, cwd=str(repo))

    dry = flux_in_repo("push", "--dry-run").stdout
    assert "Would apply 2 file(s)" in dry
    applied = json.loads(flux_in_repo("push", "--json").stdout)
    assert applied["applied"] == ["001_todos.sql", "002_seed.sql"] and applied["tablesMoved"] == 1
    assert "Nothing to apply" in flux_in_repo("push").stdout

    (repo / "migrations" / "002_seed.sql").write_text("insert into todos (title) values ('edited');")
    conflict = flux_in_repo("push", check=False)
    assert conflict.returncode == 1 and "002_seed.sql" in conflict.stderr and "nothing was applied" in conflict.stderr

    mismatch = flux("push", str(repo / "migrations"), "-p", "other-slug", "--hash", hash_, check=False)
    assert mismatch.returncode == 1 and "does not match" in mismatch.stderr
    unknown = flux("project", "credentials", slug, "--hash", "0000000", check=False)
    assert unknown.returncode == 1 and "Project not found for this hash." in unknown.stderr
    malformed = flux("project", "credentials", slug, "--hash", "XYZ", check=False)
    assert malformed.returncode == 2 and "7 lower-case hex" in malformed.stderr


def test_dev_demo_migrates_bloom_atelier_and_reads_the_same_rows(fleet):
    flux, info, directory, env = fleet
    result = json.loads(flux("dev", "demo", "--dir", str(directory), "--json").stdout)
    assert result["before"] == result["after"] and len(result["after"]) == 2
    row = next(p for p in result["list"] if p["slug"] == "bloom-atelier")
    assert row["mode"] == "v1_dedicated" and row["apiUrl"] == result["project"]["serviceUrl"]
    listed = flux("list").stdout
    assert "bloom-atelier" in listed and "v1_dedicated" in listed
    # It can run again: the previous demo project is replaced.
    again = json.loads(flux("dev", "demo", "--dir", str(directory), "--json").stdout)
    assert again["project"]["hash"] != result["project"]["hash"]
    stale = run("docker", "ps", "-a", "--filter",
                f"label=flux.hash={result['project']['hash']}", "--format", "{{.Names}}")
    assert stale.stdout.strip() == ""


def test_up_replaces_a_controller_that_runs_but_does_not_answer(fleet):
    flux, info, directory, env = fleet
    hung = json.loads((directory / "dev.json").read_text())["pids"]["controller"]
    os.kill(hung, signal.SIGSTOP)  # hung: alive, holding its ports, answering nothing
    try:
        up = json.loads(flux("dev", "up", "--dir", str(directory), "--json").stdout)
    finally:
        if pid_alive(hung):
            os.kill(hung, signal.SIGCONT)
    assert "controller" not in up["reused"]
    now = json.loads((directory / "dev.json").read_text())["pids"]["controller"]
    # The hung one was stopped, not left running beside the new one with no record of it.
    assert now != hung and pid_alive(now) and not pid_alive(hung)
    assert "bloom-atelier" in flux("list").stdout
