"""Migrate benchmark: a tenant of --size-mb moved by a raw `pg_dump -n <schema> | psql` into a
fresh database, and by `flux migrate` (full; online where the shared cluster allows, or
--offline for the copy under the write lock), in one run.

With --writer RATE a steady writer inserts through the gateway (HTTPS, an app token) from
before the raw pipe until after the migrate, retrying refused writes with the same id. Reported: the
data-move time (ours: the copy into the stack), the total migrate time, the window from the
lock step to the end of the cutover as the controller saw it, the ratio raw ÷ ours of the
data-move times, the sync's lag at the pause, and the writer's figures: `max_write_gap_s`
(the longest time between two acknowledged writes, client side), acknowledged, refused and
lost writes (acknowledged ids missing from the dedicated database afterwards; must be 0).
The last line of output is one JSON object with the figures.

    python bench/migrate.py [--size-mb 1024] [--writer 50] [--offline]
"""

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import httpx
import psycopg

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.adapters.dumps import libpq_env  # noqa: E402
from tests.support import LocalFleet, app_token, postgres_container  # noqa: E402
from tests.writer import Writer  # noqa: E402

ROW_BYTES = 1000
SCHEMA_SQL = """
create table public.items (id bigserial primary key, body text not null);
create table public.writes (id bigint primary key, at timestamptz not null default now());
grant select, insert on public.writes to authenticated;
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--writer", type=float, default=0, metavar="RATE",
                        help="writes per second through the gateway during the migrate (0: none)")
    parser.add_argument("--offline", action="store_true", help="copy under the write lock instead of syncing")
    args = parser.parse_args()
    fleet = LocalFleet(pathlib.Path(tempfile.mkdtemp(prefix="flux-bench-mig-")) / "dev")
    raw_container = None
    try:
        project = fleet.create("Migrate Bench")
        fleet.push(project, {"001_items.sql": SCHEMA_SQL}).raise_for_status()
        schema = fleet.api("GET", f"projects/{project['summary']['hash']}").json()["apiSchema"]
        rows = args.size_mb * 1024 * 1024 // ROW_BYTES
        print(f"building a {args.size_mb} MB tenant ({rows} rows)", file=sys.stderr, flush=True)
        fleet.shared_sql(f"INSERT INTO {schema}.items (body) SELECT repeat(md5(g::text), {ROW_BYTES // 32})"
                         f" FROM generate_series(1, {rows}) g")
        # As autovacuum leaves a table long written: hint bits set, frozen, written out. Otherwise the
        # first reader (the raw pipe) dirties every page and the writes land during the next one.
        with psycopg.connect(fleet.fleet.cluster("shared").url("flux_shared"), autocommit=True) as conn:
            conn.execute(f"VACUUM (FREEZE, ANALYZE) {schema}.items")
            conn.execute("CHECKPOINT")
        size = fleet.shared_sql(f"SELECT pg_total_relation_size('{schema}.items')")[0][0]

        body = {"slug": project["summary"]["slug"], "hash": project["summary"]["hash"], "to": "v1_dedicated",
                "yes": True, **({"online": False} if args.offline else {})}
        writer = Writer(fleet.gateway_port, fleet.info["gateway_ca"], fleet.host(project),
                        app_token(project["projectJwtSecret"], sub="bench"), rate=args.writer or 1)
        phases = {}
        result = None
        # The writer runs through both copies: each is measured on a machine as busy as the other's.
        with (writer if args.writer else contextlib.nullcontext()):
            time.sleep(2 if args.writer else 0)
            # A fresh container of the image stacks use, with its default settings.
            raw_container, target = postgres_container(fleet.info["images"]["postgres"], "flux-bench-raw")
            role = schema.replace("_api", "_role")
            with psycopg.connect(target, autocommit=True) as conn:
                conn.execute(f"CREATE ROLE {role}; CREATE ROLE {schema.replace('_api', '_ddl')}; CREATE SCHEMA auth;"
                             " CREATE FUNCTION auth.uid() RETURNS text LANGUAGE sql AS $$ SELECT NULL::text $$")
            shared = fleet.fleet.cluster("shared").url("flux_shared")
            print("raw: pg_dump | psql", file=sys.stderr, flush=True)
            started = time.perf_counter()
            dump = subprocess.Popen(["pg_dump", "-n", schema], stdout=subprocess.PIPE, env=libpq_env(shared))
            restore = subprocess.run(["psql", "-X", "-q"], stdin=dump.stdout, capture_output=True,
                                     env=libpq_env(target))
            dump.wait()
            raw_s = time.perf_counter() - started
            if dump.returncode != 0 or restore.returncode != 0:
                raise SystemExit(f"raw pipe failed: {restore.stderr.decode()[-500:]}")
            # What the raw target wrote reaches the disk now, not while ours copies.
            subprocess.run(["docker", "rm", "-f", raw_container], capture_output=True)
            raw_container = None
            os.sync()

            print(f"ours: flux migrate --yes{' --offline' if args.offline else ''}"
                  + (f" with a writer at {args.writer:g}/s" if args.writer else ""), file=sys.stderr, flush=True)
            time.sleep(2 if args.writer else 0)
            started = time.perf_counter()
            with httpx.stream("POST", f"{fleet.info['api_base']}/cli/v1/migrate", json=body, timeout=3600,
                              headers={"Authorization": f"Bearer {fleet.token}",
                                       "Accept": "application/x-ndjson"}) as r:
                for line in r.iter_lines():
                    event = json.loads(line)
                    if event.get("event") == "phase":
                        phases[event["phase"]] = time.monotonic()
                        print(f"  {event['phase']}", file=sys.stderr, flush=True)
                    if event.get("event") == "result":
                        result = event
            total_s = time.perf_counter() - started
            time.sleep(2 if args.writer else 0)
        if not result or not result["ok"]:
            raise SystemExit(f"migrate failed: {result}")
        move_s = result["dump"]["seconds"]
        # A new stack takes the copy in bulk-load mode and restarts out of it before the sync applies.
        restart_s = result["dump"].get("bulkLoadRestartSeconds") or 0.0
        # Offline, the kept dump file is written after the cutover (None when it was not timed).
        kept_s = result["dump"].get("kept_seconds")
        # The cutover ends where the first step after the unlock starts.
        end = (phases.get("sync_end") or phases.get("keep") or phases.get("drop_source")
               or phases.get("done", time.monotonic()))
        lock_window_s = end - phases["lock"]
        figures = {}
        if args.writer:
            creds = fleet.api("GET", f"projects/{project['summary']['hash']}/credentials").json()
            with psycopg.connect(creds["postgresConnectionString"]) as conn:
                stored = {r[0] for r in conn.execute(f"SELECT id FROM {schema}.writes")}
            lost = sorted(writer.acked_ids - stored)
            gaps = writer.gaps()
            if gaps:
                at, length = gaps[0]
                near = sorted(phases, key=lambda name: abs(phases[name] - at))[:3]
                print(f"longest gap {length:.3f}s, near the phases {', '.join(near)}", file=sys.stderr)
            figures = {"writer_rate": args.writer, "writer_achieved": round(writer.achieved_rate(), 1),
                       "max_write_gap_s": round(writer.max_gap(), 3), "acked_writes": len(writer.acked),
                       "refused_writes": writer.refused, "lost_writes": len(lost)}
        sync = result.get("sync") or {}
        figures.update(lag_bytes_at_pause=sync.get("lagBytesAtPause"), lag_s_at_pause=sync.get("lagSecondsAtPause"),
                       online=not args.offline and "sync" in result)
    finally:
        if raw_container:
            subprocess.run(["docker", "rm", "-f", raw_container], capture_output=True)
        fleet.close()
    size_mb = size / (1024 * 1024)
    print(json.dumps({"size_mb": round(size_mb, 1), "raw_s": round(raw_s, 2), "move_s": round(move_s, 2),
                      "total_s": round(total_s, 2), "lock_window_s": round(lock_window_s, 2),
                      "throughput_mb_s": round(size_mb / move_s, 1), "ratio": round(raw_s / move_s, 3),
                      "bulk_load_restart_s": round(restart_s, 2),
                      "ratio_with_restart": round(raw_s / (move_s + restart_s), 3),
                      "kept_dump_after_cutover_s": kept_s,
                      **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
