"""Gateway benchmark: the latency Caddy + the gateway agent add, at a fixed request rate, with
`wrk` (apt-get install wrk) as the load generator and a fixed-response upstream, so neither the
load nor the upstream is the bottleneck.

Starts a local fleet and creates a pooled project; then stops the pooled PostgREST stand-in and
serves the same port with a Caddy that answers a fixed JSON body (Go, no database). wrk sends
the same read at the rate, each of its threads by a schedule (not a fixed wait after answers):

- direct: plain HTTP to the upstream;
- forward_auth: plain HTTP straight at the gateway agent's forward_auth, with the headers Caddy
  sends it (no Caddy, no upstream): the agent's own share of what the gateway adds;
- gateway: HTTPS through Caddy, the app's token checked by the gateway agent's forward-auth
  (cached after the first request), a pool token minted, on to the same upstream;
- gateway, new token each request: 20,000 tokens in turn, more than the gateway's verified-token
  cache holds, so every request pays the JWT verification (what the cache saves).

Prints each path's achieved rate and p50/p99, and for each how late the gateway agent's event
loop ran (flux_agent_event_loop_lag_seconds: looks more than 10 ms late, and the bucket holding
99% of them; on the direct path, while it answered nothing), and the share of the CPUs' time
the hypervisor gave to others meanwhile (steal: a tail measured while it is high is the host's as
much as the gateway's); the last line of output is one JSON object.

    python bench/gateway.py [--rps 1000] [--seconds 10]
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import (LocalFleet, app_token, cpu_times, lag_figures, loop_lag, steal_percent,  # noqa: E402
                           wait_until)

ITEMS = json.dumps([{"id": i, "name": f"item {i}"} for i in range(1, 11)])
PATH = "/items?select=id,name&limit=10"
MISS_TOKENS = 20000
# The gateway agent answers every request's forward_auth on its event loop: how late it ran.
AGENT_LAG = "flux_agent_event_loop_lag_seconds"


def fixed_upstream(port: int, work: pathlib.Path) -> subprocess.Popen:
    config = {"admin": {"disabled": True}, "apps": {"http": {"servers": {"fixed": {
        "listen": [f"127.0.0.1:{port}"],
        "routes": [{"handle": [{"handler": "static_response", "status_code": 200, "body": ITEMS,
                                "headers": {"Content-Type": ["application/json"]}}]}]}}}}}
    path = work / "fixed.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(["caddy", "run", "--config", str(path)], stdout=subprocess.DEVNULL,
                            stderr=open(work / "fixed.log", "wb"))
    import httpx

    def up() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 20, "the fixed-response upstream")
    return proc


class HostsEntry:
    """wrk sends the URL's host as the TLS server name, so the project's host must resolve: an
    /etc/hosts line for it while the benchmark runs (removed after)."""

    PATH = pathlib.Path("/etc/hosts")

    def __init__(self, host: str):
        self.line = f"127.0.0.1 {host} # flux bench/gateway.py\n"

    def __enter__(self):
        with open(self.PATH, "a") as handle:
            handle.write(self.line)
        return self

    def __exit__(self, *exc):
        kept = [l for l in self.PATH.read_text().splitlines(keepends=True) if l != self.line]
        self.PATH.write_text("".join(kept))


WRK_THREADS = 2

# Each wrk thread sends at its share of the rate by a schedule of its own, however long answers
# take: before each request, wrk asks `delay` how many ms to wait, and it answers the time left
# to that request's slot (wrk's LuaJIT reads the monotonic clock through its ffi). A schedule
# more than a second behind (every connection was waiting on answers) starts again from now.
PACING = """local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_nsec; } flux_timespec; int clock_gettime(int, flux_timespec *); ]]
local ts = ffi.new("flux_timespec")
local function now_ms() ffi.C.clock_gettime(1, ts); return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6 end
local due = nil
delay = function()
  local now = now_ms()
  if due == nil or due < now - 1000 then due = now end
  due = due + %r
  return math.max(0, math.floor(due - now))
