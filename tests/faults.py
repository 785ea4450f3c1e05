"""Faults during a migrate, one case at a time: a (fault x phase) on a fleet of separate hosts
(`flux dev up --hosts`), with a writer going through the gateway.

For each case: a new pooled project with rows; an online migrate starts; when the migration
reaches the case's phase the fault is put in (a process killed with SIGKILL, or two hosts cut
apart), held, then healed (what was killed is started again, as a supervisor would; the cut is
removed). Then the case checks what must hold whatever happened:

- the migration ends `succeeded`, `rolled_back` or `failed_after_cutover` within END_BOUND_S of
  the heal, and a `failed_after_cutover` one finishes when resumed;
- no write the gateway acknowledged is missing from where the project now lives;
- nothing is left behind: no maintenance, no write lock (a write goes through), no replication
  slot, no container but the project's own stack;
- every agent is connected again.

`bench/faults.py` runs the whole matrix; the test suite runs a few cases.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.support import LocalFleet, app_token, wait_until
from tests.writer import Writer

# How long a migration may take to end once the fault is healed.
END_BOUND_S = 240
PHASES = ("provision", "sync", "confirm")
FILES = {"001_todos.sql": """
create table public.todos (id bigserial primary key, owner text not null default auth.uid(), title text not null);
alter table public.todos enable row level security;
create policy own_todos on public.todos for all to authenticated using (owner = auth.uid())
  with check (owner = auth.uid());
