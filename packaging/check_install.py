"""Installs the Debian packages on a server with systemd as PID 1, as the README's production steps
say, and checks the services (the command behind packaging/check-install.sh).

    python packaging/check_install.py [--keep]

The server is a container of the `host` image (packaging/images/build.py: Debian bookworm with
systemd, PostgreSQL 15 and Python 3.11, from Debian packages), unprivileged. In it:

  1. the packages of version X.Y.Z (pyproject.toml's) are installed with dpkg;
  2. the catalog's role and database and a shared cluster role (a superuser) are created in its
     PostgreSQL, `flux-controller init` runs as the flux user, and the controller is started with
     `systemctl enable --now`; a join token comes from `flux agents token`, the agent enrolls as
     flux-agent and is started the same way;
  3. checked: both units active (Type=notify: systemd saw READY=1), the agent connected; a
     `kill -9` of the agent brings it back by itself and it reconnects; both have logs in the
     journal; inside the agent's own mount namespace and as its user, a write to its state
     directory works and writes to /etc, /usr and /opt are refused; `systemctl stop` ends each
     within 10 s;
  4. the packages of version X.Y.(Z+1) are installed over them: the state directories and the
     enrollment are kept, both services are restarted by the upgrade, the agent reconnects and
     reports the new version.

The last line of output is one JSON object with the figures and `"passed"`; the exit code is 0
only when every check passed.
"""

import argparse
import json
import pathlib
import re
import secrets
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
STOP_WITHIN_S = 10


class CheckFailed(Exception):
    pass


def _redacted(text: str) -> str:
    """Tokens, bearer credentials and URL passwords left out of what a failure prints."""
    text = re.sub(r"(--token\s+)\S+", r"\1[redacted]", text)
    text = re.sub(r"(Bearer\s+)\S+", r"\1[redacted]", text)
    text = re.sub(r"flx_(live|join)_\w+", "flx_[redacted]", text)
    return re.sub(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]+@", r"\1[redacted]@", text)