end"""


def lua(headers: dict, interval_ms: float, tokens: list[str] | None = None) -> str:
    """wrk's script: `headers` on every request (or a token of `tokens` in turn), one request
    every `interval_ms` per thread."""
    lines = [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    if tokens:
        lines.append("local tokens = {" + ",".join(json.dumps(t) for t in tokens) + "}")
        lines.append("local i = math.random(#tokens)")
    lines.append("request = function()")
    if tokens:
        lines.append('  i = i % #tokens + 1; wrk.headers["Authorization"] = "Bearer " .. tokens[i]')
    lines.append(f"  return wrk.format(nil, {json.dumps(PATH)})")
    lines.append("end")
    lines.append(PACING % interval_ms)
    lines.append("""done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end""")
    return "\n".join(lines) + "\n"


def wrk(url: str, script: str, connections: int, seconds: float, work: pathlib.Path) -> dict:
    path = work / "script.lua"
    path.write_text(script)
    proc = subprocess.run(["wrk", "-t", str(WRK_THREADS), "-c", str(connections), "-d", f"{seconds:g}s",
                           "-s", str(path), url], capture_output=True, text=True, timeout=seconds + 120)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed: {proc.stderr.strip() or proc.stdout.strip()}")
    out = json.loads(line.removeprefix("RESULT "))
    out["achieved_rps"] = out["requests"] / (out["duration_us"] / 1e6)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rps", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=0,
                        help="connections the requests are spread over (default: one per 50 requests/s)")
    args = parser.parse_args()
    if args.rps < 1 or args.seconds <= 0 or args.connections < 0:
        parser.error("--rps and --seconds must be positive, --connections at least 0 (0: the default)")
    for tool in ("wrk", "caddy"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is missing: apt-get install -y {tool}")
    connections = max(WRK_THREADS, args.connections or args.rps // 50)
    interval_ms = 1000 * WRK_THREADS / args.rps
    work = pathlib.Path(tempfile.mkdtemp(prefix="flux-bench-gw-"))
    fleet = LocalFleet(work / "dev")
    upstream = None
    try:
        project = fleet.create("Gateway Bench")
        secret = project["projectJwtSecret"]
        fleet.stop_process("pooled-postgrest")
        port = fleet.fleet.ports["pool_api"]
        upstream = fixed_upstream(port, work)
        host = fleet.host(project)
        direct_url = f"http://127.0.0.1:{port}{PATH}"
        auth_url = f"http://127.0.0.1:{fleet.fleet.ports['forward_auth']}/verify"
        gateway_url = f"https://{host}:{fleet.gateway_port}{PATH}"
        token = app_token(secret, sub="bench")
        answer = fleet.gateway("GET", host, PATH, token=token)
        if answer.status_code != 200 or answer.json() != json.loads(ITEMS):
            raise RuntimeError(f"the gateway does not reach the fixed upstream: {answer.status_code} {answer.text[:200]}")
        now = int(time.time())
        import jwt

        tokens = [jwt.encode({"sub": f"u{i}", "iat": now, "exp": now + 3600}, secret, algorithm="HS256")
                  for i in range(MISS_TOKENS)]
        runs, agent_lag, steal = {}, {}, {}
        agent_metrics = fleet.info["metrics"]["dev-gateway"]
        with HostsEntry(host):
            for name, url, script in (
                    ("direct", direct_url, lua({}, interval_ms)),
                    ("forward_auth", auth_url,
                     lua({"Host": host, "Authorization": f"Bearer {token}", "X-Forwarded-Method": "GET"},
                         interval_ms)),
                    ("gateway", gateway_url,
                     lua({"Host": host, "Authorization": f"Bearer {token}"}, interval_ms)),
                    ("gateway_uncached", gateway_url, lua({"Host": host}, interval_ms, tokens))):
                wrk(url, script, connections, 2, work)  # warm connections, caches and Caddy
                print(f"{name}: {args.rps} requests/s for {args.seconds:g}s over {connections} connections",
                      file=sys.stderr, flush=True)
                before, cpu_before = loop_lag(agent_metrics, AGENT_LAG), cpu_times()
                runs[name] = wrk(url, script, connections, args.seconds, work)
                steal[name] = steal_percent(cpu_before, cpu_times())
                agent_lag[name] = lag_figures(before, loop_lag(agent_metrics, AGENT_LAG), late_ms=10)
    finally:
        if upstream is not None:
            upstream.terminate()
            upstream.wait(10)
        fleet.close()
        shutil.rmtree(work, ignore_errors=True)
    ms = {name: {"p50": r["p50_us"] / 1000, "p99": r["p99_us"] / 1000} for name, r in runs.items()}
    figures = {"rps": args.rps, "seconds": args.seconds, "connections": connections, "load": "wrk",
               "upstream": "fixed response (caddy)"}
    for name, r in runs.items():
        figures[f"{name}_achieved_rps"] = round(r["achieved_rps"], 1)
        figures[f"{name}_errors"] = r["errors"] + r["non2xx"]
        figures[f"{name}_p50_ms"] = round(ms[name]["p50"], 3)
        figures[f"{name}_p99_ms"] = round(ms[name]["p99"], 3)
        figures[f"{name}_cpu_steal_pct"] = steal[name]
        figures.update({f"{name}_agent_{key}": value for key, value in agent_lag[name].items()})
    figures["added_p50_ms"] = round(ms["gateway"]["p50"] - ms["direct"]["p50"], 3)
    figures["added_p99_ms"] = round(ms["gateway"]["p99"] - ms["direct"]["p99"], 3)
    figures["uncached_over_cached_p50"] = round(ms["gateway_uncached"]["p50"] / ms["gateway"]["p50"], 2)
    for name in runs:
        print(f"{name:17} {figures[name + '_achieved_rps']:7.1f} req/s  p50 {figures[name + '_p50_ms']:.3f} ms  "
              f"p99 {figures[name + '_p99_ms']:.3f} ms  errors {figures[name + '_errors']}  "
              f"CPU stolen {figures[name + '_cpu_steal_pct']}%")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