grant select, insert, update, delete on public.todos to authenticated;
grant usage on sequence public.todos_id_seq to authenticated;
"""}


@dataclass(frozen=True)
class Fault:
    name: str
    kind: str  # kill, postmaster, caddy, partition, disk
    target: str = ""
    peer: str = ""
    hold_s: float = 2.0
    phases: tuple[str, ...] = PHASES


FAULTS = {f.name: f for f in [
    Fault("kill-controller", "kill", "controller"),
    Fault("kill-db-agent", "kill", "dev-db"),
    Fault("kill-docker-agent", "kill", "dev-docker"),
    Fault("kill-gateway-agent", "kill", "dev-gateway"),
    Fault("kill-dockerd", "kill", "docker-host-engine"),
    Fault("kill-shared-postmaster", "postmaster", "shared"),
    Fault("kill-catalog-postmaster", "postmaster", "catalog"),
    Fault("kill-caddy", "caddy"),
    Fault("partition-controller-db-5s", "partition", "controller", "db", 5),
    Fault("partition-db-docker-5s", "partition", "db", "docker", 5),
    # Longer than the jobs' own timeouts (60 s for most steps).
    Fault("partition-controller-db-long", "partition", "controller", "db", 75),
    Fault("partition-db-docker-long", "partition", "db", "docker", 75),
    # The db agent's spool (its job records, and the dump file the copy keeps) on a disk of its
    # own, filled before the copy begins to all but SPOOL_ROOM_LEFT (job records fit, a dump does
    # not) and freed once the copy is over: what a filling disk on the db host does to the copy.
    Fault("disk-full-db", "disk", "dev-db", phases=("sync",)),
]}
# The disk the disk fault fills: large enough for a case's dump, and held apart from the real one.
SPOOL_DISK = "size=32m,mode=0700"
SPOOL_ROOM_LEFT = 64 * 1024


@dataclass
class Outcome:
    case: str
    hit: bool = False  # the fault went in while the migration was in the case's phase
    state: str = ""
    seconds: float = 0.0  # from the heal to the migration's end
    resumed: bool = False
    acked: int = 0
    lost: int = 0
    stuck: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.stuck and self.lost == 0 and not self.problems

    def row(self) -> dict:
        return {"case": self.case, "hit": self.hit, "state": self.state, "seconds": round(self.seconds, 1),
                "resumed": self.resumed, "acked": self.acked, "lost": self.lost, "stuck": self.stuck,
                "passed": self.passed, "problems": self.problems}


def cases(names: list[str] | None = None) -> list[tuple[str, str]]:
    everything = [(fault, phase) for fault in FAULTS for phase in FAULTS[fault].phases]
    if not names:
        return everything
    chosen = []
    for name in names:
        fault, _, phase = name.partition("@")
        if fault not in FAULTS or (phase and phase not in PHASES):
            raise ValueError(f"unknown case {name!r}: FAULT[@PHASE] with FAULT one of {', '.join(FAULTS)} "
                             f"and PHASE one of {', '.join(PHASES)}")
        if phase and phase not in FAULTS[fault].phases:
            raise ValueError(f"unknown case {name!r}: {fault} goes in at {', '.join(FAULTS[fault].phases)} only")
        chosen += [(fault, p) for p in ([phase] if phase else FAULTS[fault].phases)]
    return chosen


class Matrix:
    def __init__(self, fleet: LocalFleet, say=print):
        self.fleet = fleet
        self.hosts = fleet.fleet.hosts
        self.say = say
        if self.hosts is None:
            raise ValueError("faults run on a fleet of separate hosts (LocalFleet(..., hosts=True))")

    # the fleet's parts

    def _host_docker(self, *args: str, check: bool = True) -> str:
        return subprocess.run(["docker", "-H", self.fleet.info["docker_host_engine"], *args], capture_output=True,
                              text=True, check=check).stdout.strip()

    def _iptables(self, host: str, action: str, peer: str) -> None:
        address = self.hosts.address(peer)
        for rule in (["INPUT", "-s", address], ["OUTPUT", "-d", address]):
            subprocess.run([*self.hosts.enter(host), "iptables", action, *rule, "-j", "DROP"],
                           check=action == "-A", capture_output=True)

    def _postmaster(self, role: str) -> int:
        datadir = self.fleet.fleet.state["clusters"][role]["datadir"]
        return int(open(os.path.join(datadir, "postmaster.pid")).read().split()[0])

    def _caddy(self) -> int:
        # Not necessarily the agent's child: an agent started again adopts the Caddy that runs.
        config = self.fleet.fleet.dir / "agents" / "dev-gateway" / "caddy.json"
        found = subprocess.run(["pgrep", "-f", f"caddy run --config {config}"], capture_output=True,
                               text=True).stdout.split()
        if not found:
            raise RuntimeError("no Caddy runs for the gateway agent")
        return int(found[0])

    @property
    def _spool(self) -> pathlib.Path:
        return self.fleet.fleet.dir / "agents" / "dev-db" / "spool"

    def _mount_spool(self) -> None:
        self._spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        subprocess.run(["mount", "-t", "tmpfs", "-o", SPOOL_DISK, "flux-fault-spool", str(self._spool)], check=True)

    def _unmount_spool(self) -> None:
        subprocess.run(["umount", "-l", str(self._spool)], check=False, capture_output=True)

    def _fill_spool(self) -> None:
        """Fills the spool's disk to all but SPOOL_ROOM_LEFT."""
        fd = os.open(self._spool / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(shutil.disk_usage(self._spool).free - SPOOL_ROOM_LEFT, 1))
        finally:
            os.close(fd)

    def inject(self, fault: Fault) -> None:
        if fault.kind == "disk":
            self._fill_spool()
        elif fault.kind == "kill":
            os.kill(self.fleet.fleet.state["pids"][fault.target], signal.SIGKILL)
        elif fault.kind == "postmaster":
            os.kill(self._postmaster(fault.target), signal.SIGKILL)
        elif fault.kind == "caddy":
            os.kill(self._caddy(), signal.SIGKILL)
        elif fault.kind == "partition":
            self._iptables(fault.target, "-A", fault.peer)

    def heal(self, fault: Fault) -> None:
        if fault.kind == "disk":
            (self._spool / "filler").unlink()
        elif fault.kind == "partition":
            self._iptables(fault.target, "-D", fault.peer)
        elif fault.kind in ("kill", "postmaster"):
            # What a supervisor (systemd, Restart=on-failure) does: start what died, again if it
            # fails (a killed postmaster's backends may hold its memory for a moment). The
            # gateway agent restarts Caddy itself.
            for attempt in range(3):
                try:
                    self.fleet.restart()
                    return
                except Exception as exc:  # noqa: BLE001 - the last attempt's error is the case's
                    if attempt == 2:
                        raise
                    self.say(f"  restarting after {fault.name} failed ({exc}); again in 2 s")
                    time.sleep(2)

    # the project

    def _status(self, h: str) -> dict:
        try:
            answer = self.fleet.api("GET", f"projects/{h}/migration", timeout=10)
        except httpx.HTTPError:
            return {}
        return answer.json() if answer.status_code == 200 else {}

    def _cleanup(self, project: dict) -> None:
        h = project["summary"]["hash"]
        try:
            self.fleet.api("DELETE", f"projects/{h}", params={"slug": project["summary"]["slug"],
                                                               "skipBackupCheck": "true"}, timeout=120)
        except httpx.HTTPError as exc:
            self.say(f"  could not delete {h}: {exc}")

    def run(self, fault_name: str, phase: str) -> Outcome:
        fault = FAULTS[fault_name]
        out = Outcome(f"{fault_name}@{phase}")
        fleet = self.fleet
        try:
            # The fleet may still be coming back from the last case's fault.
            project = wait_until(lambda: self._create(f"Fault {fault_name} {phase}"), 60, "a new project")
        except AssertionError as exc:
            out.problems.append(f"cannot create the case's project: {exc}")
            return out
        h = project["summary"]["hash"]
        try:
            assert fleet.push(project, FILES).status_code == 200
            [(schema,)] = fleet.catalog_sql("SELECT api_schema FROM projects WHERE hash = %s", (h,))
            fleet.shared_sql(f"INSERT INTO {schema}.todos (owner, title) SELECT 'seed', 'seed ' || g"
                             " FROM generate_series(1, 5000) g")
            writer = Writer(fleet.gateway_port, fleet.info["gateway_ca"], fleet.host(project),
                            app_token(project["projectJwtSecret"], sub="writer"), path="/todos", rate=20,
                            body=lambda i: {"title": f"w{i}"}, address=fleet.gateway_address)
            if fault.kind == "disk":
                self._mount_spool()
            with writer:
                time.sleep(1)
                threading.Thread(target=self._migrate, args=(project,), daemon=True).start()
                if fault.kind == "disk":
                    # Full before the copy begins (it writes as the phase starts), and until it is over.
                    self._wait_for_phase(h, PHASES[max(PHASES.index(phase) - 1, 0)])
                    self.inject(fault)
                    out.hit = self._wait_for_phase(h, phase)
                    self._wait_while_current(h, phase, END_BOUND_S)
                else:
                    out.hit = self._wait_for_phase(h, phase)
                    self.inject(fault)
                    time.sleep(fault.hold_s)
                self.heal(fault)
                healed = time.monotonic()
                final = self._wait_for_end(h, END_BOUND_S)
                out.seconds = time.monotonic() - healed
                if final.get("state") == "failed_after_cutover":
                    out.resumed = True
                    fleet.api("POST", f"migrations/{final['migrationId']}/resume", timeout=60)
                    final = self._wait_for_end(h, END_BOUND_S)
                out.state = final.get("state", "")
                if final.get("state") in (None, "running"):
                    out.stuck = True
                    out.problems.append(f"still {final.get('state') or 'unanswered'} {END_BOUND_S}s after the heal "
                                        f"(phase {final.get('phase')})")
                elif final["state"] not in ("succeeded", "rolled_back"):
                    out.problems.append(f"ended {final['state']}: {final.get('error')}")
                if fault.kind == "disk":
                    self._after_disk(final, out)
                self._after(project, schema, out)
                time.sleep(1)
            self._count_lost(project, schema, writer, out)
        except Exception as exc:  # a case that cannot even be checked fails, and the matrix goes on
            out.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            try:
                self._cleanup(project)
            finally:
                if fault.kind == "disk":
                    self._unmount_spool()
        return out

    def _after_disk(self, final: dict, out: Outcome) -> None:
        """The copy met the full disk (its dump cannot fit in the room left), the migration rolled
        back saying so, and no partial dump is left taking the room."""
        if final.get("state") != "rolled_back" or "could not be kept in the spool" not in (final.get("error") or ""):
            out.problems.append(f"expected a rollback naming the full spool, got {final.get('state')}: "
                                f"{final.get('error')}")
        partial = [str(p) for p in self._spool.rglob("*.partial")]
        if partial:
            out.problems.append(f"partial dump files left: {partial}")

    def _create(self, name: str) -> dict | None:
        try:
            response = self.fleet.api("POST", "create", {"name": name, "mode": "v2_shared"}, timeout=60)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 201 else None

    def _migrate(self, project: dict) -> None:
        try:
            self.fleet.migrate(project)
        except httpx.HTTPError:
            pass  # the controller it asked may be the fault; the status says how it ended

    def _wait_for_phase(self, h: str, phase: str) -> bool:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = self._status(h)
            if status.get("phase") == phase and status.get("running"):
                return True
            if status and not status.get("running") and status.get("state") not in (None, "running"):
                return False  # ended before it got there
            time.sleep(0.05)
        return False

    def _wait_while_current(self, h: str, step: str, bound: float) -> None:
        """Until the migration's `step` is done, failed or undone, or the migration ended."""
        deadline = time.monotonic() + bound
        while time.monotonic() < deadline:
            status = self._status(h)
            states = {s["name"]: s["status"] for s in status.get("steps", [])}
            if status and not (status.get("running") and states.get(step) in ("current", "left")):
                return
            time.sleep(0.1)

    def _wait_for_end(self, h: str, bound: float) -> dict:
        deadline = time.monotonic() + bound
        status = {}
        while time.monotonic() < deadline:
            status = self._status(h)
            if status.get("state") not in (None, "running"):
                return status
            time.sleep(0.5)
        return status

    def _after(self, project: dict, schema: str, out: Outcome) -> None:
        fleet, h = self.fleet, project["summary"]["hash"]
        agents = ("dev-db", "dev-docker", "dev-gateway", "dev-backup")
        try:
            wait_until(lambda: all(a["connected"] for a in fleet.api("GET", "agents", timeout=10).json()
                                   if a["name"] in agents), 60, "every agent to reconnect")
        except (AssertionError, httpx.HTTPError) as exc:
            out.problems.append(f"agents not all reconnected: {exc}")
        [(maintenance, mode)] = fleet.catalog_sql("SELECT maintenance, mode FROM projects WHERE hash = %s", (h,))
        if maintenance:
            out.problems.append("maintenance left on")
        slots = fleet.shared_sql("SELECT slot_name FROM pg_replication_slots")
        if slots:
            out.problems.append(f"replication slots left: {slots}")
        containers = sorted(self._host_docker("ps", "-a", "--filter", f"label=flux.hash={h}",
                                              "--format", "{{.Names}}").split())
        expected = [] if mode == "v2_shared" else sorted(f"flux-{h}-{project['summary']['slug']}-{c}"
                                                         for c in ("api", "db"))
        if containers != expected:
            out.problems.append(f"containers {containers}, expected {expected}")
        token = app_token(project["projectJwtSecret"], sub="writer")

        def writes() -> bool:
            try:
                return fleet.gateway("POST", fleet.host(project), "/todos", token=token,
                                     json={"title": "after"}).status_code in (200, 201)
            except httpx.HTTPError:
                return False

        try:
            wait_until(writes, 30, "a write through the gateway")
        except AssertionError:
            out.problems.append("writes refused after the migration ended (a lock or maintenance left)")

    def _count_lost(self, project: dict, schema: str, writer: Writer, out: Outcome) -> None:
        fleet, h = self.fleet, project["summary"]["hash"]
        [(mode,)] = fleet.catalog_sql("SELECT mode FROM projects WHERE hash = %s", (h,))
        if mode == "v2_shared":
            kept = {r[0] for r in fleet.shared_sql(f"SELECT title FROM {schema}.todos WHERE owner = 'writer'")}
        else:
            name = f"flux-{h}-{project['summary']['slug']}-db"
            kept = set(self._host_docker("exec", name, "psql", "-U", "postgres", "-Atc",
                                         f"SELECT title FROM {schema}.todos WHERE owner = 'writer'").split())
        acked = {f"w{i}" for i in writer.acked_ids}
        out.acked, out.lost = len(acked), len(acked - kept)


def summary(outcomes: list[Outcome]) -> dict:
    return {"cases": len(outcomes), "passed": sum(o.passed for o in outcomes),
            "lost_writes": sum(o.lost for o in outcomes), "stuck": sum(o.stuck for o in outcomes),
            "missed_phase": sum(not o.hit for o in outcomes)}


def table(outcomes: list[Outcome]) -> str:
    lines = [f"{'case':44} {'hit':4} {'end':22} {'s':>6} {'acked':>6} {'lost':>5} result"]
    for o in outcomes:
        lines.append(f"{o.case:44} {'yes' if o.hit else 'no':4} {o.state + (' (resumed)' if o.resumed else ''):22} "
                     f"{o.seconds:6.1f} {o.acked:6d} {o.lost:5d} {'pass' if o.passed else 'FAIL: ' + '; '.join(o.problems)}")
    return "\n".join(lines)


def dumps(outcomes: list[Outcome]) -> str:
    return json.dumps(summary(outcomes))
