"""Real processes for tests: a PostgreSQL cluster, the controller, agents, a cuttable proxy."""

import concurrent.futures
import contextlib
import json
import math
import os
import pathlib
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from agent.adapters.plainhttp import NO_TLS  # noqa: F401  (re-exported for tests)
from devtools.fleet import PostgresCluster, free_port, pid_alive  # noqa: F401  (re-exported for tests)

# On every container, volume and network the tests' docker agents make: a run stopped halfway
# leaves its stacks behind (they start again with the engine), and .ci/run removes what carries it.
TEST_LABELS = {"flux-tests": "true"}

READY = re.compile(r"flux-controller ready http=\S+:(\d+) grpc=(\d+) enroll=(\d+)")


def postgres_container(image: str, prefix: str, command: tuple[str, ...] = (), cpus: float = 0) -> tuple[str, str]:
    """A fresh Postgres container of `image` published on loopback; returns its name and a
    superuser URL once it accepts connections. The caller removes it (docker rm -f)."""
    import psycopg

    name = f"{prefix}-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(16)
    subprocess.run(["docker", "run", "-d", "--name", name, "-e", f"POSTGRES_PASSWORD={password}",
                    *(["--cpus", str(cpus)] if cpus else []), "-p", "127.0.0.1::5432", image, *command],
                   check=True, capture_output=True)
    port = subprocess.run(["docker", "port", name, "5432/tcp"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[0].rsplit(":", 1)[1].strip()
    url = f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"

    def ready():
        try:
            psycopg.connect(url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    wait_until(ready, 60, f"container {name}")
    return name, url


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def test_cluster(root: pathlib.Path, **settings: str) -> PostgresCluster:
    base = pathlib.Path("/var/lib/postgresql/flux-test") if os.geteuid() == 0 else root
    datadir = base / f"t{secrets.token_hex(5)}" / "data"
    cluster = PostgresCluster(datadir, free_port(), secrets.token_urlsafe(18))
    cluster.init({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", **settings})
    cluster.start()
    return cluster


def remove_cluster(cluster: PostgresCluster) -> None:
    cluster.stop()
    shutil.rmtree(cluster.datadir.parent, ignore_errors=True)


def script(name: str) -> str:
    """A console script of this installation, whether or not its bin directory is on PATH."""
    return str(pathlib.Path(sys.executable).parent / name)


def run(*command: str, check: bool = True, env: dict | None = None, timeout: float = 60, cwd: str | None = None):
    proc = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{command[:3]} exited {proc.returncode}: {proc.stderr}")
    return proc


class PortTaken(Exception):
    pass


class Controller:
    """`flux-controller` as a separate process, on fixed ports so it can be restarted."""

    def __init__(self, state_dir: pathlib.Path, catalog_url: str, init_args: tuple = ()):
        self.state_dir = state_dir
        self.catalog_url = catalog_url
        init = run(sys.executable, "-m", "controller.main", "init", "--catalog-url", catalog_url,
                   "--state-dir", str(state_dir), "--json", *init_args)
        self.init_result = json.loads(init.stdout)
        self.token = self.init_result["admin_token"]
        self.ca_fingerprint = self.init_result["ca_fingerprint"]
        self.ports = {"http": free_port(), "grpc": free_port(), "enroll": free_port()}
        self.proc: subprocess.Popen | None = None
        self.started_once = False
        self.log = state_dir / "controller.log"

    # Added to `flux-controller run` (like --http-tls).
    run_args: tuple = ()

    @property
    def tls(self) -> bool:
        return "--http-tls" in self.run_args

    @property
    def api_base(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.ports['http']}/api"

    def replica(self, state_dir: pathlib.Path) -> "Controller":
        """A second controller on the same catalog, from a copy of this one's state directory (the
        fleet's CA, master key and settings), as an operator sets one up on another host."""
        shutil.copytree(self.state_dir, state_dir, ignore=shutil.ignore_patterns("*.log"))
        other = Controller.__new__(Controller)
        other.state_dir, other.catalog_url = state_dir, self.catalog_url
        other.init_result, other.token, other.ca_fingerprint = self.init_result, self.token, self.ca_fingerprint
        other.ports = {"http": free_port(), "grpc": free_port(), "enroll": free_port()}
        other.proc, other.started_once, other.log = None, False, state_dir / "controller.log"
        return other

    def start(self, env: dict | None = None, heartbeat_seconds: int = 2) -> "Controller":
        # A free port can be taken by another process's outgoing connection before the controller
        # binds it: a first start picks new ones and tries again; a restart keeps its ports.
        tries = 1 if self.started_once else 3
        while True:
            tries -= 1
            try:
                return self._start(env, heartbeat_seconds)
            except PortTaken:
                if tries == 0:
                    raise AssertionError(f"the controller's ports {self.ports} were taken: "
                                         f"{self.log.read_text()[-500:]}") from None
                self.ports = {"http": free_port(), "grpc": free_port(), "enroll": free_port()}

    def _start(self, env: dict | None, heartbeat_seconds: int) -> "Controller":
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controller.main", "run", "--state-dir", str(self.state_dir),
             "--http-listen", f"127.0.0.1:{self.ports['http']}",
             "--grpc-listen", f"127.0.0.1:{self.ports['grpc']}",
             "--enroll-listen", f"127.0.0.1:{self.ports['enroll']}",
             "--heartbeat-seconds", str(heartbeat_seconds), *self.run_args],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        wait_until(lambda: self.proc.poll() is not None
                   or READY.search(self.log.read_bytes()[offset:].decode(errors="replace")),
                   30, "controller ready line")
        if self.proc.poll() is not None and "address already in use" in self.log.read_bytes()[offset:].decode(
                errors="replace"):
            raise PortTaken()
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        self.started_once = True
        return self

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        with open(self.log, "a") as handle:
            handle.write("\n--- stopped ---\n")
        return code

    def api(self, method: str, path: str, body=None, token: str | None = "admin", **kwargs):
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {self.token if token == 'admin' else token}"
        kwargs.setdefault("timeout", 30)
        if self.tls:
            import ssl

            kwargs.setdefault("verify", ssl.create_default_context(cafile=str(self.state_dir / "ca.pem")))
        else:
            kwargs.setdefault("verify", NO_TLS)
        return httpx.request(method, f"{self.api_base}/cli/v1/{path}", json=body, headers=headers, **kwargs)

    def join_token(self, roles: list[str], ttl: int = 600, name: str | None = None) -> dict:
        response = self.api("POST", "agents/tokens", {"roles": roles, "ttl_seconds": ttl,
                                                      **({"name": name} if name else {})})
        assert response.status_code == 201, response.text
        return response.json()

    def agent(self, name: str) -> dict | None:
        response = self.api("GET", "agents")
        assert response.status_code == 200, response.text
        return next((a for a in response.json() if a["name"] == name), None)

    def connected(self, name: str) -> bool:
        agent = self.agent(name)
        return bool(agent and agent["connected"])


class AgentProc:
    def __init__(self, state_dir: pathlib.Path, name: str):
        self.state_dir = state_dir
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.log = state_dir / "agent.log"

    @classmethod
    def enroll(cls, controller: Controller, base: pathlib.Path, name: str, roles: str = "db",
               token: dict | None = None) -> "AgentProc":
        token = token or controller.join_token(roles.split(","))
        state = base / name
        run(sys.executable, "-m", "agent.runtime.main", "enroll", "--controller", token["enroll_address"],
            "--token", token["token"], "--name", name, "--roles", roles, "--state-dir", str(state),
            "--ca-fingerprint", token["ca_fingerprint"])
        return cls(state, name)

    def config(self) -> dict:
        return json.loads((self.state_dir / "agent.json").read_text())

    def point_at(self, address: str) -> None:
        config = self.config()
        config["controller"] = address
        (self.state_dir / "agent.json").write_text(json.dumps(config))

    def start(self) -> "AgentProc":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.runtime.main", "run", "--state-dir", str(self.state_dir)],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def read(self, name: str) -> bytes:
        return (self.state_dir / name).read_bytes()


class CuttableProxy:
    """A TCP proxy on loopback whose connections can be cut and refused on demand."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepting = threading.Event()
        self.accepting.set()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.accepting.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sockets = [a, b]
        try:
            while True:
                readable, _, _ = select.select(sockets, [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def cut(self) -> None:
        """Drops every open connection and refuses new ones until `restore`."""
        self.accepting.clear()
        with self.lock:
            for a, b in self.pairs:
                for sock in (a, b):
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            self.pairs.clear()

    def restore(self) -> None:
        self.accepting.set()

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


class LocalFleet:
    """A whole local fleet (`flux dev up`) for tests of both engines and the gateway."""

    def __init__(self, directory: pathlib.Path, hosts: bool = False, agent_settings: dict | None = None,
                 controller_args: tuple[str, ...] = ()):
        from devtools.fleet import DevFleet

        settings = dict(agent_settings or {})
        settings["docker"] = {"labels": TEST_LABELS, **settings.get("docker", {})}
        self.fleet = DevFleet(directory, hosts=hosts, agent_settings=settings, controller_args=controller_args)
        try:
            self.info = self.fleet.up()
        except BaseException:
            self.fleet.down()
            raise
        self.token = self.info["token"]
        self.gateway_address, port = self.info["gateway_url"].removeprefix("https://").rsplit(":", 1)
        self.gateway_port = int(port)
        self.base_domain = self.info["base_domain"]

    def api(self, method: str, path: str, body=None, token: str | None = None, **kwargs):
        headers = {"Authorization": f"Bearer {token or self.token}", **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", 120)
        return httpx.request(method, f"{self.info['api_base']}/cli/v1/{path}", json=body, headers=headers,
                             verify=NO_TLS, **kwargs)

    def create(self, name: str, token: str | None = None, mode: str = "v2_shared", **extra) -> dict:
        response = self.api("POST", "create", {"name": name, "mode": mode, **extra}, token=token)
        assert response.status_code == 201, response.text
        return response.json()

    def push(self, project: dict, files: dict[str, str], token: str | None = None, **extra):
        summary = project["summary"]
        body = {"slug": summary["slug"], "hash": summary["hash"],
                "files": [{"filename": k, "sql": v} for k, v in files.items()], **extra}
        return self.api("POST", "push", body, token=token)

    def host(self, project: dict) -> str:
        return project["summary"]["apiUrl"].removeprefix("https://")

    def gateway(self, method: str, host: str, path: str, token: str | None = None, sni: bool = True, **kwargs):
        """A request through Caddy with real TLS, verified against the gateway's CA, for `host`.

        Without SNI the gateway shows its own certificate and routes by the Host header alone.
        """
        import ssl

        headers = {"Host": host, **kwargs.pop("headers", {})}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        context = ssl.create_default_context(cafile=self.info["gateway_ca"])
        if not sni:
            context.check_hostname = False
        with httpx.Client(verify=context, timeout=30) as http:
            return http.request(method, f"https://{self.gateway_address}:{self.gateway_port}{path}", headers=headers,
                                extensions={"sni_hostname": host} if sni else {}, **kwargs)

    def shared_sql(self, query: str, params=()):
        import psycopg

        cluster = self.fleet.cluster("shared")
        with psycopg.connect(cluster.url("flux_shared")) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def catalog_sql(self, query: str, params=()):
        import psycopg

        cluster = self.fleet.cluster("catalog")
        with psycopg.connect(cluster.url("flux_catalog")) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def dump_sql(self, path: str) -> bytes:
        """The SQL in a kept dump file, decrypted with the data key its catalog row holds sealed."""
        from agent.adapters.dumpfile import read_sql
        from controller.dumpfiles import key_context
        from controller.secretbox import SecretBox

        [(dump_id, sealed)] = self.catalog_sql(
            "SELECT id::text, key_sealed FROM dump_files WHERE path = %s AND removed_at IS NULL", (path,))
        box = SecretBox((self.fleet.dir / "controller" / "master.key").read_bytes())
        return b"".join(read_sql(path, box.open(sealed, key_context(dump_id))))

    def stop_process(self, key: str) -> None:
        from devtools.fleet import terminate

        terminate(self.fleet.state["pids"][key])

    def kill_process(self, key: str) -> None:
        """SIGKILL, as a crash would."""
        import signal


        pid = self.fleet.state["pids"][key]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 10, f"{key} to die")

    def restart(self) -> None:
        """Starts whatever is not running (as `flux dev up` does)."""
        self.info = self.fleet.up()

    def migrate(self, project: dict, **flags):
        body = {"slug": project["summary"]["slug"], "hash": project["summary"]["hash"], "to": "v1_dedicated",
                "dryRun": False, "yes": True, "staged": False, "dumpOnly": False, "preserveJwtSecret": True,
                "newJwtSecret": False, "lockWrites": True, "dropSourceAfter": False, "skipBackupCheck": True,
                **flags}
        return self.api("POST", "migrate", body, timeout=600)

    def add_user(self, name: str) -> str:
        out = run(sys.executable, "-m", "controller.main", "users", "add", name, "--state-dir",
                  str(self.fleet.dir / "controller"), "--json")
        return json.loads(out.stdout)["token"]

    def close(self) -> None:
        if getattr(self, "closed", False):
            return
        self.closed = True
        # Stacks live in the Docker engine, which outlives the fleet: delete every project, a few at once.
        def delete(project: dict) -> None:
            self.api("DELETE", f"projects/{project['hash']}", params={"slug": project["slug"], "skipBackupCheck": "true"})

        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(delete, self.api("GET", "list").json()))
        finally:
            self.fleet.down()  # its processes and namespaces go even when the controller cannot answer
        for directory in self.fleet.data_dirs():
            shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def small_disk(path: pathlib.Path, size: str = "1m"):
    """A tmpfs of `size` mounted at `path` (made if missing), unmounted after: a disk to fill."""
    if os.geteuid() != 0:
        import pytest

        pytest.fail("mounting a tmpfs needs root; these machines run the tests as root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def app_token(secret: str, **claims) -> str:
    """An app's token as its own sign-in would issue it: a `sub` and an hour to live."""
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": "alice", "iat": now, "exp": now + 3600, **claims}, secret, algorithm="HS256")


def loop_lag(url: str, metric: str) -> dict[float, float]:
    """A process's event-loop lag histogram (`metric`, from its /metrics `url`): the observations
    at or under each bucket's bound, in seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url, timeout=10, verify=NO_TLS).text
    return {float(s.labels["le"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == f"{metric}_bucket"}


def cpu_times() -> list[int]:
    """The machine's CPU time so far, by state (/proc/stat's first line, in clock ticks)."""
    return [int(field) for field in pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def steal_percent(before: list[int], after: list[int]) -> float:
    """The share of the CPUs' time between two `cpu_times` that the hypervisor gave to others
    (`steal`, the eighth state): a latency tail measured while it is high is the host's as much
    as the program's."""
    # user, nice, system, idle, iowait, irq, softirq, steal; guest time is counted in user already.
    spent = [b - a for a, b in zip(before[:8], after[:8])]
    return round(100 * spent[7] / max(1, sum(spent)), 1) if len(spent) == 8 else 0.0


def lag_figures(before: dict[float, float], after: dict[float, float], late_ms: int = 50) -> dict:
    """What a loop-lag histogram saw between two scrapes: how many wake-ups, the bucket bound
    that holds 99% of them (None: over the last bound), and how many came more than `late_ms`
    late. The buckets count wake-ups at or under their bound, so `late_ms` must be one."""
    grew = {bound: after[bound] - before.get(bound, 0) for bound in sorted(after)}
    if late_ms / 1000 not in grew:
        raise ValueError(f"{late_ms} ms is not a bound of the histogram's buckets: {sorted(grew)}")
    total = grew.get(math.inf, 0)
    p99 = next((bound for bound, count in grew.items() if total and count >= 0.99 * total), math.inf)
    return {"loop_lag_samples": int(total),
            "loop_lag_p99_under_ms": round(p99 * 1000, 1) if p99 != math.inf else None,
            f"loop_lags_over_{late_ms}ms": int(total - grew[late_ms / 1000])}
