"""A fleet on separate network hosts (`flux dev up --hosts`): each host a network namespace with
its own address, the docker host with its own Docker engine. A migrate moves the data from the db
host to the docker host by the docker host's address, with a writer through the gateway host."""

import json
import os
import pathlib
import subprocess
import threading
import time

import pytest

from tests import faults
from tests.integration.test_migrate import FILES, _schema
from tests.support import LocalFleet, app_token, pid_alive
from tests.writer import Writer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("--hosts needs root (network namespaces); these machines run the tests as root")
    fleet = LocalFleet(tmp_path_factory.mktemp("hosts") / "dev", hosts=True)
    yield fleet
    fleet.close()


def _netns_of(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _in_host(fleet, host: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run([*fleet.fleet.hosts.enter(host), *command], capture_output=True, text=True, timeout=60)


def _host_docker(fleet, *args: str) -> str:
    return subprocess.run(["docker", "-H", fleet.info["docker_host_engine"], *args], capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def _postmaster(datadir: str) -> int:
    return int(pathlib.Path(datadir, "postmaster.pid").read_text().split()[0])


def test_each_host_is_a_namespace_of_its_own_with_its_own_address(fleet):
    info = fleet.info
    hosts = {h["name"]: h for h in info["hosts"]}
    assert list(hosts) == ["controller", "db", "docker", "gateway", "backup"]
    addresses = [h["address"] for h in hosts.values()]
    assert len(set(addresses)) == 5 and info["machine"] not in addresses
    assert all(a.startswith(info["subnet"].rsplit(".", 1)[0] + ".") for a in addresses)
    assert info["api_base"].startswith(f"http://{hosts['controller']['address']}:")
    assert info["gateway_url"].startswith(f"https://{hosts['gateway']['address']}:")
    assert info["shared_cluster"].startswith(hosts["db"]["address"] + ":")

    inode = {name: os.stat(f"/run/netns/{h['netns']}").st_ino for name, h in hosts.items()}
    assert len(set(inode.values())) == 5 and _netns_of(os.getpid()) not in inode.values()
    pids = fleet.fleet.state["pids"]
    clusters = fleet.fleet.state["clusters"]
    placed = {"controller": pids["controller"], "catalog cluster": _postmaster(clusters["catalog"]["datadir"]),
              "dev-db": pids["dev-db"], "shared cluster": _postmaster(clusters["shared"]["datadir"]),
              "pooled-postgrest": pids["pooled-postgrest"], "dev-docker": pids["dev-docker"],
              "docker-host-engine": pids["docker-host-engine"], "dev-gateway": pids["dev-gateway"],
              "dev-backup": pids["dev-backup"]}
    where = {name: next(h for h, i in inode.items() if i == _netns_of(pid)) for name, pid in placed.items()}
    assert where == {"controller": "controller", "catalog cluster": "controller", "dev-db": "db",
                     "shared cluster": "db", "pooled-postgrest": "db", "dev-docker": "docker",
                     "docker-host-engine": "docker", "dev-gateway": "gateway", "dev-backup": "backup"}
    # Nothing outside the fleet's bridge is reachable from a host: no default route, and the one
    # link out is the fleet's subnet (the docker host also routes to its engine's own bridges).
    for name in hosts:
        routes = json.loads(_in_host(fleet, name, "ip", "-j", "route").stdout)
        assert [r["dst"] for r in routes if r["dev"] == "eth0"] == [info["subnet"]], routes
        assert all(r["dst"] != "default" for r in routes), routes
    listed = {a["name"]: a for a in fleet.api("GET", "agents").json()}
    assert all(a["connected"] for a in listed.values()), listed


def test_a_migrate_moves_the_data_from_the_db_host_to_the_docker_host(fleet):
    project = fleet.create("Across Hosts")
    assert fleet.push(project, FILES).status_code == 200
    schema = _schema(fleet, project)
    fleet.shared_sql(f"INSERT INTO {schema}.todos (owner, title) SELECT 'seed', 'seed ' || g"
                     " FROM generate_series(1, 20000) g")
    hosts = {h["name"]: h["address"] for h in fleet.info["hosts"]}
    db_container = f"flux-{project['summary']['hash']}-{project['summary']['slug']}-db"

    # Who the dedicated database sees connecting, sampled while the migrate runs.
    clients: set[str] = set()
    done = threading.Event()

    def sample():
        while not done.is_set():
            out = subprocess.run(["docker", "-H", fleet.info["docker_host_engine"], "exec", db_container, "psql",
                                  "-U", "postgres", "-Atc", "SELECT DISTINCT host(client_addr) FROM pg_stat_activity"
                                  " WHERE client_addr IS NOT NULL"], capture_output=True, text=True)
            clients.update(line for line in out.stdout.split() if line)
            done.wait(0.3)

    writer = Writer(fleet.gateway_port, fleet.info["gateway_ca"], fleet.host(project),
                    app_token(project["projectJwtSecret"], sub="writer"), path="/todos", rate=20,
                    body=lambda i: {"title": f"w{i}"}, address=fleet.gateway_address)
    sampler = threading.Thread(target=sample, daemon=True)
    with writer:
        sampler.start()
        time.sleep(1)
        result = fleet.migrate(project).json()
        time.sleep(1)
    done.set()
    sampler.join(30)
    assert result["state"] == "succeeded", result

    # The stack runs in the docker host's own engine, published on the docker host's address only.
    assert db_container in _host_docker(fleet, "ps", "--format", "{{.Names}}").split()
    machine_engine = subprocess.run(["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True,
                                    text=True, check=True).stdout.split()
    assert db_container not in machine_engine
    [(db_host, db_port)] = fleet.catalog_sql("SELECT db_host, db_port::text FROM projects WHERE hash = %s",
                                             (project["summary"]["hash"],))
    assert db_host == hosts["docker"]
    # From the db host, the database is only at the docker host's address: nothing listens on its own.
    probe = ("import socket, sys\ntry:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()\n"
             " print('open')\nexcept OSError:\n print('closed')")
    assert _in_host(fleet, "db", "python3", "-c", probe, hosts["docker"], db_port).stdout.strip() == "open"
    assert _in_host(fleet, "db", "python3", "-c", probe, "127.0.0.1", db_port).stdout.strip() == "closed"
    # The copy and the sync came from the db host's address.
    assert hosts["db"] in clients, clients

    def dedicated(query: str) -> str:
        return _host_docker(fleet, "exec", db_container, "psql", "-U", "postgres", "-Atc", query)

    titles = set(dedicated(f"SELECT title FROM {schema}.todos WHERE owner = 'writer'").split("\n"))
    acked = {f"w{i}" for i in writer.acked_ids}
    assert len(acked) > 20 and acked <= titles, sorted(acked - titles)[:10]
    assert dedicated(f"SELECT count(*) FROM {schema}.todos WHERE owner = 'seed'") == "20000"
    # And the app reads them through the same Service URL, on the gateway host.
    token = app_token(project["projectJwtSecret"], sub="writer")
    served = fleet.gateway("GET", fleet.host(project), "/todos?select=title", token=token)
    assert served.status_code == 200 and {row["title"] for row in served.json()} >= acked


@pytest.mark.parametrize("case", ["kill-db-agent@sync", "partition-db-docker-5s@sync"])
def test_a_fault_during_a_migrate_ends_well(fleet, case):
    """A few cases of `bench/faults.py`'s matrix (tests/faults.py has the checks)."""
    fault, phase = case.split("@")
    outcome = faults.Matrix(fleet).run(fault, phase)
    assert outcome.hit, outcome.row()
    assert outcome.acked > 20 and outcome.passed, outcome.row()


def test_down_removes_the_hosts_and_leaves_the_machines_engine(fleet):
    hosts = fleet.fleet.hosts
    engine = fleet.fleet.state["pids"]["docker-host-engine"]
    fleet.close()
    assert not pid_alive(engine)
    assert not any(pathlib.Path(f"/run/netns/{hosts.netns(name)}").exists()
                   for name in ("controller", "db", "docker", "gateway", "backup"))
    assert not hosts.exists() and not pathlib.Path("/run/flux-dev", hosts.tag).exists()
    rules = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
    assert f"flux dev {hosts.tag}" not in rules
    assert subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    # The fleet keeps its hosts: the next `up` makes them again.
    assert json.loads((fleet.fleet.dir / "dev.json").read_text())["hosts"]["tag"] == hosts.tag
