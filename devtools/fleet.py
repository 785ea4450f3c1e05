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
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import psycopg

from agent.adapters.plainhttp import NO_TLS
from agent.adapters.ports import free_port
from cli.errors import CliError

from .hosts import Hosts, free_subnet

STATE_FILE = "dev.json"


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


# An online migrate reads tenants' changes from logical slots; a slot never keeps more WAL than this.
SHARED_CLUSTER_SETTINGS = {"wal_level": "logical", "max_slot_wal_keep_size": "'4GB'"}


class PostgresCluster:
    """A PostgreSQL cluster, password-authenticated, owned by `postgres` under root.

    It listens on 127.0.0.1 of its host; on a separate network host (`enter` is the command
    prefix that runs a program there) it also listens on `host`, the host's own address, and
    accepts clients of `subnet`."""

    def __init__(self, datadir: pathlib.Path, port: int, password: str, user: str = "flux",
                 host: str = "127.0.0.1", enter: list[str] | None = None, subnet: str | None = None):
        self.datadir = datadir
        self.port = port
        self.password = password
        self.user = user
        self.host = host
        self.enter = enter or []
        self.subnet = subnet
        self.bindir = pg_bindir()
        self.as_postgres = os.geteuid() == 0

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        command = [*self.enter, *command]
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
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{dbname}"

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
        listen = "127.0.0.1" if self.host == "127.0.0.1" else f"127.0.0.1,{self.host}"
        conf = {"listen_addresses": f"'{listen}'", "port": str(self.port),
                "unix_socket_directories": f"'{self.datadir}'", "max_connections": "200",
                **(settings or {})}
        with open(self.datadir / "postgresql.auto.conf", "a") as handle:
            for key, value in conf.items():
                handle.write(f"{key} = {value}\n")
        if self.subnet:
            with open(self.datadir / "pg_hba.conf", "a") as handle:
                handle.write(f"host all all {self.subnet} scram-sha-256\n")

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
            ["psql", "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres",
             "-Atc", f"SELECT 1 FROM pg_database WHERE datname = '{name}'"],
            capture_output=True, text=True, env=env)
        if exists.returncode != 0:
            raise CliError(f"cannot query the catalog cluster: {exists.stderr.strip()}")
        if exists.stdout.strip() != "1":
            subprocess.run(["createdb", "-h", self.host, "-p", str(self.port), "-U", self.user, name],
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


def spawn(command: list[str], log: pathlib.Path, env: dict | None = None) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})
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


def wait_for(check, timeout: float, what: str, log: pathlib.Path | None = None, pid: int | None = None):
    """Until check() answers; `pid` is the process that should make it so: when that process
    has exited, waiting longer cannot help, so it says so at once."""
    hint = f"; see {log}" if log else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        if pid is not None and not pid_alive(pid):
            raise CliError(f"{what} exited before it came up{hint}")
        time.sleep(0.2)
    raise CliError(f"{what} did not come up within {timeout:g}s{hint}")


@dataclass
class Progress:
    quiet: bool

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"• {message}", file=sys.stderr, flush=True)


PACKAGING = pathlib.Path(__file__).resolve().parents[1] / "packaging"
STANDIN = PACKAGING / "images" / "postgrest-standin" / "postgrest_standin.py"
IMAGE_BUILDER = PACKAGING / "images" / "build.py"
# Each agent's roles; with --hosts, the role names the host it runs on too.
AGENTS = {"dev-db": "db", "dev-gateway": "gateway", "dev-docker": "docker", "dev-backup": "backup"}
# Prometheus metrics: the controller's and each agent's, on a port of their own.
METRICS = ("controller", *AGENTS)
PORTS = ("http", "grpc", "enroll", "gateway", "forward_auth", "pool_api", "pool_admin",
         *(f"metrics_{name}" for name in METRICS))
