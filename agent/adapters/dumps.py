"""Moving a pooled tenant out (db role): preflight, the kept dump file, the target's preparation,
verify (the write guard is guards.py; the copy itself is transfer.py and fastcopy.py).

The dump is plain SQL from pg_dump, written encrypted (dumpfile.py, under a data key the
controller sends with the job) to a file in the agent's spool, made so that any psql can restore
it into any server: lines some cannot take are dropped on the way, never inside COPY data
(domain/dumpstream.py).
"""

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import threading
import time
from typing import TYPE_CHECKING

import psycopg
from psycopg import conninfo, sql

from contract.failures import FailureKind

from ..errors import AgentError
from ..runtime.facts import disk_full, parse_pg_tool_version, unwritable
from ..domain.dumpstream import dropped_lines, sanitize
from .dumpfile import EncryptingWriter

if TYPE_CHECKING:  # a db agent's own: a backup agent, which dumps too, loads none of the tenants' SQL
    from .tenants import Tenant

PROGRESS_EVERY_BYTES = 4 * 1024 * 1024


def libpq_env(url: str) -> dict:
    """Connection settings as libpq environment variables, so no password appears in argv."""
    parts = conninfo.conninfo_to_dict(url)
    names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD", "dbname": "PGDATABASE"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({names[k]: str(v) for k, v in parts.items() if k in names and v is not None})
    return env


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AgentError(f"{name} not found on this db agent's host: the migration runs {name} here, against "
                         "the shared cluster; install the PostgreSQL client binaries (postgresql-client)",
                         kind=FailureKind.UNAVAILABLE)
    return path


def tool_version(name: str) -> str | None:
    path = shutil.which(name)
    if path is None:
        return None
    return parse_pg_tool_version(subprocess.run([path, "--version"], capture_output=True, text=True).stdout)


# preflight

def preflight(conn, tenant: "Tenant", spool: pathlib.Path) -> dict:
    schema = tenant.schema
    tables = conn.execute(
        "SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid), c.relrowsecurity"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY c.relname", (schema,)).fetchall()
    rows = []
    for name, _, size, rls in tables:
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name))).fetchone()[0]
        rows.append({"name": name, "rows": count, "bytes": size, "rls": rls})
    sequences = [{"name": n, "last_value": v} for n, v in conn.execute(
        "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = %s ORDER BY 1", (schema,)).fetchall()]
    extensions = [r[0] for r in conn.execute(
        "SELECT DISTINCT e.extname FROM pg_depend d JOIN pg_extension e ON d.refobjid = e.oid"
        " JOIN pg_class c ON d.objid = c.oid JOIN pg_namespace n ON c.relnamespace = n.oid"
        " WHERE n.nspname = %s UNION SELECT extname FROM pg_extension WHERE extname <> 'plpgsql'", (schema,))]
    ledger = [{"version": v, "filename": f, "checksum": c} for v, f, c in conn.execute(
        "SELECT version, filename, checksum FROM flux.flux_migrations WHERE tenant_schema = %s ORDER BY filename",
        (schema,)).fetchall()]
    policy_roles = sorted({role for (roles,) in conn.execute(
        "SELECT roles FROM pg_policies WHERE schemaname = %s", (schema,)).fetchall() for role in roles})
    roles = referenced_roles(conn, schema)
    views = [r[0] for r in conn.execute("SELECT viewname FROM pg_views WHERE schemaname = %s ORDER BY 1", (schema,))]
    # Large objects belong to no schema: `pg_dump --schema` leaves them out without a word.
    lo_owners = [tenant.owner_role, tenant.runtime_role]
    large_objects = conn.execute(
        "SELECT count(*) FROM pg_largeobject_metadata m JOIN pg_roles r ON r.oid = m.lomowner"
        " WHERE r.rolname = ANY(%s)", (lo_owners,)).fetchone()[0]
    logical = logical_replication(conn, schema)
    conn.rollback()
    return {
        "logical": logical,
        "schema": schema,
        "tables": rows,
        "views": views,
        "sequences": sequences,
        "extensions": sorted(extensions),
        "ledger": ledger,
        "policy_roles": policy_roles,
        "roles": roles,
        "large_objects": {"owners": lo_owners, "count": large_objects},
        "total_bytes": sum(t["bytes"] for t in rows),
        "tools": {"pg_dump": tool_version("pg_dump"), "psql": tool_version("psql")},
        "spool_free_bytes": shutil.disk_usage(spool).free,
    }


