"""Fleet benchmark: N agents with real mTLS gRPC streams against one controller.

Starts a catalog cluster and a controller, enrolls N agents through join tokens,
connects them from a few worker processes (each agent its own channel and stream),
then measures the time until all are connected (watched through the controller's metrics, not
its list of agents), how long that list takes once they are, ping round trips through the
controller's API (each ping crosses the agent's stream), how late the controller's event
loop ran while they were pinged (its flux_controller_event_loop_lag_seconds histogram: looks
more than 50 ms late, and the bucket holding 99% of them), the share of the CPUs' time the
hypervisor gave to others meanwhile (steal), and the controller's RSS: idle, once every agent
is enrolled (none connected yet), once all are connected, and at its peak.
With --hold S it then keeps every agent connected for S seconds more, heartbeating every
--heartbeat-seconds, and reports how the controller's RSS moved over that time per 100,000
heartbeats it handled: memory that grows with uptime shows there, not in a short run.
With --grpc-floor it then measures a bare gRPC server holding as many mTLS streams
(bench/grpc_floor.py), so what the controller holds above gRPC's own shows. The last line of
output is one JSON object with the figures.

    python bench/fleet.py [--agents 200] [--workers 4] [--enroll-threads 4] [--grpc-floor]
                          [--hold 0] [--heartbeat-seconds 10]
"""

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import psycopg

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.runtime.config import AgentConfig, StateDir as AgentStateDir  # noqa: E402
from agent.runtime.connection import Agent, Backoff  # noqa: E402
from agent.errors import AgentError  # noqa: E402
from agent.runtime.identity import fetch_pinned_ca, new_key_and_csr  # noqa: E402
from agent.runtime.wire import enroll as enroll_rpc  # noqa: E402
from tests.support import (Controller, cpu_times, lag_figures, loop_lag, remove_cluster, steal_percent,  # noqa: E402
                           test_cluster)


LAG = "flux_controller_event_loop_lag_seconds"
HEARTBEATS = "flux_controller_heartbeats_total"


def enroll_all(controller: Controller, base: pathlib.Path, count: int, threads: int) -> list[pathlib.Path]:
    """Enrolls `count` agents, `threads` at a time, each with a join token of its own."""
    host = "127.0.0.1"
    ca_pem = fetch_pinned_ca(host, controller.ports["enroll"], controller.join_token(["db"])["ca_fingerprint"])
    # One client for every token: a client made per request costs more than the request.
    api = httpx.Client(base_url=f"{controller.api_base}/cli/v1/", timeout=30,
                       headers={"Authorization": f"Bearer {controller.token}"})

    def one(i: int) -> pathlib.Path:
        answer = api.post("agents/tokens", json={"roles": ["db"], "ttl_seconds": 600})
        if answer.status_code != 201:
            raise SystemExit(f"a join token was refused: {answer.status_code} {answer.text[:200]}")
        token = answer.json()
        name = f"bench-{i:05d}"
        key_pem, csr_pem = new_key_and_csr(name)
        enrolled = enroll_rpc(token["enroll_address"], ca_pem, token["token"], name, ["db"], csr_pem)
        state = AgentStateDir(base / name)
        state.write("key.pem", key_pem, secret=True)
        state.write("cert.pem", enrolled.certificate_pem)
        state.write("ca.pem", ca_pem)
        state.save(AgentConfig(name=name, roles=["db"], controller=f"{host}:{enrolled.fleet_port}",
                               server_name=enrolled.server_name))
        return state.path

    with api, concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(count)))


def worker(dirs: list[str]) -> None:
    """Keeps every given agent connected until terminated."""

    async def keep(agent: Agent) -> None:
        backoff = Backoff()
        while True:
            try:
                await agent.session(backoff)
            except AgentError:
                await asyncio.sleep(backoff.next_delay())

    async def main() -> None:
        tools = {"pg_dump": "bench", "psql": "bench"}
        await asyncio.gather(*(keep(Agent(AgentStateDir(d), tools=tools)) for d in dirs))

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    asyncio.run(main())


def metric(metrics_url: str, name: str) -> float:
    """The value of an unlabelled series of the controller's metrics."""
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise RuntimeError(f"no {name} at {metrics_url}")


def agents_connected(metrics_url: str) -> int:
    """Streams open to the controller, by its `flux_controller_agents_connected` gauge."""
    return int(metric(metrics_url, "flux_controller_agents_connected"))