CLUSTER_HOSTS = {"catalog": "controller", "shared": "db"}
# How long `up` gives a running controller to answer before it takes it for hung and replaces it.
CONTROLLER_ANSWER_S = 10
HOST_RUNS = {"controller": ["controller", "catalog cluster"],
             "db": ["dev-db", "shared cluster", "pooled-postgrest"],
             "docker": ["dev-docker", "its own Docker engine (dockerd, containerd)"],
             "gateway": ["dev-gateway", "caddy"],
             "backup": ["dev-backup"]}
# The stand-in image has Python, not curl: its health check asks PostgREST's port with it.
STANDIN_HEALTHCHECK = ["CMD", "python3", "-c",
                       "import socket; socket.create_connection(('127.0.0.1', 3000), 2).close()"]


def docker_running() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True).returncode == 0


def install_packages(packages: list[str], say) -> None:
    if os.geteuid() != 0:
        raise CliError(f"missing {', '.join(packages)}; install them (as root: apt-get install -y {' '.join(packages)})")
    say(f"installing {', '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, env=env)
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", *packages], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise CliError(f"apt-get install {' '.join(packages)} failed: {proc.stderr.strip()[-500:]}")


class DevFleet:
    def __init__(self, directory: pathlib.Path, say=None, hosts: bool = False,
                 agent_settings: dict[str, dict] | None = None, controller_args: tuple[str, ...] = ()):
        """`agent_settings`: settings by role ({"db": {"drop_lock_timeout": "3s"}}) written over
        the fleet's own into each agent's settings.json at every `up`. `controller_args`: added to
        `flux-controller run` when `up` starts the controller (("--gateway-lease-seconds", "15"))."""
        self.dir = directory.expanduser().resolve()
        self.agent_settings = agent_settings or {}
        self.controller_args = tuple(controller_args)
        self.say = say or Progress(quiet=True)
        self.state_path = self.dir / STATE_FILE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        if hosts and "hosts" not in self.state:
            if self.state.get("clusters"):
                raise CliError(f"the fleet in {self.dir} runs on this machine's loopback, not on separate "
                               "hosts; use another --dir for --hosts")
            if os.geteuid() != 0:
                raise CliError("--hosts needs root: it creates network namespaces and a bridge")
            self.state["hosts"] = {"tag": self.state.setdefault("tag", secrets.token_hex(6))[:6],
                                   "subnet": free_subnet()}
        # A fleet made with --hosts stays on its hosts.
        self.hosts = Hosts(**self.state["hosts"]) if "hosts" in self.state else None

    def _enter(self, host: str) -> list[str]:
        """The command prefix that runs a program on `host` (nothing on a one-host fleet)."""
        return self.hosts.enter(host) if self.hosts else []

    def _address(self, host: str) -> str:
        return self.hosts.address(host) if self.hosts else "127.0.0.1"

    def _save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.state, handle, indent=2)
        os.replace(tmp, self.state_path)

    def _log(self, name: str) -> pathlib.Path:
        return self.dir / "logs" / f"{name}.log"

    def _secret(self, key: str) -> str:
        secrets_ = self.state.setdefault("secrets", {})
        if key not in secrets_:
            secrets_[key] = secrets.token_urlsafe(32)
            self._save()
        return secrets_[key]

    def cluster(self, role: str) -> PostgresCluster:
        """The `catalog` or the `shared` PostgreSQL cluster of this fleet."""
        clusters = self.state.setdefault("clusters", {})
        if role not in clusters:
            # As root the data must live where the postgres user can reach it.
            if os.geteuid() == 0:
                base = pathlib.Path("/var/lib/postgresql/flux-dev") / self.state.setdefault("tag", secrets.token_hex(6))
            else:
                base = self.dir / "pg"
            clusters[role] = {"datadir": str(base / role), "port": free_port(),
                              "password": secrets.token_urlsafe(24)}
            self._save()
        c = clusters[role]
        host = CLUSTER_HOSTS[role]
        return PostgresCluster(pathlib.Path(c["datadir"]), c["port"], c["password"], host=self._address(host),
                               enter=self._enter(host), subnet=self.hosts.subnet if self.hosts else None)

    @property
    def ports(self) -> dict:
        return self.state["ports"]

    @property
    def api_base(self) -> str:
        return f"http://{self._address('controller')}:{self.ports['http']}/api"

    def _verify(self) -> bool:
        try:
            response = httpx.get(f"{self.api_base}/cli/v1/auth/verify", timeout=2, verify=NO_TLS,
                                 headers={"Authorization": f"Bearer {self.state.get('token', '')}"})
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def _controller_answers(self) -> bool:
        """Whether the recorded controller runs and answers, given CONTROLLER_ANSWER_S to (it may
        be taking its lease again, or its catalog may just be back)."""
        pid = self.state.get("pids", {}).get("controller")
        if not pid_alive(pid):
            return False
        try:
            wait_for(self._verify, CONTROLLER_ANSWER_S, "the controller", pid=pid)
        except CliError:
            return False
        return True

    def _api(self, method: str, path: str, body: dict | None = None):
        deadline = time.monotonic() + 15
        while True:
            response = httpx.request(method, f"{self.api_base}/cli/v1/{path}", json=body, timeout=30, verify=NO_TLS,
                                     headers={"Authorization": f"Bearer {self.state['token']}"})
            # 503: the controller is coming back (its catalog, or its lease as the leader).
            if response.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if response.status_code >= 400:
            raise CliError(f"controller refused {path}: {response.json().get('error')}")
        return response.json()

    def _pid(self, key: str) -> int | None:
        return self.state.get("pids", {}).get(key)

    def _ensure_process(self, key: str, command: list[str], env: dict | None = None, host: str = "") -> bool:
        """Starts a process (on `host`, when the fleet has hosts) unless the one recorded under `key`
        still runs; True when reused."""
        pids = self.state.setdefault("pids", {})
        if pid_alive(pids.get(key)):
            return True
        pids[key] = spawn([*(self._enter(host) if host else []), *command], self._log(key), env)
        self._save()
        return False

    def _start_cluster(self, role: str, database: str, reused: list[str]) -> PostgresCluster:
        cluster = self.cluster(role)
        if cluster.running():
            reused.append(f"{role} cluster")
        else:
            if not cluster.initialised():
                self.say(f"initialising the {role} cluster in {cluster.datadir}")
                cluster.init(SHARED_CLUSTER_SETTINGS if role == "shared" else None)
            self.say(f"starting the {role} PostgreSQL cluster on {cluster.host}:{cluster.port}")
            cluster.start()
        cluster.create_database(database)
        return cluster

    def _ensure_docker(self, reused: list[str]) -> None:
        missing = [pkg for pkg, tool in (("docker.io", "dockerd"), ("debootstrap", "debootstrap"))
                   if shutil.which(tool) is None]
        if missing:
            install_packages(missing, self.say)
        if docker_running():
            reused.append("docker engine")
            return
        self.say("starting the Docker engine")
        self._ensure_process("dockerd", ["dockerd"])
        wait_for(docker_running, 60, "the Docker engine", self._log("dockerd"), self._pid("dockerd"))

    @property
    def _docker_host_run(self) -> pathlib.Path:
        # Short: containerd's socket paths under it must fit a unix socket address.
        return pathlib.Path("/run/flux-dev") / self.hosts.tag

    @property
    def _docker_host_socket(self) -> str:
        return f"unix://{self._docker_host_run / 'docker.sock'}"

    def _docker_host_engine(self, reused: list[str]) -> None:
        """The docker host's own Docker engine, in its namespace, with the local images loaded.

        As on a server: containerd runs on its own (a dockerd that dies takes no container with
        it) and dockerd has live restore on (one started again takes the running containers back)."""
        run_dir = self._docker_host_run
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        containerd = run_dir / "containerd.sock"

        def serving() -> bool:
            return subprocess.run(["docker", "-H", self._docker_host_socket, "info"],
                                  capture_output=True).returncode == 0

        if not self._ensure_process("docker-host-containerd", [
                "containerd", "--address", str(containerd), "--root", str(self.dir / "docker-host" / "containerd"),
                "--state", str(run_dir / "containerd")], host="docker"):
            wait_for(containerd.exists, 30, "the docker host's containerd", self._log("docker-host-containerd"),
                     self._pid("docker-host-containerd"))
        if self._ensure_process("docker-host-engine", [
                "dockerd", "--data-root", str(self.dir / "docker-host"), "--exec-root", str(run_dir / "exec"),
                "--pidfile", str(run_dir / "docker.pid"), "-H", self._docker_host_socket,
                "--containerd", str(containerd), "--live-restore"], host="docker"):
            reused.append("docker host engine")
        else:
            self.say(f"starting the docker host's own Docker engine ({self._docker_host_socket})")
        wait_for(serving, 60, "the docker host's Docker engine", self._log("docker-host-engine"),
                 self._pid("docker-host-engine"))
        stopped = self.state.pop("stopped_stacks", [])
        if stopped:
            # What `down` stopped (live restore would have kept them running without a fleet).
            subprocess.run(["docker", "-H", self._docker_host_socket, "start", *stopped], capture_output=True)
            self._save()
        for image in self.state["images"].values():
            present = subprocess.run(["docker", "-H", self._docker_host_socket, "image", "inspect", image],
                                     capture_output=True).returncode == 0
            if not present:
                self.say(f"loading {image} into the docker host's engine")
                save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
                load = subprocess.run(["docker", "-H", self._docker_host_socket, "load"], stdin=save.stdout,
                                      capture_output=True, text=True)
                save.stdout.close()
                if save.wait() != 0 or load.returncode != 0:
                    raise CliError(f"loading {image} into the docker host's engine failed: {load.stderr.strip()}")

    def _images(self) -> dict:
        self.say("checking the local images (built from Debian packages when missing, about a minute each)")
        proc = subprocess.run([sys.executable, str(IMAGE_BUILDER), "--json"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CliError(f"building the local images failed: {proc.stderr.strip()[-800:]}")
        return json.loads(proc.stdout)

    def _agent_settings(self, name: str, shared: PostgresCluster) -> dict:
        settings = self._own_agent_settings(name, shared)
        for role, extra in self.agent_settings.items():
            if role in settings:
                settings[role] = {**settings[role], **extra}
        return settings

    def _own_agent_settings(self, name: str, shared: PostgresCluster) -> dict:
        if AGENTS[name] == "db":
            return {"db": {"shared_cluster_url": shared.url("flux_shared"),
                           "authenticator_password": self._secret("authenticator")}}
        if AGENTS[name] == "docker":
            images = self.state["images"]
            self.say(f"dedicated stacks use {images['postgrest']}, a PostgREST STAND-IN (not PostgREST)")
            return {"docker": {"postgres_image": images["postgres"], "postgrest_image": images["postgrest"],
                               "api_healthcheck": STANDIN_HEALTHCHECK, "memory_limit": "256m",
                               "publish_host": self._address("docker"), "advertise_host": self._address("docker")}}
        if AGENTS[name] == "backup":
            return {"backup": {"dir": str(self.dir / "agents" / name / "backups")}}
        return {"gateway": {
            # Caddy's admin API has no authentication: a unix socket in the agent's private directory.
            "caddy_admin": str(self.dir / "agents" / name / "caddy-admin.sock"),
            "listen": f"{self._address('gateway')}:{self.ports['gateway']}",
            "auth_listen": f"127.0.0.1:{self.ports['forward_auth']}",
            "pool_upstream": f"{self._address('db')}:{self.ports['pool_api']}",
            "pool_jwt_secret": self._secret("pool_jwt"),
        }}

    def up(self) -> dict:
        reused: list[str] = []
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ports = self.state.setdefault("ports", {})
        for name in PORTS:
            ports.setdefault(name, free_port())
        self._save()

        if self.hosts:
            if self.hosts.exists():
                reused.append("hosts")
            else:
                self.say(f"creating the hosts: namespaces on bridge {self.hosts.bridge} ({self.hosts.subnet})")
            self.hosts.create()
        catalog = self._start_cluster("catalog", "flux_catalog", reused)
        shared = self._start_cluster("shared", "flux_shared", reused)
        self._ensure_docker(reused)
        if not self.hosts and self.state.get("stopped_stacks"):
            # What `down` stopped of its projects.
            subprocess.run(["docker", "start", *self.state.pop("stopped_stacks")], capture_output=True)
            self._save()
        self.state["images"] = self._images()
        self._save()
        if self.hosts:
            self._docker_host_engine(reused)

        controller_dir = self.dir / "controller"
        # init every time: it changes nothing on a current catalog and upgrades an older one.
        init = subprocess.run(
            [sys.executable, "-m", "controller.main", "init", "--catalog-url",
             catalog.url("flux_catalog"), "--state-dir", str(controller_dir),
             "--base-domain", "localhost", "--json"], capture_output=True, text=True)
        if init.returncode != 0:
            raise CliError(f"controller init failed: {init.stderr.strip()}")
        result = json.loads(init.stdout)
        if result["admin_token"]:
            self.state["token"] = result["admin_token"]
            self._save()
        elif "token" not in self.state:
            raise CliError(f"{controller_dir} was initialised before but {self.state_path} lost "
                           "its admin token; run `flux dev down` and remove the directory to start over")
        if result["changed"]:
            self.say("controller initialised: " + "; ".join(result["changes"]))
            # A controller running on an older schema must be restarted on the new one.
            terminate(self.state.get("pids", {}).pop("controller", None))

        if self._controller_answers():
            reused.append("controller")
        else:
            here = self._address("controller")
            # One that runs but does not answer is stopped first: started beside it, a new one finds
            # its ports taken, and the old one would run on with no record of it.
            terminate(self.state.setdefault("pids", {}).pop("controller", None), timeout=5)
            self.say(f"starting the controller (API on {here}:{ports['http']})")
            self._ensure_process("controller", [
                sys.executable, "-m", "controller.main", "run", "--state-dir", str(controller_dir),
                "--http-listen", f"{here}:{ports['http']}", "--grpc-listen", f"{here}:{ports['grpc']}",
                "--enroll-listen", f"{here}:{ports['enroll']}", "--advertise-host", here,
                "--metrics-listen", f"{here}:{ports['metrics_controller']}", *self.controller_args],
                host="controller")
            wait_for(self._verify, 30, "the controller", self._log("controller"), self._pid("controller"))

        for name, roles in AGENTS.items():
            agent_dir = self.dir / "agents" / name
            if not (agent_dir / "agent.json").exists():
                self.say(f"enrolling agent {name} ({roles}) with a join token")
                token = self._api("POST", "agents/tokens", {"roles": roles.split(","), "ttl_seconds": 600})
                enroll = subprocess.run(
                    [*self._enter(AGENTS[name]), sys.executable, "-m", "agent.runtime.main", "enroll", "--controller", token["enroll_address"],
                     "--token", token["token"], "--name", name, "--roles", roles,
                     "--state-dir", str(agent_dir), "--ca-fingerprint", token["ca_fingerprint"]],
                    capture_output=True, text=True)
                if enroll.returncode != 0:
                    raise CliError(f"agent enrollment failed: {enroll.stderr.strip()}")
            settings_path = agent_dir / "settings.json"
            fd = os.open(settings_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump(self._agent_settings(name, shared), handle, indent=2)
            env = {"DOCKER_HOST": self._docker_host_socket} if self.hosts and AGENTS[name] == "docker" else None
            if self._ensure_process(name, [sys.executable, "-m", "agent.runtime.main", "run",
                                           "--state-dir", str(agent_dir), "--metrics-listen",
                                           f"{self._address(AGENTS[name])}:{ports[f'metrics_{name}']}"],
                                    env, host=AGENTS[name]):
                reused.append(name)
            else:
                self.say(f"starting agent {name}")

        self.say("using the PostgREST STAND-IN for the pooled API (not PostgREST; see packaging/images)")
        standin_env = {
            "PGRST_DB_URI": f"postgresql://authenticator:{self._secret('authenticator')}@127.0.0.1:{shared.port}/flux_shared",
            "PGRST_DB_CONFIG": "true", "PGRST_DB_SCHEMAS": "public", "PGRST_DB_ANON_ROLE": "anon",
            "PGRST_DB_PRE_REQUEST": "flux.pre_request", "PGRST_JWT_SECRET": self._secret("pool_jwt"),
            "PGRST_SERVER_HOST": self._address("db"), "PGRST_SERVER_PORT": str(ports["pool_api"]),
            "PGRST_ADMIN_SERVER_PORT": str(ports["pool_admin"]),
        }
        if self._ensure_process("pooled-postgrest", [sys.executable, str(STANDIN)], standin_env, host="db"):
            reused.append("pooled-postgrest")

        def agents_connected():
            for name in AGENTS:
                if not pid_alive(self.state["pids"].get(name)):
                    raise CliError(f"agent {name} exited; see {self._log(name)}")
            listed = {a["name"]: a["connected"] for a in self._api("GET", "agents")}
            return all(listed.get(name) for name in AGENTS)

        wait_for(agents_connected, 60, "the agents", self._log("dev-gateway"))

        def gateway_serving():
            gateway = next(a for a in self._api("GET", "agents") if a["name"] == "dev-gateway")["gateway"]
            return gateway["state"] == "healthy" and gateway["lease_seconds_left"] > 0

        wait_for(gateway_serving, 60, "the gateway to get its routes and lease", self._log("dev-gateway"))
        wait_for(self._pool_ready, 30, "the pooled PostgREST stand-in", self._log("pooled-postgrest"),
                 self._pid("pooled-postgrest"))
        return self.describe(reused)

    def _pool_ready(self) -> bool:
        try:
            return httpx.get(f"http://{self._address('db')}:{self.ports['pool_admin']}/ready",
                             timeout=2, verify=NO_TLS).status_code == 200
        except httpx.HTTPError:
            return False

    def describe(self, reused: list[str]) -> dict:
        ports = self.ports
        clusters = self.state["clusters"]
        at = self._address
        hosts = {}
        if self.hosts:
            hosts = {"bridge": self.hosts.bridge, "subnet": self.hosts.subnet, "machine": at("machine"),
                     "docker_host_engine": self._docker_host_socket,
                     "hosts": [{**host, "runs": HOST_RUNS[host["name"]]} for host in self.hosts.describe()]}
        return {
            "api_base": self.api_base,
            "token": self.state["token"],
            "dir": str(self.dir),
            "base_domain": "localhost",
            "gateway_url": f"https://{at('gateway')}:{ports['gateway']}",
            "gateway_ca": str(self.dir / "agents" / "dev-gateway" / "caddy-data" / "caddy" / "pki" / "authorities"
                              / "local" / "root.crt"),
            "catalog": f"{at('controller')}:{clusters['catalog']['port']}",
            "shared_cluster": f"{at('db')}:{clusters['shared']['port']}",
            "pooled_postgrest": f"{at('db')}:{ports['pool_api']} (stand-in)",
            "http": f"{at('controller')}:{ports['http']}",
            "grpc": f"{at('controller')}:{ports['grpc']}",
            "enroll": f"{at('controller')}:{ports['enroll']}",
            "agents": list(AGENTS),
            "metrics": {name: f"http://{at('controller' if name == 'controller' else AGENTS[name])}:"
                              f"{ports[f'metrics_{name}']}/metrics" for name in METRICS},
            "images": self.state["images"],
            "reused": reused,
            "logs": str(self.dir / "logs"),
            **hosts,
        }

    def _running_stacks(self) -> list[str]:
        """The running containers of this fleet's projects (by their flux.project label), on the
        machine's engine; none known while its catalog is down."""
        catalog = self.cluster("catalog") if "catalog" in self.state.get("clusters", {}) else None
        if catalog is None or not catalog.running():
            return []
        try:
            with psycopg.connect(catalog.url("flux_catalog"), connect_timeout=5) as conn:
                ids = {r[0] for r in conn.execute("SELECT id::text FROM projects")}
        except psycopg.Error:
            return []
        listed = subprocess.run(["docker", "ps", "--filter", "label=flux.managed=true", "--format",
                                 '{{.Names}}\t{{.Label "flux.project"}}'], capture_output=True, text=True).stdout
        return [name for name, _, project in (line.partition("\t") for line in listed.splitlines()) if project in ids]

    def down(self) -> list[str]:
        if not self.state:
            return []
        stopped = []
        pids = self.state.get("pids", {})
        if not self.hosts and docker_running():
            # Its projects' stacks, on the machine's engine (which it leaves running unless it started
            # it); the next `up` starts them again.
            running = self._running_stacks()
            if running:
                self.say(f"stopping {len(running)} container(s) of this fleet's projects")
                subprocess.run(["docker", "stop", "-t", "15", *running], capture_output=True)
                self.state["stopped_stacks"] = running
                self._save()
                stopped.append(f"{len(running)} container(s) of its projects")
        if self.hosts and pid_alive(pids.get("docker-host-engine")):
            # Live restore keeps containers running when dockerd stops: the stacks stop first, and
            # the next `up` starts them again.
            running = subprocess.run(["docker", "-H", self._docker_host_socket, "ps", "--format", "{{.Names}}"],
                                     capture_output=True, text=True).stdout.split()
            if running:
                self.say(f"stopping {len(running)} container(s) on the docker host")
                subprocess.run(["docker", "-H", self._docker_host_socket, "stop", "-t", "15", *running],
                               capture_output=True)
                self.state["stopped_stacks"] = running
                stopped.append(f"{len(running)} container(s) on the docker host")
        for key in [*AGENTS, "pooled-postgrest", "controller", "docker-host-engine", "docker-host-containerd",
                    "dockerd"]:
            if pid_alive(pids.get(key)):
                self.say(f"stopping {key}")
                terminate(pids[key])
                stopped.append(key)
            pids.pop(key, None)
        for role in ("shared", "catalog"):
            if role in self.state.get("clusters", {}):
                cluster = self.cluster(role)
                if cluster.running():
                    self.say(f"stopping the {role} cluster")
                    cluster.stop()
                    stopped.append(f"{role} cluster")
        if self.hosts:
            # A dockerd that was killed leaves its data root mounted on itself.
            data_root = str(self.dir / "docker-host")
            for mount in reversed(pathlib.Path("/proc/mounts").read_text().splitlines()):
                target = mount.split()[1]
                if target == data_root or target.startswith(data_root + "/"):
                    subprocess.run(["umount", "-l", target], capture_output=True)
            shutil.rmtree(self._docker_host_run, ignore_errors=True)
            stopped += self.hosts.remove()
        self._save()
        return stopped

    def data_dirs(self) -> list[pathlib.Path]:
        """What holds the fleet's data outside its state directory, for a caller that removes it."""
        dirs = [pathlib.Path(c["datadir"]).parent for c in self.state.get("clusters", {}).values()]
        return dirs + ([self.dir / "docker-host"] if self.hosts else [])
