"""`flux dev up` / `flux dev down`: a whole fleet on this machine, for development and demos.

It starts a catalog PostgreSQL cluster (as the `postgres` user when run as root: the
server refuses root), the controller, and one agent enrolled through a join token like
any other. Every part is reused when it is already running; `down` stops them and keeps
their data, so the next `up` comes back to the same fleet.
"""

import glob
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

from .errors import CliError

STATE_FILE = "dev.json"
AGENT_NAME = "dev-agent"
AGENT_ROLES = "db"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bindir() -> pathlib.Path:
    if os.environ.get("FLUX_PG_BINDIR"):
        return pathlib.Path(os.environ["FLUX_PG_BINDIR"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return pathlib.Path(found[-1]).parent
    postgres = shutil.which("postgres")
    if postgres:
        return pathlib.Path(postgres).parent
    raise CliError("PostgreSQL server binaries not found; install postgresql (or set FLUX_PG_BINDIR)")


class PostgresCluster:
    """A PostgreSQL cluster on 127.0.0.1, password-authenticated, owned by `postgres` under root."""

    def __init__(self, datadir: pathlib.Path, port: int, password: str, user: str = "flux"):
        self.datadir = datadir
        self.port = port
        self.password = password
        self.user = user
        self.bindir = pg_bindir()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        proc = subprocess.run(command, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise CliError(f"{args[0]} failed: {(proc.stderr or proc.stdout).strip()}")
        return proc

    def _chown(self, path: pathlib.Path) -> None:
        if self.as_postgres:
            shutil.chown(path, "postgres", "postgres")

    @property
    def logfile(self) -> pathlib.Path:
        return self.datadir.parent / (self.datadir.name + ".log")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    def initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self, settings: dict[str, str] | None = None) -> None:
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        self._chown(self.datadir.parent)
        pwfile = self.datadir.parent / f".pw-{secrets.token_hex(4)}"
        pwfile.write_text(self.password + "\n")
        self._chown(pwfile)
        try:
            self._run("initdb", "-D", str(self.datadir), "-U", self.user, "--auth=scram-sha-256",
                      f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)
        conf = {"listen_addresses": "'127.0.0.1'", "port": str(self.port),
                "unix_socket_directories": f"'{self.datadir}'", "max_connections": "200",
                **(settings or {})}
        with open(self.datadir / "postgresql.auto.conf", "a") as handle:
            for key, value in conf.items():
                handle.write(f"{key} = {value}\n")

    def running(self) -> bool:
        return self.initialised() and self._run("pg_ctl", "status", "-D", str(self.datadir),
                                                check=False).returncode == 0

    def start(self) -> None:
        if self.running():
            return
        self.logfile.touch()
        self._chown(self.logfile)
        proc = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.datadir),
                         "-l", str(self.logfile), check=False)
        if proc.returncode != 0:
            raise CliError(f"PostgreSQL did not start; see {self.logfile}")

    def stop(self) -> None:
        if self.running():
            self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.datadir))

    def create_database(self, name: str) -> None:
        env = {**os.environ, "PGPASSWORD": self.password}
        exists = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, "-d", "postgres",
             "-Atc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            capture_output=True, text=True, env=env)
        if exists.returncode != 0:
            raise CliError(f"cannot query the catalog cluster: {exists.stderr.strip()}")
        if exists.stdout.strip() != "1":
            subprocess.run(["createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name],
                           check=True, capture_output=True, env=env)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return True


def spawn(command: list[str], log: pathlib.Path) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def terminate(pid: int | None, timeout: float = 15) -> None:
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def wait_for(check, timeout: float, what: str, log: pathlib.Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    hint = f"; see {log}" if log else ""
    raise CliError(f"{what} did not come up within {timeout:g}s{hint}")


@dataclass
class Progress:
    quiet: bool

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"• {message}", file=sys.stderr, flush=True)


class DevFleet:
    def __init__(self, directory: pathlib.Path, say=None):
        self.dir = directory.expanduser().resolve()
        self.say = say or Progress(quiet=True)
        self.state_path = self.dir / STATE_FILE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.state, handle, indent=2)
        os.replace(tmp, self.state_path)

    def _log(self, name: str) -> pathlib.Path:
        return self.dir / "logs" / f"{name}.log"

    def cluster(self) -> PostgresCluster:
        if "catalog" not in self.state:
            # As root the data must live where the postgres user can reach it.
            if os.geteuid() == 0:
                tag = secrets.token_hex(6)
                datadir = pathlib.Path("/var/lib/postgresql/flux-dev") / tag / "catalog"
            else:
                datadir = self.dir / "pg" / "catalog"
            self.state["catalog"] = {"datadir": str(datadir), "port": free_port(),
                                     "password": secrets.token_urlsafe(24)}
            self._save()
        c = self.state["catalog"]
        return PostgresCluster(pathlib.Path(c["datadir"]), c["port"], c["password"])

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.state['ports']['http']}/api"

    def _verify(self) -> bool:
        try:
            response = httpx.get(f"{self.api_base}/cli/v1/auth/verify", timeout=2,
                                 headers={"Authorization": f"Bearer {self.state.get('token', '')}"})
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _api(self, method: str, path: str, body: dict | None = None):
        response = httpx.request(method, f"{self.api_base}/cli/v1/{path}", json=body, timeout=30,
                                 headers={"Authorization": f"Bearer {self.state['token']}"})
        if response.status_code >= 400:
            raise CliError(f"controller refused {path}: {response.json().get('error')}")
        return response.json()

    def up(self) -> dict:
        reused = []
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state.setdefault("ports", {"http": free_port(), "grpc": free_port(), "enroll": free_port()})
        self._save()

        cluster = self.cluster()
        if cluster.running():
            reused.append("catalog")
        else:
            if not cluster.initialised():
                self.say(f"initialising the catalog cluster in {cluster.datadir}")
                cluster.init()
            self.say(f"starting PostgreSQL on 127.0.0.1:{cluster.port}")
            cluster.start()
        cluster.create_database("flux_catalog")

        controller_dir = self.dir / "controller"
        if "token" not in self.state:
            self.say("initialising the controller")
            init = subprocess.run(
                [sys.executable, "-m", "controller.main", "init", "--catalog-url",
                 cluster.url("flux_catalog"), "--state-dir", str(controller_dir),
                 "--base-domain", "localhost", "--json"], capture_output=True, text=True)
            if init.returncode != 0:
                raise CliError(f"controller init failed: {init.stderr.strip()}")
            result = json.loads(init.stdout)
            if not result["admin_token"]:
                raise CliError(f"{controller_dir} was initialised before but {self.state_path} lost "
                               "its admin token; run `flux dev down` and remove the directory to start over")
            self.state["token"] = result["admin_token"]
            self.state["ca_fingerprint"] = result["ca_fingerprint"]
            self._save()

        ports = self.state["ports"]
        if pid_alive(self.state.get("controller_pid")) and self._verify():
            reused.append("controller")
        else:
            self.say(f"starting the controller (API on 127.0.0.1:{ports['http']})")
            self.state["controller_pid"] = spawn(
                [sys.executable, "-m", "controller.main", "run", "--state-dir", str(controller_dir),
                 "--http-listen", f"127.0.0.1:{ports['http']}",
                 "--grpc-listen", f"127.0.0.1:{ports['grpc']}",
                 "--enroll-listen", f"127.0.0.1:{ports['enroll']}",
                 "--advertise-host", "127.0.0.1"], self._log("controller"))
            self._save()
            wait_for(self._verify, 30, "the controller", self._log("controller"))

        agent_dir = self.dir / "agents" / AGENT_NAME
        if not (agent_dir / "agent.json").exists():
            self.say(f"enrolling agent {AGENT_NAME} with a join token")
            token = self._api("POST", "agents/tokens", {"roles": AGENT_ROLES.split(","), "ttl_seconds": 600})
            enroll = subprocess.run(
                [sys.executable, "-m", "agent.main", "enroll", "--controller", token["enroll_address"],
                 "--token", token["token"], "--name", AGENT_NAME, "--roles", AGENT_ROLES,
                 "--state-dir", str(agent_dir), "--ca-fingerprint", token["ca_fingerprint"]],
                capture_output=True, text=True)
            if enroll.returncode != 0:
                raise CliError(f"agent enrollment failed: {enroll.stderr.strip()}")
        if pid_alive(self.state.get("agent_pid")):
            reused.append("agent")
        else:
            self.say(f"starting agent {AGENT_NAME}")
            self.state["agent_pid"] = spawn(
                [sys.executable, "-m", "agent.main", "run", "--state-dir", str(agent_dir)],
                self._log(AGENT_NAME))
            self._save()

        def agent_connected():
            return any(a["name"] == AGENT_NAME and a["connected"] for a in self._api("GET", "agents"))

        wait_for(agent_connected, 30, f"agent {AGENT_NAME}", self._log(AGENT_NAME))
        return self.describe(reused)

    def describe(self, reused: list[str]) -> dict:
        ports = self.state["ports"]
        return {
            "api_base": self.api_base,
            "token": self.state["token"],
            "dir": str(self.dir),
            "catalog": f"127.0.0.1:{self.state['catalog']['port']}",
            "http": f"127.0.0.1:{ports['http']}",
            "grpc": f"127.0.0.1:{ports['grpc']}",
            "enroll": f"127.0.0.1:{ports['enroll']}",
            "agents": [AGENT_NAME],
            "reused": reused,
            "logs": str(self.dir / "logs"),
        }

    def down(self) -> list[str]:
        if not self.state:
            return []
        stopped = []
        for key, name in (("agent_pid", "agent"), ("controller_pid", "controller")):
            if pid_alive(self.state.get(key)):
                self.say(f"stopping the {name}")
                terminate(self.state[key])
                stopped.append(name)
            self.state.pop(key, None)
        if "catalog" in self.state:
            cluster = self.cluster()
            if cluster.running():
                self.say("stopping the catalog cluster")
                cluster.stop()
                stopped.append("catalog")
        self._save()
        return stopped