def rss_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (the peak) of a process, in MiB."""
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def ping_all(controller: Controller, names: list[str], rounds: int, concurrency: int) -> tuple[list[float], dict]:
    """Round trips in ms, and the failed pings by answer ("503: catalog busy ...")."""
    rtts: list[float] = []
    errors: dict[str, int] = {}
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {controller.token}"}
    async with httpx.AsyncClient(base_url=f"{controller.api_base}/cli/v1/", headers=headers, timeout=30) as http:
        async def one(name: str) -> None:
            async with limit:
                response = await http.post(f"agents/{name}/ping")
                if response.status_code != 200:
                    why = f"{response.status_code}: {response.json().get('error', '')[:80]}"
                    errors[why] = errors.get(why, 0) + 1
                    return
                rtts.append(response.json()["rtt_ms"])

        for _ in range(rounds):
            await asyncio.gather(*(one(n) for n in names))
    return rtts, errors


def hold(pid: int, metrics_url: str, agents: int, seconds: float) -> dict:
    """The controller's RSS over `seconds` with every agent connected and heartbeating."""
    print(f"holding {agents} agents for {seconds:g}s", file=sys.stderr, flush=True)
    # After a minute: what the pings left has been collected and trimmed (controller/memory.py).
    time.sleep(min(60.0, seconds / 4))
    start_rss, start_beats = rss_mb(pid, "VmRSS"), metric(metrics_url, HEARTBEATS)
    time.sleep(seconds)
    connected = agents_connected(metrics_url)
    if connected != agents:
        raise SystemExit(f"agents disconnected while held: {connected} of {agents} connected")
    end_rss, beats = rss_mb(pid, "VmRSS"), metric(metrics_url, HEARTBEATS) - start_beats
    return {"hold_s": seconds, "hold_heartbeats": int(beats),
            "hold_rss_start_mb": round(start_rss, 1), "hold_rss_end_mb": round(end_rss, 1),
            "hold_rss_mb_per_100k_heartbeats": round((end_rss - start_rss) * 100_000 / max(beats, 1), 2)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4, help="processes the agents are spread over")
    parser.add_argument("--enroll-threads", type=int, default=4,
                        help="enrollments in flight at once (the controller takes at most 8 per address)")
    parser.add_argument("--rounds", type=int, default=3, help="pings per agent")
    parser.add_argument("--concurrency", type=int, default=16, help="pings in flight at once")
    parser.add_argument("--heartbeat-seconds", type=int, default=10,
                        help="how often each agent sends a heartbeat (the controller's --heartbeat-seconds)")
    parser.add_argument("--hold", type=float, default=0,
                        help="seconds to keep the agents connected after the pings, to see whether the "
                             "controller's memory grows with the heartbeats it handles (0: not held)")
    parser.add_argument("--grpc-floor", action="store_true",
                        help="also measure a bare gRPC server holding as many mTLS streams (bench/grpc_floor.py), "
                             "so the controller's own share of its RSS shows")
    args = parser.parse_args()
    if min(args.agents, args.workers, args.rounds, args.concurrency, args.enroll_threads) < 1:
        parser.error("--agents, --workers, --rounds, --concurrency and --enroll-threads must be at least 1")
    if not 1 <= args.heartbeat_seconds <= 300 or args.hold < 0:
        parser.error("--heartbeat-seconds must be between 1 and 300, --hold at least 0")
    if args.enroll_threads > 8:
        parser.error("--enroll-threads must be at most 8: the controller refuses more enrollment connections "
                     "from one address")

    tmp = pathlib.Path(tempfile.mkdtemp(prefix="flux-bench-"))
    cluster = test_cluster(tmp)
    processes: list[multiprocessing.Process] = []
    controller = None
    try:
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE bench_catalog")
        controller = Controller(tmp / "controller", cluster.url("bench_catalog"))
        controller.run_args = ("--metrics-listen", "127.0.0.1:0")
        controller.start(heartbeat_seconds=args.heartbeat_seconds)
        metrics_at = re.search(r" metrics=(\S+)", controller.log.read_text()).group(1)
        metrics_url = f"http://{metrics_at}/metrics"
        idle_rss = rss_mb(controller.proc.pid, "VmRSS")
        print(f"enrolling {args.agents} agents", file=sys.stderr, flush=True)
        started = time.perf_counter()
        dirs = enroll_all(controller, tmp / "agents", args.agents, args.enroll_threads)
        enroll_s = time.perf_counter() - started
        # What enrolling them left behind, before any connects: the connected figure less this one
        # is what the connections hold.
        enrolled_rss = rss_mb(controller.proc.pid, "VmRSS")

        print("connecting", file=sys.stderr, flush=True)
        started = time.perf_counter()
        for i in range(args.workers):
            proc = multiprocessing.Process(target=worker, args=([str(d) for d in dirs[i::args.workers]],))
            proc.start()
            processes.append(proc)
        while True:
            # From the controller's metrics, not its list of agents: listing 5,000 agents every
            # second took a third of the controller's time while they connected, and slowed it.
            connected = agents_connected(metrics_url)
            if connected == args.agents:
                break
            if time.perf_counter() - started > 300:
                raise SystemExit(f"only {connected} of {args.agents} agents connected after 300s")
            time.sleep(1)
        connect_s = time.perf_counter() - started
        time.sleep(5)  # the last hellos' work settles
        connected_rss = rss_mb(controller.proc.pid, "VmRSS")
        # More streams than agents: some agents gave up on a connection and made another.
        streams = controller.log.read_text(errors="replace").count(" connected from ")
        list_ms = []
        for _ in range(3):  # what `flux agents` costs the controller with every agent connected
            begun = time.perf_counter()
            answer = controller.api("GET", "agents")
            list_ms.append((time.perf_counter() - begun) * 1000)
            if answer.status_code != 200 or sum(a["connected"] for a in answer.json()) != args.agents:
                raise SystemExit(f"the list of agents is not every agent connected: {answer.status_code}")

        print("pinging", file=sys.stderr, flush=True)
        names = [d.name for d in dirs]
        lag_before, cpu_before = loop_lag(metrics_url, LAG), cpu_times()
        rtts, ping_errors = asyncio.run(ping_all(controller, names, args.rounds, args.concurrency))
        ping_steal = steal_percent(cpu_before, cpu_times())
        lag = lag_figures(lag_before, loop_lag(metrics_url, LAG))
        if not rtts:
            raise SystemExit(f"every ping failed: {ping_errors}")
        figures = {
            "agents": args.agents,
            "enroll_s": round(enroll_s, 2),
            "enroll_per_s": round(args.agents / enroll_s, 1),
            "connect_s": round(connect_s, 2),
            "list_agents_ms": round(statistics.median(list_ms), 1),
            "streams_opened": streams,
            "pings": len(rtts),
            "ping_errors": sum(ping_errors.values()),
            "ping_p50_ms": round(statistics.median(rtts), 2),
            "ping_p99_ms": round(percentile(rtts, 0.99), 2),
            **lag,
            "ping_cpu_steal_pct": ping_steal,
            "controller_idle_rss_mb": round(idle_rss, 1),
            "controller_enrolled_rss_mb": round(enrolled_rss, 1),
            "controller_connected_rss_mb": round(connected_rss, 1),
            "controller_rss_mb": round(rss_mb(controller.proc.pid, "VmRSS"), 1),
            "controller_peak_rss_mb": round(rss_mb(controller.proc.pid, "VmHWM"), 1),
        }
        if args.hold:
            figures.update(hold(controller.proc.pid, metrics_url, args.agents, args.hold))
    except BaseException:
        if controller is not None and controller.log.exists():
            # What the controller said of it, before its state directory goes.
            said = [l for l in controller.log.read_text().splitlines() if " ERROR " in l or " WARNING " in l]
            print("the controller's last errors and warnings:\n" + "\n".join(said[-20:]), file=sys.stderr)
        raise
    finally:
        for proc in processes:
            proc.terminate()
            proc.join(10)
        if controller is not None:
            controller.stop()
        remove_cluster(cluster)
        shutil.rmtree(tmp, ignore_errors=True)
    if ping_errors:
        print(f"failed pings: {ping_errors}", file=sys.stderr)
    if args.grpc_floor:
        print(f"gRPC's floor: a bare server with {args.agents} streams", file=sys.stderr, flush=True)
        # Its own program: spawned from this one, the bare server would carry this one's imports.
        floor = subprocess.run([sys.executable, str(ROOT / "bench" / "grpc_floor.py"), "--connections",
                                str(args.agents), "--workers", str(args.workers)],
                               capture_output=True, text=True, timeout=900)
        if floor.returncode != 0:
            raise SystemExit(f"bench/grpc_floor.py failed: {floor.stderr.strip()[-2000:]}")
        figures.update(json.loads(floor.stdout.splitlines()[-1]))
        figures["controller_over_floor_mb"] = round(figures["controller_rss_mb"] - figures["grpc_floor_rss_mb"], 1)
        figures["controller_over_floor_kb_per_agent"] = round(
            figures["controller_over_floor_mb"] * 1024 / args.agents, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
