"""Listing benchmark: `flux list` (GET /list) of many dedicated projects whose docker agent is offline.

Starts a catalog cluster and a controller, enrolls one docker agent and leaves it offline, puts
N active dedicated projects of it in the catalog, then times the list route. Status comes from
what docker agents last reported, so no agent is asked and no job is queued: every project is
listed `unknown`. The same is timed with 100 projects, to give the cost per project as a ratio.
Then it puts N agents in the catalog, with the facts a db agent reports, and times `flux agents`
(GET /agents), which the controller answers on the event loop that serves every agent's stream.
The last line of output is one JSON object with the figures.

    python bench/listing.py [--projects 10000] [--agents 5000] [--rounds 5]
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time
import uuid

import httpx
import psycopg

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import AgentProc, Controller, remove_cluster, test_cluster  # noqa: E402


def add_projects(catalog_url: str, owner: int, agent: str, start: int, count: int) -> None:
    with psycopg.connect(catalog_url) as conn, conn.cursor() as cur:
        with cur.copy("COPY projects (id, owner_id, name, slug, hash, mode, lifecycle, api_schema,"
                      " jwt_secret_sealed, docker_agent, observed_status) FROM STDIN") as copy:
            for i in range(start, start + count):
                copy.write_row((str(uuid.uuid4()), owner, f"Bench {i}", f"bench-{i}", f"{i:07x}", "v1_dedicated",
                                "active", "api", "unused", agent, "running"))


def add_agents(catalog_url: str, count: int) -> None:
    facts = json.dumps({"hostname": "bench-host", "agent_version": "0.1.0", "roles": ["db"],
                        "tools": {"pg_dump": "15.8", "psql": "15.8"}, "spool_free_bytes": 123456789})
    with psycopg.connect(catalog_url) as conn:
        conn.execute("INSERT INTO agents (name, roles, cert_serial, cert_expires_at, last_seen, facts)"
                     " SELECT 'bench-db-' || i, ARRAY['db'], i::text, now() + interval '30 days', now(), %s::jsonb"
                     " FROM generate_series(1, %s) i", (facts, count))


def time_list(api_base: str, token: str, rounds: int, path: str = "list") -> tuple[list[float], list[dict]]:
    times, items = [], []
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(rounds):
            started = time.perf_counter()
            response = http.get(f"{api_base}/cli/v1/{path}")
            times.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            items = response.json()
    return times, items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--projects", type=int, default=10000)
    parser.add_argument("--agents", type=int, default=5000, help="agents in the catalog for `flux agents`")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.projects < 100:
        parser.error("--projects must be at least 100 (the baseline lists 100)")
    if args.agents < 1 or args.rounds < 1:
        parser.error("--agents and --rounds must be at least 1")

    work = pathlib.Path(tempfile.mkdtemp(prefix="flux-bench-list-"))
    cluster = test_cluster(work)
    catalog_url = cluster.url("flux_catalog")
    cluster.create_database("flux_catalog")
    controller = Controller(work / "controller", catalog_url).start()
    try:
        AgentProc.enroll(controller, work / "agents", "bench-docker", "docker")  # enrolled, never started
        with psycopg.connect(catalog_url) as conn:
            owner = conn.execute("SELECT id FROM users ORDER BY id LIMIT 1").fetchone()[0]
            jobs_before = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]

        add_projects(catalog_url, owner, "bench-docker", 0, 100)
        base_times, base_items = time_list(controller.api_base, controller.token, args.rounds)
        add_projects(catalog_url, owner, "bench-docker", 100, args.projects - 100)
        times, items = time_list(controller.api_base, controller.token, args.rounds)
        with psycopg.connect(catalog_url) as conn:
            jobs_queued = conn.execute("SELECT count(*) FROM jobs").fetchone()[0] - jobs_before
        add_agents(catalog_url, args.agents)
        agent_times, agents = time_list(controller.api_base, controller.token, args.rounds, "agents")
    finally:
        controller.stop()
        remove_cluster(cluster)

    statuses = sorted({item["status"] for item in items})
    figures = {
        "projects": len(items),
        "list_ms_p50": round(statistics.median(times), 1),
        "list_ms_max": round(max(times), 1),
        "list_100_ms_p50": round(statistics.median(base_times), 1),
        "ratio_to_100": round(statistics.median(times) / statistics.median(base_times), 1),
        "statuses": statuses,
        "jobs_queued": jobs_queued,
        "agent_online": False,
        "agents": len(agents),
        "agents_list_ms_p50": round(statistics.median(agent_times), 1),
        "agents_list_ms_max": round(max(agent_times), 1),
        "rounds": args.rounds,
    }
    print(f"{len(items)} projects of an offline docker agent: list p50 {figures['list_ms_p50']} ms, "
          f"max {figures['list_ms_max']} ms (100 projects: {figures['list_100_ms_p50']} ms); "
          f"statuses {statuses}; jobs queued {jobs_queued}")
    print(f"{len(agents)} agents: list p50 {figures['agents_list_ms_p50']} ms, max {figures['agents_list_ms_max']} ms")
    print(json.dumps(figures))
    ok = (len(base_items) == 100 and len(items) == args.projects and statuses == ["unknown"] and jobs_queued == 0
          and len(agents) == args.agents + 1)  # and the docker agent
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