class Server:
    """A container with systemd as PID 1."""

    def __init__(self, image: str):
        self.name = f"flux-check-{secrets.token_hex(4)}"
        self.image = image

    def start(self) -> None:
        subprocess.run(["docker", "run", "-d", "--name", self.name, "--hostname", "flux-server",
                        "--label", "flux.check-install=1",
                        "-v", "/sys/fs/cgroup:/sys/fs/cgroup", "--cgroupns=host", "--tmpfs", "/run",
                        # Not privileged: what systemd needs to sandbox units (mount namespaces),
                        # and to look into a unit's namespace from outside it for the checks.
                        "--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE",
                        "--security-opt", "apparmor=unconfined",
                        "--tmpfs", "/run/lock", "--tmpfs", "/tmp", "-e", "container=docker",
                        "--stop-signal", "SIGRTMIN+3", self.image, "/sbin/init"],
                       check=True, capture_output=True)
        deadline = time.monotonic() + 90
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise CheckFailed(f"systemd did not finish starting in the container (state {state!r})")
            time.sleep(0.5)

    def run(self, *command: str, check: bool = True, timeout: float = 300, user: str | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess:
        prefix = ["docker", "exec", "-i"] if stdin is not None else ["docker", "exec"]
        if user:
            prefix += ["-u", user]
        proc = subprocess.run([*prefix, self.name, *command], capture_output=True, text=True, timeout=timeout,
                              input=stdin)
        if check and proc.returncode != 0:
            raise CheckFailed(f"`{_redacted(' '.join(command))}` failed ({proc.returncode}): "
                              f"{_redacted((proc.stderr or proc.stdout).strip()[-1500:])}")
        return proc

    def copy_in(self, source: pathlib.Path, target: str) -> None:
        subprocess.run(["docker", "cp", str(source), f"{self.name}:{target}"], check=True, capture_output=True)

    def show(self, unit: str) -> dict:
        out = self.run("systemctl", "show", unit, "-p", "ActiveState,SubState,MainPID,StatusText,Type,NRestarts").stdout
        return dict(line.split("=", 1) for line in out.strip().splitlines())

    def wait_active(self, unit: str, timeout: float, not_pid: str | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.show(unit)
            if shown["ActiveState"] == "active" and shown["MainPID"] != "0" and shown["MainPID"] != not_pid:
                return shown
            if time.monotonic() > deadline:
                journal = self.run("journalctl", "-u", unit, "--no-pager", "-n", "30", check=False).stdout
                raise CheckFailed(f"{unit} is not active after {timeout:g}s ({shown}); its journal:\n{journal}")
            time.sleep(0.25)

    def remove(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True)


# The wheels the packages carry, fetched once and reused (build.py --wheels).
WHEELS = ROOT / "dist" / "wheels"


def _version_after(version: str) -> str:
    major, minor, patch = version.split(".")
    return f"{major}.{minor}.{int(patch) + 1}"


def build_packages(version: str, out: pathlib.Path, wheels: pathlib.Path | None) -> dict:
    command = [sys.executable, str(ROOT / "packaging" / "deb" / "build.py"), "--version", version, "--out", str(out)]
    if wheels is not None:
        command += ["--wheels", str(wheels)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckFailed(f"building the {version} packages failed: {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["packages"]


def install(server: Server, packages: dict, version: str) -> None:
    for name, path in packages.items():
        server.copy_in(pathlib.Path(path), f"/root/{pathlib.Path(path).name}")
    names = [f"/root/{pathlib.Path(p).name}" for p in packages.values()]
    server.run("dpkg", "-i", *names, timeout=600)
    for command in ("flux-controller", "flux-agent"):
        shown = server.run(command, "--version").stdout.strip()
        if not shown.endswith(version):
            raise CheckFailed(f"{command} --version says {shown!r}, not {version}")
    # The environments run the system's interpreter (its security updates reach them), not a copy.
    for prefix in ("/opt/flux-controller", "/opt/flux-agent", "/opt/flux-cli"):
        if server.run("test", "-L", f"{prefix}/bin/python3", check=False).returncode != 0:
            raise CheckFailed(f"{prefix}/bin/python3 is not a link to the system's python3")


def api(server: Server, token: str, method: str, path: str, body: dict | None = None) -> dict | list:
    """The controller's API from inside the server, with curl."""
    command = ["curl", "-sS", "--fail-with-body", "-X", method, "-H", f"Authorization: Bearer {token}",
               f"http://127.0.0.1:8080/api/cli/v1/{path}"]
    if body is not None:
        command[3:3] = ["-H", "Content-Type: application/json", "--data-binary", "@-"]
    proc = server.run(*command, stdin=json.dumps(body) if body is not None else None)
    return json.loads(proc.stdout)


def connected(server: Server, token: str, name: str) -> dict | None:
    for agent in api(server, token, "GET", "agents"):
        if agent["name"] == name and agent["connected"]:
            return agent
    return None


def wait_connected(server: Server, token: str, name: str, timeout: float, since: float) -> tuple[dict, float]:
    deadline = time.monotonic() + timeout
    while True:
        found = connected(server, token, name)
        if found is not None:
            return found, round(time.monotonic() - since, 2)
        if time.monotonic() > deadline:
            journal = server.run("journalctl", "-u", "flux-agent", "--no-pager", "-n", "30", check=False).stdout
            raise CheckFailed(f"agent {name} did not connect within {timeout:g}s; its journal:\n{journal}")
        time.sleep(0.25)


def set_up(server: Server) -> tuple[str, dict]:
    """The README's production steps: catalog and shared cluster roles, controller, agent."""
    catalog_password, shared_password = secrets.token_hex(16), secrets.token_hex(16)
    if not server.run("pg_lsclusters", "--no-header").stdout.strip():
        server.run("pg_createcluster", "15", "main")
    server.run("systemctl", "enable", "--now", "postgresql@15-main", timeout=120)
    # SQL on stdin: a password never shows in a command line or an error.
    psql = ["runuser", "-u", "postgres", "--", "psql", "-v", "ON_ERROR_STOP=1", "-q"]
    server.run(*psql, stdin=f"CREATE ROLE flux LOGIN PASSWORD '{catalog_password}';\n"
                            "CREATE DATABASE flux_catalog OWNER flux;\n"
                            # The db agent's role on the shared cluster must be a superuser (it
                            # creates tenants' roles, slots and publications, and dumps every schema).
                            f"CREATE ROLE flux_shared LOGIN SUPERUSER PASSWORD '{shared_password}';\n"
                            "CREATE DATABASE flux_shared OWNER flux_shared;\n")

    init = server.run("runuser", "-u", "flux", "--", "flux-controller", "init", "--catalog-url",
                      f"postgresql://flux:{catalog_password}@127.0.0.1/flux_catalog",
                      "--state-dir", "/var/lib/flux-controller", "--json")
    admin = json.loads(init.stdout)["admin_token"]
    server.run("systemctl", "enable", "--now", "flux-controller", timeout=120)
    server.wait_active("flux-controller", 60)
    server.run("flux", "login", "--token", admin, "--api-base", "http://127.0.0.1:8080/api")
    token = json.loads(server.run("flux", "agents", "token", "--roles", "db", "--json").stdout)
    server.run("runuser", "-u", "flux-agent", "--", "flux-agent", "enroll", "--controller", token["enroll_address"],
               "--token", token["token"], "--name", "db-1", "--roles", "db", "--state-dir", "/var/lib/flux-agent",
               "--ca-fingerprint", token["ca_fingerprint"])
    settings = {"db": {"shared_cluster_url": f"postgresql://flux_shared:{shared_password}@127.0.0.1/flux_shared",
                       "authenticator_password": secrets.token_hex(16)}}
    server.run("runuser", "-u", "flux-agent", "--", "sh", "-c",
               "umask 077 && cat > /var/lib/flux-agent/settings.json", stdin=json.dumps(settings))
    started = time.monotonic()
    server.run("systemctl", "enable", "--now", "flux-agent", timeout=120)
    server.wait_active("flux-agent", 60)
    _, connect_s = wait_connected(server, admin, "db-1", 60, started)
    return admin, {"agent_connect_s": connect_s}


def check_services(server: Server, admin: str) -> dict:
    figures = {}
    for unit in ("flux-controller", "flux-agent"):
        shown = server.show(unit)
        if shown["Type"] != "notify" or shown["ActiveState"] != "active":
            raise CheckFailed(f"{unit} is {shown}")
        figures[unit] = {"active": True, "type": shown["Type"], "status": shown["StatusText"]}
    # kill -9: systemd starts it again (Restart=on-failure), and it reconnects.
    before = server.show("flux-agent")
    killed = time.monotonic()
    server.run("kill", "-9", before["MainPID"])
    after = server.wait_active("flux-agent", 30, not_pid=before["MainPID"])
    restarted_s = round(time.monotonic() - killed, 2)
    _, reconnected_s = wait_connected(server, admin, "db-1", 60, killed)
    figures["kill_agent"] = {"restarted_s": restarted_s, "reconnected_s": reconnected_s,
                             "restarts": int(after["NRestarts"])}
    # The journal has their logs.
    journal = {}
    for unit, line in (("flux-controller", "controller ready"), ("flux-agent", "connected to the controller")):
        text = server.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout
        if line not in text:
            raise CheckFailed(f"the journal of {unit} lacks {line!r}:\n{text[-1500:]}")
        journal[unit] = len(text.splitlines())
    figures["journal_lines"] = journal
    # The hardening holds. The agent runs in a mount namespace of its own, where (looked at through
    # /proc/PID/root, even as root) its state directory is writable and the rest is not, while
    # the same paths are writable from outside it: the unit's sandbox refuses them, nothing else.
    pid = after["MainPID"]
    own = server.run("readlink", f"/proc/{pid}/ns/mnt").stdout.strip()
    if own == server.run("readlink", "/proc/1/ns/mnt").stdout.strip():
        raise CheckFailed("systemd did not sandbox the agent: it runs in the server's own mount namespace, "
                          "so ProtectSystem= and ReadWritePaths= do not hold")

    def write(path: str) -> subprocess.CompletedProcess:
        return server.run("sh", "-c", f"echo probe > {path}", check=False)

    inside = write(f"/proc/{pid}/root/var/lib/flux-agent/.write-probe")
    if inside.returncode != 0:
        raise CheckFailed(f"the agent cannot write its own state directory: {inside.stderr.strip()}")
    server.run("rm", "-f", "/var/lib/flux-agent/.write-probe")
    refused = {}
    for directory in ("/etc", "/usr", "/opt/flux-agent", "/var/lib", "/var/lib/flux-controller", "/root"):
        probe = f"{directory}/.flux-write-probe"
        proc = write(f"/proc/{pid}/root{probe}")
        if proc.returncode == 0:
            raise CheckFailed(f"the agent's namespace lets {directory} be written despite the unit's hardening")
        if write(probe).returncode != 0:
            raise CheckFailed(f"{directory} is not writable outside the agent either: the check proves nothing")
        server.run("rm", "-f", probe)
        refused[directory] = proc.stderr.strip().split(": ")[-1]
    figures["hardening"] = {"state_dir_writable": True, "refused": refused}
    return figures


def check_stop(server: Server) -> dict:
    stopped = {}
    for unit in ("flux-agent", "flux-controller"):
        began = time.monotonic()
        server.run("systemctl", "stop", unit, timeout=60)
        took = round(time.monotonic() - began, 2)
        if took > STOP_WITHIN_S or server.show(unit)["ActiveState"] not in ("inactive", "failed"):
            raise CheckFailed(f"systemctl stop {unit} took {took}s (at most {STOP_WITHIN_S}s)")
        if server.show(unit)["ActiveState"] == "failed":
            raise CheckFailed(f"{unit} ended failed on systemctl stop")
        stopped[unit] = took
    return stopped


def check_upgrade(server: Server, admin: str, packages: dict, version: str) -> dict:
    for unit in ("flux-controller", "flux-agent"):
        server.run("systemctl", "start", unit, timeout=120)
        server.wait_active(unit, 60)
    wait_connected(server, admin, "db-1", 60, time.monotonic())
    pids = {unit: server.show(unit)["MainPID"] for unit in ("flux-controller", "flux-agent")}
    kept = {path: server.run("sha256sum", path).stdout.split()[0]
            for path in ("/var/lib/flux-agent/cert.pem", "/var/lib/flux-agent/agent.json",
                         "/var/lib/flux-agent/settings.json", "/var/lib/flux-controller/ca.pem",
                         "/var/lib/flux-controller/master.key")}
    began = time.monotonic()
    install(server, packages, version)
    for unit in pids:
        server.wait_active(unit, 60, not_pid=pids[unit])
    agent, reconnected_s = wait_connected(server, admin, "db-1", 60, began)
    reported = (agent.get("facts") or {}).get("agent_version")
    deadline = time.monotonic() + 30
    while reported != version and time.monotonic() < deadline:
        time.sleep(0.5)
        reported = ((connected(server, admin, "db-1") or {}).get("facts") or {}).get("agent_version")
    if reported != version:
        raise CheckFailed(f"after the upgrade the agent reports version {reported!r}, not {version}")
    for path, digest in kept.items():
        if server.run("sha256sum", path).stdout.split()[0] != digest:
            raise CheckFailed(f"the upgrade changed {path}")
    owner = server.run("stat", "-c", "%U %a", "/var/lib/flux-agent").stdout.strip()
    if owner != "flux-agent 700":
        raise CheckFailed(f"/var/lib/flux-agent is {owner} after the upgrade")
    return {"to": version, "restarted": sorted(pids), "reconnected_s": reconnected_s, "state_kept": sorted(kept),
            "agent_reports": reported}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="leave the container running for a look inside")
    args = parser.parse_args()
    version = re.search(r'(?m)^version = "([^"]*)"$', (ROOT / "pyproject.toml").read_text())[1]
    newer = _version_after(version)
    figures: dict = {"from": version, "to": newer, "passed": False}
    dist = ROOT / "dist" / "check-install"
    server = None
    try:
        print(f"building the packages {version} and {newer}", file=sys.stderr, flush=True)
        # The second build takes its dependencies' wheels from the cache the first filled.
        old = build_packages(version, dist / version, WHEELS)
        new = build_packages(newer, dist / newer, WHEELS)
        image = subprocess.run([sys.executable, str(ROOT / "packaging" / "images" / "build.py"), "--json", "host"],
                               capture_output=True, text=True)
        if image.returncode != 0:
            raise CheckFailed(f"building the host image failed: {image.stderr.strip()[-1500:]}")
        server = Server(json.loads(image.stdout)["host"])
        print(f"starting {server.name} ({server.image}) with systemd as PID 1", file=sys.stderr, flush=True)
        server.start()
        print(f"installing the {version} packages", file=sys.stderr, flush=True)
        install(server, old, version)
        admin, found = set_up(server)
        figures.update(found)
        print("checking the services", file=sys.stderr, flush=True)
        figures.update(check_services(server, admin))
        figures["stop_s"] = check_stop(server)
        print(f"upgrading to {newer}", file=sys.stderr, flush=True)
        figures["upgrade"] = check_upgrade(server, admin, new, newer)
        figures["passed"] = True
        print("every check passed", file=sys.stderr)
    except CheckFailed as exc:
        figures["error"] = str(exc)
        print(f"check-install: {exc}", file=sys.stderr)
    finally:
        if server is not None and not args.keep:
            server.remove()
        elif server is not None:
            print(f"kept: docker exec -it {server.name} bash", file=sys.stderr)
    print(json.dumps(figures))
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