def logical_replication(conn, schema: str) -> dict:
    """The shared cluster's settings an online sync needs, and the tenant's tables it could not publish."""
    def setting(name: str) -> str:
        return conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()[0]

    slots = conn.execute("SELECT count(*) FROM pg_replication_slots").fetchone()[0]
    senders = conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0]
    without_key = [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND (c.relreplident = 'n' OR (c.relreplident = 'd'"
        " AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))"
        " ORDER BY 1", (schema,))]
    return {"wal_level": setting("wal_level"), "max_slots": int(setting("max_replication_slots")),
            "free_slots": int(setting("max_replication_slots")) - slots,
            "max_senders": int(setting("max_wal_senders")), "free_senders": int(setting("max_wal_senders")) - senders,
            "max_slot_wal_keep_mb": int(setting("max_slot_wal_keep_size")), "tables_without_key": without_key}


# write guard

def tables_of(conn, schema: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1", (schema,))]


# dump files

DUMP_NAME = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DUMP_SUFFIX = ".sql.enc"
PARTIAL_SUFFIX = ".partial"
# A partial file this old belongs to no running dump (they stop within hours); plain `.sql`
# files are dumps written before dump files were encrypted, removed after the retention
# those agents applied.
STALE_PARTIAL_S = 24 * 3600
LEGACY_PLAIN_S = 7 * 86400


def _unwritable(spool: pathlib.Path, what: str, exc: OSError, read: int) -> AgentError:
    """The error for a spool that took no more: with the room left when its disk is full."""
    return AgentError(f"{what} could not be kept in the spool {spool} ({unwritable(spool, exc)}) with {read} "
                      f"bytes of its SQL read; nothing of it was kept",
                      kind=FailureKind.UNAVAILABLE if disk_full(exc) else FailureKind.INTERNAL)


def _discard(partial: pathlib.Path) -> None:
    """Removes a dump that did not finish, and its tenant's directory when nothing else is in it."""
    partial.unlink(missing_ok=True)
    try:
        partial.parent.rmdir()
    except OSError:
        pass


def tenant_dumps(spool: pathlib.Path, tenant: "Tenant") -> pathlib.Path:
    """Where a tenant's dump files live: one directory each, so they go with the tenant."""
    return spool / "dumps" / tenant.schema


def remove_dumps(spool: pathlib.Path, tenant: "Tenant") -> int:
    """Removes every file in the tenant's dump directory; returns how many there were."""
    directory = tenant_dumps(spool, tenant)
    count = sum(1 for p in directory.iterdir() if p.is_file()) if directory.is_dir() else 0
    shutil.rmtree(directory, ignore_errors=True)
    return count


def prune_leftovers(spool: pathlib.Path, now: float | None = None) -> list[str]:
    """Removes what no catalog lists: partial files of dumps that stopped, and plain-SQL dumps of
    agents from before encryption once past the retention they had. Finished dump files are
    the controller's to remove (`remove_files`)."""
    now = time.time() if now is None else now
    removed = []
    for pattern, keep in ((f"*/*{PARTIAL_SUFFIX}", STALE_PARTIAL_S), ("*/*.sql", LEGACY_PLAIN_S)):
        for path in sorted((spool / "dumps").glob(pattern)):
            if now - path.lstat().st_mtime > keep:
                path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


def dump_file(spool: pathlib.Path, tenant: "Tenant", path) -> pathlib.Path:
    """The file `path` names when it is a dump file directly in the tenant's dump directory;
    anything else (another tenant's, a path with `..`, a relative one) is refused."""
    directory = tenant_dumps(spool, tenant)
    if (isinstance(path, str) and os.path.isabs(path) and os.path.normpath(path) == path
            and pathlib.Path(path).parent == directory):
        name = pathlib.Path(path).name
        if name.endswith(DUMP_SUFFIX) and DUMP_NAME.match(name[:-len(DUMP_SUFFIX)]):
            return pathlib.Path(path)
    shown = repr(path[:200]) if isinstance(path, str) else type(path).__name__
    raise AgentError(f"refused {shown}: not a dump file of {tenant.schema} (they are {directory}/NAME{DUMP_SUFFIX})",
                     kind=FailureKind.INVALID)


def remove_files(spool: pathlib.Path, tenant: "Tenant", paths: list) -> dict:
    """Removes the tenant's dump files named; every path is checked before any file goes.
    A file already gone is reported as missing, not an error."""
    files = [dump_file(spool, tenant, p) for p in paths]
    removed, missing = [], []
    for path in files:
        try:
            path.unlink()
            removed.append(str(path))
        except FileNotFoundError:
            missing.append(str(path))
    return {"removed": removed, "missing": missing}


def stat_files(spool: pathlib.Path, tenant: "Tenant", paths: list) -> dict:
    """Whether each of the tenant's dump files named is there, and its size."""
    found = []
    for path in [dump_file(spool, tenant, p) for p in paths]:
        try:
            info = path.lstat()
            found.append({"path": str(path), "exists": True, "bytes": info.st_size})
        except FileNotFoundError:
            found.append({"path": str(path), "exists": False, "bytes": None})
    return {"files": found}


# dump and restore

REFERENCED_ROLES = """
SELECT DISTINCT r.rolname FROM pg_roles r WHERE r.oid IN (
  SELECT nspowner FROM pg_namespace WHERE nspname = %(s)s
  UNION SELECT c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s
  UNION SELECT p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = %(s)s
  UNION SELECT (aclexplode(c.relacl)).grantee FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(s)s AND c.relacl IS NOT NULL
  UNION SELECT (aclexplode(nspacl)).grantee FROM pg_namespace WHERE nspname = %(s)s AND nspacl IS NOT NULL
  UNION SELECT unnest(pol.polroles) FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %(s)s
) AND NOT r.rolsuper ORDER BY 1
"""


def referenced_roles(conn, schema: str) -> list[str]:
    """Roles the schema's objects are owned by, granted to or name in policies."""
    roles = [r[0] for r in conn.execute(REFERENCED_ROLES, {"s": schema}).fetchall()]
    conn.rollback()
    return roles


def prepare_target(target_url: str, tenant: "Tenant", roles: list[str]) -> None:
    """Empties what an earlier attempt restored and creates the roles the dump refers to."""
    with psycopg.connect(target_url, connect_timeout=10) as conn, conn.transaction():
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tenant.schema)))
        conn.execute("DELETE FROM flux.flux_migrations WHERE tenant_schema = %s", (tenant.schema,))
        for role in sorted({tenant.owner_role, tenant.runtime_role, *roles}):
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        # App tokens act as the runtime role through PostgREST, which logs in as authenticator.
        conn.execute(sql.SQL("GRANT {} TO authenticator").format(sql.Identifier(tenant.runtime_role)))
        conn.execute(sql.SQL("GRANT authenticated TO {}").format(sql.Identifier(tenant.runtime_role)))


