"""Copy benchmark: a tenant of --size-mb copied by a raw `pg_dump -n <schema> | psql` into a
fresh database, and by agent/adapters/fastcopy.copy_schema into another, in one run.

The source is a throwaway local cluster (tests/support.py) holding the tenant as
bench/migrate.py builds it, one table of 1000-byte rows (--row-bytes) with a bigserial key,
read by both as the tenant's owner role. Each copy goes into a fresh container of the image dedicated stacks use
(`--cpus` limits it as stacks are), so neither inherits the other's WAL files or caches; ours
runs with the settings of a stack in bulk-load mode (agent/adapters/stacks.py), the raw pipe's
with the image's defaults. With
`--repeat N` the two alternate N times, each on new containers, and the medians are reported.

Prints each run, then a last line with one JSON object: size_mb, raw_s, ours_s, ratio
(raw ÷ ours), phases (ours, seconds), and every run.

    python bench/fastcopy.py [--size-mb 1024] [--row-bytes 1000] [--workers 2] [--split-mb 0] [--repeat 1] [--cpus 0]
"""

import argparse
import json
import secrets
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import psycopg
from psycopg import sql

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.adapters.dumps import libpq_env  # noqa: E402
from agent.adapters.fastcopy import copy_schema  # noqa: E402
from agent.adapters.stacks import BULK_LOAD_COMMAND  # noqa: E402
from contract import names  # noqa: E402
from tests.support import postgres_container, remove_cluster, test_cluster  # noqa: E402

SHORT_ID = "00000000c0b1"


def image() -> str:
    built = subprocess.run([sys.executable, str(ROOT / "packaging" / "images" / "build.py"), "--json"],
                           capture_output=True, text=True, check=True)
    return json.loads(built.stdout)["postgres"]


def target(tag: str, cpus: float, command: list[str]) -> tuple[str, str]:
    """A fresh Postgres container with the tenant's roles, as a dedicated stack starts."""
    name, url = postgres_container(tag, "flux-bench-copy", tuple(command), cpus)
    with psycopg.connect(url, autocommit=True) as conn:
        for role in (names.owner_role(SHORT_ID), names.runtime_role(SHORT_ID)):
            conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute("CHECKPOINT")
    return name, url


def build(cluster, rows: int, row_bytes: int) -> tuple[str, int]:
    """The tenant on the source; returns the owner's URL and the table's size in bytes."""
    schema, owner = names.tenant_schema(SHORT_ID), names.owner_role(SHORT_ID)
    password = secrets.token_urlsafe(16)
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}; CREATE ROLE {}").format(
            sql.Identifier(owner), sql.Literal(password), sql.Identifier(names.runtime_role(SHORT_ID))))
        conn.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(schema), sql.Identifier(owner)))
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(owner)))
        items = sql.Identifier(schema, "items")
        conn.execute(sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, body text NOT NULL)").format(items))
        conn.execute(sql.SQL("INSERT INTO {} (body) SELECT repeat(md5(g::text), {}) FROM generate_series(1, {}) g")
                     .format(items, sql.Literal(max(row_bytes // 32, 1)), sql.Literal(rows)))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(items))
        conn.execute("RESET ROLE")
        conn.execute("CHECKPOINT")
        size = conn.execute("SELECT pg_total_relation_size(%s::regclass)", (items.as_string(conn),)).fetchone()[0]
    return cluster.url().replace(f"{cluster.user}:{cluster.password}", f"{owner}:{password}"), size


def raw(source: str, url: str) -> float:
    started = time.perf_counter()
    dump = subprocess.Popen(["pg_dump", "-n", names.tenant_schema(SHORT_ID)], stdout=subprocess.PIPE,
                            env=libpq_env(source))
    restore = subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1"], stdin=dump.stdout,
                             capture_output=True, env=libpq_env(url))
    dump.wait()
    if dump.returncode != 0 or restore.returncode != 0:
        raise SystemExit(f"raw pipe failed: {restore.stderr.decode()[-500:]}")
    return time.perf_counter() - started


def ours(source: str, url: str, workers: int, split_mb: int) -> tuple[float, dict]:
    started = time.perf_counter()
    result = copy_schema(source, names.tenant_schema(SHORT_ID), url, workers=workers,
                         split_bytes=split_mb * 1024 * 1024)
    return time.perf_counter() - started, result


def check(url: str, rows: int) -> None:
    with psycopg.connect(url) as conn:
        items = sql.Identifier(names.tenant_schema(SHORT_ID), "items")
        got = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(items)).fetchone()[0]
        keys = conn.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND indexname = 'items_pkey'",
                            (names.tenant_schema(SHORT_ID),)).fetchone()[0]
    if got != rows or keys != 1:
        raise SystemExit(f"the copy at {url.rsplit('@', 1)[1]} has {got} of {rows} rows and {keys} primary key")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--row-bytes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--split-mb", type=int, default=0, help="cut tables above this size (0: never)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--raw-settings", default="", help="postgres -c settings of the raw target, comma separated")
    parser.add_argument("--ours-settings", default=",".join(BULK_LOAD_COMMAND[2::2]),
                        help="postgres -c settings of our target, comma separated (default: a stack in bulk-load "
                             "mode, as a migration fills it; a stack's usual ones: wal_level=logical)")
    parser.add_argument("--cpus", type=float, default=0, help="CPU limit of the target containers (0: none)")
    args = parser.parse_args()
    tag = image()
    scratch = tempfile.TemporaryDirectory(prefix="flux-bench-copy-")
    cluster = test_cluster(pathlib.Path(scratch.name))
    runs = []
    try:
        print(f"building a {args.size_mb} MB tenant", file=sys.stderr, flush=True)
        rows = args.size_mb * 1024 * 1024 // args.row_bytes
        source, size = build(cluster, rows, args.row_bytes)
        for attempt in range(args.repeat):
            run = {}
            # Alternating which goes first spreads what the machine does meanwhile over both.
            for which in (("raw", "ours") if attempt % 2 == 0 else ("ours", "raw")):
                settings = args.raw_settings if which == "raw" else args.ours_settings
                command = ["postgres", *[a for s in settings.split(",") if s for a in ("-c", s)]] if settings else []
                container, url = target(tag, args.cpus, command)
                try:
                    if which == "raw":
                        run["raw_s"] = raw(source, url)
                    else:
                        run["ours_s"], result = ours(source, url, args.workers, args.split_mb)
                        run["phases"] = result["seconds"]
                    check(url, rows)
                finally:
                    subprocess.run(["docker", "rm", "-f", container], capture_output=True)
            run["ratio"] = run["raw_s"] / run["ours_s"]
            runs.append({k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        remove_cluster(cluster)
        scratch.cleanup()
    raw_s = statistics.median(r["raw_s"] for r in runs)
    ours_s = statistics.median(r["ours_s"] for r in runs)
    phases = {k: round(statistics.median(r["phases"][k] for r in runs), 3) for k in runs[0]["phases"]}
    print(json.dumps({"size_mb": round(size / (1024 * 1024), 1), "raw_s": round(raw_s, 2), "ours_s": round(ours_s, 2),
                      "ratio": round(raw_s / ours_s, 3), "phases": phases, "row_bytes": args.row_bytes,
                      "workers": args.workers, "split_mb": args.split_mb, "cpus": args.cpus or None, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
