"""Gateway benchmark: authenticated reads through Caddy + the gateway agent versus
straight to the same pooled PostgREST, in one run, at a fixed request rate.

Starts a local fleet, creates a project with a small table, then sends open-loop
traffic (requests start on schedule whether or not earlier ones finished) first
directly to the pooled PostgREST (with a pool token, as the gateway would mint),
then through the gateway (HTTPS, the app's token). Prints p50/p99 of both and the
latency the gateway adds. The last line of output is one JSON object with the figures.

    python bench/gateway.py [--rps 1000] [--seconds 5]
"""

import argparse
import asyncio
import json
import pathlib
import ssl
import statistics
import sys
import tempfile
import time

import httpx
import jwt

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import LocalFleet, app_token  # noqa: E402

SCHEMA_SQL = """
create table public.items (id serial primary key, name text not null);
insert into public.items (name) select 'item ' || g from generate_series(1, 20) g;
grant select on public.items to authenticated;
"""


async def paced(client: httpx.AsyncClient, url: str, headers: dict, rps: int, seconds: float,
                extensions: dict) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    interval = 1 / rps
    start = time.perf_counter()
    tasks = []

    async def one() -> None:
        nonlocal errors
        began = time.perf_counter()
        try:
            response = await client.get(url, headers=headers, extensions=extensions)
            if response.status_code != 200:
                errors += 1
                return
        except httpx.HTTPError:
            errors += 1
            return
        latencies.append((time.perf_counter() - began) * 1000)

    for i in range(int(rps * seconds)):
        delay = start + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return latencies, errors


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def measure(fleet: LocalFleet, project: dict, rps: int, seconds: float) -> dict:
    host = fleet.host(project)
    detail = fleet.api("GET", f"projects/{project['summary']['hash']}").json()
    schema = detail["apiSchema"]
    role = schema.removesuffix("_api") + "_role"
    pool_secret = fleet.fleet.state["secrets"]["pool_jwt"]
    pool_token = jwt.encode({"sub": "bench", "role": role, "exp": int(time.time()) + 3600}, pool_secret,
                            algorithm="HS256")
    direct_url = f"http://127.0.0.1:{fleet.fleet.ports['pool_api']}/items?select=id,name&limit=10"
    direct_headers = {"Authorization": f"Bearer {pool_token}", "Accept-Profile": schema}
    gateway_url = f"https://127.0.0.1:{fleet.gateway_port}/items?select=id,name&limit=10"
    gateway_headers = {"Host": host, "Authorization": f"Bearer {app_token(project['projectJwtSecret'], sub='bench')}"}
    tls = ssl.create_default_context(cafile=fleet.info["gateway_ca"])
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    results = {}
    async with httpx.AsyncClient(limits=limits, timeout=30) as direct, \
            httpx.AsyncClient(limits=limits, timeout=30, verify=tls) as gateway:
        for client, url, headers, ext in ((direct, direct_url, direct_headers, {}),
                                          (gateway, gateway_url, gateway_headers, {"sni_hostname": host})):
            await paced(client, url, headers, min(rps, 200), 1, ext)  # warm connections and caches
        for name, client, url, headers, ext in (("direct", direct, direct_url, direct_headers, {}),
                                                ("gateway", gateway, gateway_url, gateway_headers,
                                                 {"sni_hostname": host})):
            print(f"{name}: {rps} requests/s for {seconds:g}s", file=sys.stderr, flush=True)
            started = time.perf_counter()
            latencies, errors = await paced(client, url, headers, rps, seconds, ext)
            elapsed = time.perf_counter() - started
            results[name] = {"p50": statistics.median(latencies), "p99": pct(latencies, 0.99),
                             "errors": errors, "achieved_rps": len(latencies) / elapsed}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rps", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    fleet = LocalFleet(pathlib.Path(tempfile.mkdtemp(prefix="flux-bench-gw-")) / "dev")
    try:
        project = fleet.create("Gateway Bench")
        pushed = fleet.push(project, {"001_items.sql": SCHEMA_SQL})
        pushed.raise_for_status()
        r = asyncio.run(measure(fleet, project, args.rps, args.seconds))
    finally:
        fleet.close()
    figures = {
        "rps": args.rps,
        "direct_achieved_rps": round(r["direct"]["achieved_rps"], 1),
        "gateway_achieved_rps": round(r["gateway"]["achieved_rps"], 1),
        "direct_errors": r["direct"]["errors"],
        "gateway_errors": r["gateway"]["errors"],
        "direct_p50_ms": round(r["direct"]["p50"], 3),
        "direct_p99_ms": round(r["direct"]["p99"], 3),
        "gateway_p50_ms": round(r["gateway"]["p50"], 3),
        "gateway_p99_ms": round(r["gateway"]["p99"], 3),
        "added_p50_ms": round(r["gateway"]["p50"] - r["direct"]["p50"], 3),
        "added_p99_ms": round(r["gateway"]["p99"] - r["direct"]["p99"], 3),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