def copy_ledger(source, target_url: str, tenant: "Tenant") -> int:
    rows = source.execute("SELECT version, filename, checksum, applied_at FROM flux.flux_migrations"
                          " WHERE tenant_schema = %s", (tenant.schema,)).fetchall()
    source.rollback()
    with psycopg.connect(target_url) as conn, conn.transaction():
        for version, filename, checksum, applied_at in rows:
            conn.execute("INSERT INTO flux.flux_migrations (tenant_schema, version, filename, checksum, applied_at)"
                         " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (tenant.schema, version, filename, checksum, applied_at))
    return len(rows)


# Each dump and restore may take this long, plus a second per MIN_BYTES_PER_S of the data;
# past that it is stuck (a lock on the target, a wedged pipe), and it fails its step.
BASE_SECONDS = 300
MIN_BYTES_PER_S = 1024 * 1024
STDERR_TAIL_BYTES = 64 * 1024


def time_limit(expected_bytes: int) -> float:
    return BASE_SECONDS + max(expected_bytes, 0) / MIN_BYTES_PER_S


class _Tail:
    """Drains a pipe in its own thread and keeps its last bytes, so a chatty process (psql
    printing a warning per row) never blocks on a full pipe and never fills the agent's memory."""

    def __init__(self, pipe, keep: int = STDERR_TAIL_BYTES):
        self.keep = keep
        self.data = bytearray()
        self.thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self.thread.start()

    def _drain(self, pipe) -> None:
        with pipe:
            for chunk in iter(lambda: pipe.read1(65536), b""):
                self.data += chunk
                if len(self.data) > 2 * self.keep:
                    del self.data[:-self.keep]

    def text(self, limit: int = 800) -> str:
        self.thread.join(timeout=10)
        return bytes(self.data[-self.keep:]).decode(errors="replace").strip()[-limit:]


def dump(source_url: str, tenant: "Tenant", spool: pathlib.Path, name: str, *, key: bytes, expected_bytes: int = 0,
         table_count: int = 0, progress=None, time_limit_s: float | None = None, snapshot: str | None = None) -> dict:
    """pg_dump of the tenant schema into the spool, encrypted under `key`.

    The whole step is stopped after `time_limit_s` (by default scaled to `expected_bytes`). With
    `snapshot`, pg_dump reads the tenant as that exported snapshot sees it. The result's `bytes`
    and `sha256` are those of the file as stored; `sql_bytes` and `sql_sha256` those of the SQL in it.
    (A migrate's copy into the dedicated database is transfer.move, not this stream.)
    """
    pg_dump = require_tool("pg_dump")
    if not DUMP_NAME.match(name):
        raise AgentError(f"invalid dump name {name[:200]!r}", kind=FailureKind.INVALID)
    dumps = tenant_dumps(spool, tenant)
    try:
        dumps.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise _unwritable(spool, f"the dump of {tenant.schema}", exc, 0) from None
    path = dumps / f"{name}{DUMP_SUFFIX}"
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    if path.exists():
        # The catalog holds one key per file: a dump never replaces another.
        raise AgentError(f"a dump file {path} exists already", kind=FailureKind.CONFLICT)
    say = progress or (lambda *a: None)
    limit = time_limit(expected_bytes) if time_limit_s is None else time_limit_s
    started = time.monotonic()
    dumper = subprocess.Popen(
        [pg_dump, "--schema", tenant.schema, "--no-publications", "--no-subscriptions", "--no-tablespaces",
         *([f"--snapshot={snapshot}"] if snapshot else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=libpq_env(source_url))
    tail = _Tail(dumper.stderr)
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        if dumper.poll() is None:
            dumper.kill()

    watchdog = threading.Timer(max(limit - (time.monotonic() - started), 0), stop)
    watchdog.daemon = True
    watchdog.start()
    digest = hashlib.sha256()
    size = tables = 0
    next_report = 0

    def copying(line: bytes) -> None:
        nonlocal tables
        say("dump", tables, table_count, "tables", line[5:].split(b" ", 1)[0].decode())
        tables += 1

    complete = False
    unwritten: OSError | None = None
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            stored = EncryptingWriter(out, key)
            for chunk in sanitize(dumper.stdout.read1, dropped_lines(None, None), on_copy=copying):
                stored.write(chunk)
                digest.update(chunk)
                size += len(chunk)
                if size >= next_report:
                    say("dump", size, max(expected_bytes, size), "bytes", "")
                    next_report = size + PROGRESS_EVERY_BYTES
            stored.close()
            out.flush()
            os.fsync(out.fileno())
        complete = dumper.wait() == 0
    except OSError as exc:  # the spool's disk is full, or failing: the dump cannot be kept
        unwritten = exc
    finally:
        if not complete and dumper.poll() is None:
            dumper.kill()  # it would block on a pipe nobody reads
        dumper.wait()
        watchdog.cancel()
        dumper.stdout.close()
    if unwritten is not None:
        _discard(partial)  # what it holds is of no use, and it holds the room the disk lacks
        raise _unwritable(spool, f"the dump of {tenant.schema}", unwritten, size)
    if stopped.is_set():
        _discard(partial)
        raise AgentError(f"dump of {tenant.schema} did not finish within {limit:.0f}s (for about {expected_bytes} "
                         f"bytes of data) and was stopped" + (f"; pg_dump: {tail.text(400)}" if tail.text() else ""),
                         kind=FailureKind.TIMEOUT)
    if dumper.returncode != 0:
        _discard(partial)
        # A lost connection or a restarted server: a new attempt starts over.
        raise AgentError(f"pg_dump of {tenant.schema} failed: {tail.text()}", retryable=True)
    try:
        os.link(partial, path)  # unlike a rename, never replaces a file that appeared meanwhile
    except FileExistsError:
        _discard(partial)
        raise AgentError(f"a dump file {path} exists already", kind=FailureKind.CONFLICT) from None
    partial.unlink()
    say("dump", size, size, "bytes", "done")
    return {"path": str(path), "bytes": stored.bytes, "sha256": stored.sha256, "sql_bytes": size,
            "sql_sha256": digest.hexdigest(), "tables": tables, "restored": False, "ledger_rows": 0,
            "seconds": round(time.monotonic() - started, 3)}


# verify

CHECKSUM = ("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)::text"
            " FROM {} AS t")


def _fingerprint(conn, schema: str) -> dict:
    tables = {}
    for name in tables_of(conn, schema):
        count, checksum = conn.execute(sql.SQL(CHECKSUM).format(sql.Identifier(schema, name))).fetchone()
        tables[name] = {"rows": count, "checksum": checksum}
    sequences = dict(conn.execute(
        "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = %s", (schema,)).fetchall())
    ledger = [list(r) for r in conn.execute(
        "SELECT version, filename, checksum FROM flux.flux_migrations WHERE tenant_schema = %s ORDER BY filename",
        (schema,)).fetchall()]
    conn.rollback()
    return {"tables": tables, "sequences": sequences, "ledger": ledger}


def verify(source_url: str, tenant: "Tenant", target_url: str) -> dict:
    with psycopg.connect(source_url) as source, psycopg.connect(target_url) as target:
        before, after = _fingerprint(source, tenant.schema), _fingerprint(target, tenant.schema)
    problems = []
    for name, expected in before["tables"].items():
        got = after["tables"].get(name)
        if got is None:
            problems.append(f"table {name} is missing on the target")
        elif got != expected:
            problems.append(f"table {name}: source {expected['rows']} rows, target {got['rows']} rows"
                            + ("" if got["rows"] != expected["rows"] else ", checksums differ"))
    for name, value in before["sequences"].items():
        if after["sequences"].get(name) != value:
            problems.append(f"sequence {name}: source at {value}, target at {after['sequences'].get(name)}")
    if before["ledger"] != after["ledger"]:
        problems.append(f"ledger: {len(before['ledger'])} rows on the source, {len(after['ledger'])} on the target")
    if problems:
        raise AgentError("verification failed: " + "; ".join(problems))
    return {"tables": {n: t["rows"] for n, t in before["tables"].items()},
            "sequences": len(before["sequences"]), "ledger_rows": len(before["ledger"]), "ok": True}
