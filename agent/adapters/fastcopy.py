"""A copy of one tenant schema into another database, all of it as one snapshot sees it: the
schema by pg_dump, the rows by COPY over parallel connections, indexes and constraints last.

Why not `pg_dump | psql` (dumps.py): that is one stream of text through one backend on each
side, and the target's backend (parsing, inserting, logging) is the slowest link. Here:

- every connection reads in a REPEATABLE READ transaction on the same snapshot, exported here
  (kept open for the whole copy) or given by the caller, e.g. made by a replication slot's
  `CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT`, so the copy is exactly that snapshot;
- the schema goes first (`pg_dump --section=pre-data`, through the dump stream's sanitizer
  like dumps.py), so tables have no index, key or trigger while rows go in (no trigger can
  fire, so session_replication_role is left alone);
- the rows move as binary COPY (text when a column's type is not a built-in or enum one, the
  two sides' column types differ, or binary fails) over `workers` pairs of psql processes, one
  reading the source in the snapshot, one writing the target, biggest table first; their
  streams are relayed here in blocks, so no row passes through Python on its own;
- a table copied whole is truncated in its COPY's transaction, so COPY FREEZE writes its rows
  frozen (building its indexes does not write every page again to set hint bits) and, on a
  target in bulk-load mode (wal_level=minimal, stacks.BULK_LOAD_COMMAND), without WAL. Tables
  above `split_bytes` (never, by default) can be cut into ranges of heap blocks (ctid) that
  workers share, without either: on two cores a 1 GB table went whole in 6.3 s, in 256 MB
  ranges in 9.0 s;
- the post-data statements run side by side where independent (copyplan.post_data): indexes
  and keys, then foreign keys, then the rest; never two at once that would wait on each other.

Target sessions commit without waiting for the disk (synchronous_commit off): the target is
new and a crash in the middle leaves a copy that fails anyway.

The caller prepares the target first (dumps.prepare_target: the roles the schema names, no
schema of that name) and, when the copy fails, empties it again the same way: what a failed copy
created stays. Each failure is an AgentError naming the phase and the table or statement. The
source session's role (the tenant's owner, whose connection limit is 8) holds up to
`workers` + 2 connections at once.
"""

import fcntl
import io
import logging
import os
import re
import subprocess
import tempfile
import threading
import time

import psycopg
from psycopg import sql

from contract.failures import FailureKind

from ..domain import copyplan
from ..domain.dumpstream import dropped_lines, sanitize
from ..errors import AgentError
from .dumps import PROGRESS_EVERY_BYTES, libpq_env, require_tool

log = logging.getLogger(__name__)

SESSION = ("SET client_encoding = 'UTF8'", "SET DateStyle = ISO", "SET IntervalStyle = postgres",
           "SET extra_float_digits = 3", "SET search_path = ''", "SET row_security = off",
           "SET statement_timeout = 0", "SET idle_in_transaction_session_timeout = 0")
TARGET_SESSION = SESSION + ("SET synchronous_commit = off", "SET maintenance_work_mem = '256MB'")
PG_DUMP_TIMEOUT_S = 600
PSQL = ("-X", "-v", "ON_ERROR_STOP=1")
PSQL_ENV = {"PGCLIENTENCODING": "UTF8", "PGCONNECT_TIMEOUT": "10", "PGAPPNAME": "flux-copy"}
PSQL_STATEMENT_FAILED = 1  # psql -c: a statement failed (2: the connection went bad)
RELAY_BYTES = 1024 * 1024

# Tables of the schema: heap blocks, bytes with TOAST, columns that hold data (no generated
# ones), their types, and whether binary COPY carries every one between clusters (built-in
# types and enums, also under a domain; not composites or arrays of the schema's own types,
# whose binary form holds OIDs of the cluster it came from).
TABLES = """
SELECT c.relname, pg_relation_size(c.oid) / current_setting('block_size')::int, pg_table_size(c.oid),
       coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL), '{}'),
       coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum)
                FILTER (WHERE a.attnum IS NOT NULL), '{}'),
       coalesce(bool_and(coalesce(b.oid, t.oid) < 16384 OR coalesce(b.typtype, t.typtype) = 'e'), true)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
LEFT JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_type b ON t.typtype = 'd' AND b.oid = t.typbasetype
WHERE n.nspname = %s AND c.relkind = 'r'
GROUP BY c.oid, c.relname ORDER BY c.relname
"""


def _connect(url: str, what: str, **kwargs) -> psycopg.Connection:
    try:
        conn = psycopg.connect(url, connect_timeout=10, autocommit=True, **kwargs)
    except psycopg.OperationalError as exc:
        raise AgentError(f"cannot connect to the {what}: {_first_line(exc)}", retryable=True,
                         kind=FailureKind.UNAVAILABLE) from None
    return conn


def _first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _shown(statement: str) -> str:
    lines = [l for l in statement.strip().splitlines() if l.strip() and not l.lstrip().startswith("--")]
    return " ".join(" ".join(lines).split())[:160]


def _failure(what: str, error: BaseException) -> AgentError:
    if isinstance(error, AgentError):
        return error
    lost = isinstance(error, psycopg.OperationalError)
    return AgentError(f"{what}: {_first_line(error)}", retryable=lost,
                      kind=FailureKind.UNAVAILABLE if lost else None)


def _begin(conn, snapshot: str | None) -> str:
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    if snapshot is None:
        return conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
    conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
    return snapshot


def _pg_dump(source_url: str, schema: str, snapshot: str, section: str, target_major: int) -> list[str]:
    """One section of the schema as pg_dump writes it, sanitized for the target, in statements."""
    try:
        done = subprocess.run(
            [require_tool("pg_dump"), "--schema", schema, f"--section={section}", f"--snapshot={snapshot}",
             "--encoding=UTF8", "--no-publications", "--no-subscriptions", "--no-tablespaces"],
            capture_output=True, env=libpq_env(source_url), timeout=PG_DUMP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AgentError(f"pg_dump --section={section} of {schema} did not finish within {PG_DUMP_TIMEOUT_S}s",
                         retryable=True, kind=FailureKind.TIMEOUT) from None
    if done.returncode != 0:
        raise AgentError(f"pg_dump --section={section} of {schema} failed: "
                         f"{done.stderr.decode(errors='replace').strip()[-800:]}", retryable=True)
    script = b"".join(sanitize(io.BytesIO(done.stdout).read, dropped_lines(None, target_major)))
    return copyplan.split(script.decode())


class _Progress:
    """`progress(phase, done, total, unit, detail)` from several threads, at most every few MiB."""

    def __init__(self, progress):
        self.say = progress or (lambda *a: None)
        self.lock = threading.Lock()
        self.done = self.total = self.next = 0

    def start(self, total: int) -> None:
        self.done, self.total, self.next = 0, total, 0

    def add(self, phase: str, amount: int, unit: str, detail: str, force: bool = False) -> None:
        with self.lock:
            self.done += amount
            if force or self.done >= self.next:
                self.say(phase, self.done, max(self.total, self.done), unit, detail)
                self.next = self.done + (PROGRESS_EVERY_BYTES if unit == "bytes" else 1)


class _Stopped(Exception):
    """Another worker failed; this one stops where it is."""


def _parallel(items, workers: int, open_worker, run, conflicts=None) -> None:
    """Runs `run(worker, item)` for each item on `workers` threads, each with its own worker from
    `open_worker()`, in list order but past items that `conflicts(item, running)` says would wait
    on running ones. The first failure stops the others (`worker.stop()`) and is raised."""
    pending, running, errors, opened = list(items), [], [], []
    if not pending:
        return
    cond = threading.Condition()

    def fail(error: BaseException) -> None:
        with cond:
            if not errors:
                errors.append(error)
                for other in opened:
                    other.stop()
            cond.notify_all()

    def loop() -> None:
        try:
            worker = open_worker()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            return fail(exc)
        with cond:
            opened.append(worker)
        try:
            while True:
                with cond:
                    while True:
                        if errors or not pending:
                            return
                        item = next((i for i in pending if not (conflicts and conflicts(i, running))), None)
                        if item is not None:
                            break
                        cond.wait()
                    pending.remove(item)
                    running.append(item)
                try:
                    run(worker, item)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                    return fail(exc)
                finally:
                    with cond:
                        running.remove(item)
                        cond.notify_all()
        finally:
            worker.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(max(1, min(workers, len(pending))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class _Target:
    """A target session for post-data statements; remembers which dump settings it has."""

    def __init__(self, url: str):
        self.conn = _connect(url, "target database")
        for setting in TARGET_SESSION:
            self.conn.execute(setting)
        self.settings: tuple[str, ...] = ()

    def run(self, statement: copyplan.Statement) -> None:
        if statement.settings != self.settings:
            for setting in statement.settings:
                self.conn.execute(setting, prepare=False)
            self.settings = statement.settings
        self.conn.execute(statement.sql, prepare=False)

    def stop(self) -> None:
        self.conn.cancel_safe()

    def close(self) -> None:
        self.conn.close()


class _Mover:
    """A worker of the data phase. Each chunk goes from a psql that reads it on the source in the
    snapshot to a psql that writes it on the target, relayed here in blocks of RELAY_BYTES: the
    rows never pass through Python one by one (that cost as much as the target's insert)."""

    def __init__(self, source_url: str, target_url: str, snapshot: str, job: "_Job"):
        self.job, self.snapshot, self.stopped = job, snapshot, False
        self.source_env = {**libpq_env(source_url), **PSQL_ENV, "PGOPTIONS": _options(SESSION)}
        self.target_env = {**libpq_env(target_url), **PSQL_ENV, "PGOPTIONS": _options(TARGET_SESSION)}
        self.psql = require_tool("psql")
        self.running: list[subprocess.Popen] = []

    def move(self, chunk: copyplan.Chunk) -> None:
        table = self.job.tables[chunk.table]
        form = "binary" if table["binary"] else "text"
        failed = self._copy(chunk, table, form)
        if failed and form == "binary" and failed[0] == PSQL_STATEMENT_FAILED and not self.stopped:
            table["binary"] = False  # e.g. a type without binary functions: this table goes as text
            failed = self._copy(chunk, table, "text")
        if self.stopped:
            raise _Stopped()
        if failed:
            raise AgentError(f"copy of {self.job.schema}.{chunk.table} failed: {failed[1]}",
                             retryable=failed[0] != PSQL_STATEMENT_FAILED,
                             kind=None if failed[0] == PSQL_STATEMENT_FAILED else FailureKind.UNAVAILABLE)

    def _statements(self, chunk: copyplan.Chunk, table: dict, form: str) -> tuple[list[str], list[str]]:
        """The source's and the target's statements for one chunk."""
        name = sql.Identifier(self.job.schema, chunk.table)
        columns = sql.SQL(", ").join(map(sql.Identifier, table["columns"]))
        listed = sql.SQL(" ({})").format(columns) if table["columns"] else sql.SQL("")
        if chunk.whole:
            out = sql.SQL("COPY {}{} TO STDOUT (FORMAT {})").format(name, listed, sql.SQL(form))
        else:
            ends = ((">=", chunk.first), ("<", chunk.end))
            bounds = sql.SQL(" AND ").join(sql.SQL("ctid {} {}::tid").format(sql.SQL(op), f"({block},0)")
                                           for op, block in ends if block is not None)
            out = sql.SQL("COPY (SELECT {} FROM ONLY {} WHERE {}) TO STDOUT (FORMAT {})").format(
                columns, name, bounds, sql.SQL(form))
        into = sql.SQL("COPY {}{} FROM STDIN (FORMAT {}{})").format(
            name, listed, sql.SQL(form), sql.SQL(", FREEZE" if chunk.whole else ""))
        source = ["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                  sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)), out]
        # A table copied whole is emptied in the COPY's own transaction: FREEZE needs that, and in
        # bulk-load mode (wal_level=minimal) so does writing its rows without WAL.
        target = ([sql.SQL("TRUNCATE ONLY {}").format(name)] if chunk.whole else []) + [into]
        return [_text(q) for q in source], [_text(q) for q in target]

    def _copy(self, chunk: copyplan.Chunk, table: dict, form: str) -> tuple[int, str] | None:
        """Moves one chunk; returns None, or (psql's exit code, its error) for the side that failed."""
        source_sql, target_sql = self._statements(chunk, table, form)
        with tempfile.TemporaryFile() as source_err, tempfile.TemporaryFile() as target_err:
            # -q on the source: nothing but the rows on its output.
            reader = subprocess.Popen([self.psql, *PSQL, "-q", *(a for q in source_sql for a in ("-c", q))],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=source_err,
                                      env=self.source_env)
            writer = subprocess.Popen([self.psql, *PSQL, "--single-transaction",
                                       *(a for q in target_sql for a in ("-c", q))],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=target_err,
                                      env=self.target_env)
            self.running = [reader, writer]
            for pipe in (reader.stdout, writer.stdin):
                _widen(pipe)
            if self.stopped:
                self._kill()
            moved = reported = 0
            try:
                try:
                    # Pipe to pipe, the kernel moves the pages (splice): no copy through here.
                    source, target = reader.stdout.fileno(), writer.stdin.fileno()
                    while moving := os.splice(source, target, RELAY_BYTES):
                        moved += moving
                        if moved - reported >= PROGRESS_EVERY_BYTES:
                            self.job.progress.add("data", moved - reported, "bytes", chunk.table)
                            reported = moved
                except BrokenPipeError:
                    reader.kill()  # the writer ended early: its exit code and error say why
                # The end of the rows lets the writer commit, so only a reader that read them all
                # may give it: a COPY stream cut short ends without an error.
                if reader.wait() == 0 and not self.stopped:
                    _close_quietly(writer.stdin)
                else:
                    writer.kill()
                tags = writer.stdout.read().decode(errors="replace")
                writer.wait()
            finally:
                self._kill()
                _close_quietly(writer.stdin)
                reader.stdout.close()
                writer.stdout.close()
                self.running = []
            for process, err in ((writer, target_err), (reader, source_err)):
                if process.returncode > 0:
                    err.seek(0)
                    return process.returncode, _psql_error(err.read())
            for process in (writer, reader):
                if process.returncode and not self.stopped:
                    return process.returncode, f"psql ended by signal {-process.returncode}"
        self.job.progress.add("data", moved - reported, "bytes", chunk.table)
        copied = re.findall(r"^COPY (\d+)$", tags, re.M)
        with self.job.lock:
            self.job.rows += int(copied[-1]) if copied else 0
            self.job.bytes += moved
        return None

    def _kill(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.kill()

    def stop(self) -> None:
        self.stopped = True
        self._kill()

    def close(self) -> None:
        self._kill()


def _widen(pipe) -> None:
    """A pipe of RELAY_BYTES instead of 64 KiB: a sixteenth of the reads and writes to relay."""
    try:
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, RELAY_BYTES)
    except OSError:
        pass  # above the system's pipe-max-size: the default size works, with more system calls


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except (BrokenPipeError, ValueError):
        pass


def _text(query) -> str:
    return query if isinstance(query, str) else query.as_string(None)


def _options(settings: tuple[str, ...]) -> str:
    """Session settings (`SET name = value`) as libpq's PGOPTIONS."""
    options = []
    for setting in settings:
        name, _, value = setting.removeprefix("SET ").partition(" = ")
        value = value.strip("'") or "pg_catalog"  # an empty search_path: the catalog only
        options.append(f"-c {name}={value}")
    return " ".join(options)


def _psql_error(stderr: bytes) -> str:
    """psql's error without its own prefix, e.g. `ERROR:  value too long for type ...`."""
    lines = [l.strip() for l in stderr.decode(errors="replace").splitlines() if l.strip()]
    for line in lines:
        if "ERROR:" in line or "FATAL:" in line:
            return re.sub(r"^psql:[^:]*:\d+: ", "", line.removeprefix("psql: ")).strip()
    return lines[-1] if lines else "psql ended without saying why"


class _Job:
    def __init__(self, schema: str, tables: dict, progress: _Progress):
        self.schema, self.tables, self.progress = schema, tables, progress
        self.lock = threading.Lock()
        self.rows = self.bytes = 0


def _tables(conn, schema: str) -> dict:
    return {name: {"blocks": blocks, "bytes": size, "columns": columns, "types": types, "binary": portable}
            for name, blocks, size, columns, types, portable in conn.execute(TABLES, (schema,)).fetchall()}


def _sequences(source, target, schema: str) -> int:
    """Sequences as the source has them now (they are outside any snapshot), as pg_dump sets them."""
    names = [r[0] for r in source.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind = 'S' ORDER BY 1", (schema,))]
    for name in names:
        seq = sql.Identifier(schema, name)
        last, called = source.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(seq)).fetchone()
        target.execute("SELECT pg_catalog.setval(%s::regclass, %s, %s)", (seq.as_string(target), last, called))
    return len(names)


def copy_schema(source_url: str, tenant_schema: str, target_url: str, *, snapshot: str | None = None,
                workers: int = 2, progress=None, split_bytes: int = 0, time_limit_s: float | None = None) -> dict:
    """Copies `tenant_schema` from the shared cluster at `source_url` into the prepared database at
    `target_url` as `snapshot` sees it (exported here when None) and returns what it did:
    tables, rows, bytes, chunks, the tables that went as text, and seconds per phase. After
    `time_limit_s` every session and psql of the copy is stopped and it fails (FailureKind.TIMEOUT)."""
    limit = _Limit(time_limit_s)
    try:
        return _copy_schema(source_url, tenant_schema, target_url, snapshot, workers, progress, split_bytes, limit)
    except (AgentError, psycopg.Error, _Stopped) as exc:
        if not limit.expired:
            raise
        raise AgentError(f"copy of {tenant_schema} did not finish within {time_limit_s:.0f}s and was stopped "
                         f"({_first_line(exc) if isinstance(exc, psycopg.Error) else exc})",
                         kind=FailureKind.TIMEOUT) from None
    finally:
        limit.cancel()


class _Limit:
    """Stops what registered with it (`stop()`) once `seconds` have passed; never without seconds."""

    def __init__(self, seconds: float | None):
        self.expired = False
        self.parts: list = []
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self._expire) if seconds else None
        if self.timer:
            self.timer.daemon = True
            self.timer.start()

    def add(self, part):
        with self.lock:
            self.parts.append(part)
            if self.expired:
                part.stop()
        return part

    def session(self, conn: psycopg.Connection) -> psycopg.Connection:
        self.add(_Cancel(conn))
        return conn

    def _expire(self) -> None:
        with self.lock:
            self.expired = True
            parts = list(self.parts)
        # The latest first (the psql processes of the data phase, which a kill stops at once), the
        # sessions last; one that cannot be stopped never keeps the others running.
        for part in reversed(parts):
            try:
                part.stop()
            except Exception:  # noqa: BLE001 - e.g. a cancel that timed out on a server that hangs
                log.warning("could not stop a part of the copy past its time limit", exc_info=True)

    def check(self) -> None:
        """Between phases: a copy past its time goes no further."""
        if self.expired:
            raise _Stopped()

    def cancel(self) -> None:
        if self.timer:
            self.timer.cancel()


class _Cancel:
    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def stop(self) -> None:
        self.conn.cancel_safe()


def _copy_schema(source_url: str, schema: str, target_url: str, snapshot: str | None, workers: int, progress,
                 split_bytes: int, limit: _Limit) -> dict:
    say = _Progress(progress)
    seconds, started = {}, time.monotonic()
    holder = limit.session(_connect(source_url, "shared cluster"))
    try:
        for setting in SESSION:
            holder.execute(setting)
        snapshot = _begin(holder, snapshot)
        tables = _tables(holder, schema)
        if tables:  # as pg_dump does: no table changes shape or goes while it is copied
            holder.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                sql.SQL(", ").join(sql.Identifier(schema, t) for t in tables)))
        with limit.session(_connect(target_url, "target database")) as target:
            major = target.info.server_version // 10000
            phase = "schema"
            statements = _pg_dump(source_url, schema, snapshot, "pre-data", major)
            say.start(len(statements))
            with target.transaction():
                for statement in statements:
                    try:
                        target.execute(statement, prepare=False)
                    except psycopg.Error as exc:
                        raise _failure(f"schema of {schema} on the target failed at {_shown(statement)}", exc) from None
            say.add(phase, len(statements), "statements", "", force=True)
            landed = _tables(target, schema)
            for name, table in tables.items():
                there = landed.get(name)
                if there is None:
                    raise AgentError(f"schema of {schema}: table {name} is missing on the target after pre-data")
                table["binary"] = table["binary"] and there["binary"] and (
                    (table["columns"], table["types"]) == (there["columns"], there["types"]))
            seconds["schema"] = time.monotonic() - started

            limit.check()
            phase, mark = "data", time.monotonic()
            chunks = copyplan.chunks({n: (t["blocks"], t["bytes"]) for n, t in tables.items()}, split_bytes)
            say.start(sum(c.bytes for c in chunks))
            job = _Job(schema, tables, say)
            try:
                _parallel(chunks, workers, lambda: limit.add(_Mover(source_url, target_url, snapshot, job)),
                          _Mover.move)
            except (psycopg.Error, _Stopped) as exc:
                raise _failure(f"data of {schema} failed", exc) from None
            sequences = _sequences(holder, target, schema)
            say.add(phase, 0, "bytes", "done", force=True)
            seconds["data"] = time.monotonic() - mark

            limit.check()
            phase, mark = "post-data", time.monotonic()
            sizes = {(schema, n): t["bytes"] for n, t in tables.items()}
            steps = copyplan.post_data(_pg_dump(source_url, schema, snapshot, "post-data", major), sizes)
            say.start(sum(len(s.statements) for s in steps))
            for step in steps:
                limit.check()
                _parallel(step.statements, workers if step.parallel else 1, lambda: limit.add(_Target(target_url)),
                          lambda worker, statement: _post_data(worker, statement, schema, step.name, say),
                          (lambda st, running: st.conflicts(running)) if step.parallel else None)
            seconds["post_data"] = time.monotonic() - mark
    finally:
        holder.close()
    seconds["total"] = time.monotonic() - started
    return {"schema": schema, "snapshot": snapshot, "tables": len(tables), "rows": job.rows, "bytes": job.bytes,
            "chunks": len(chunks), "sequences": sequences, "workers": workers,
            "text_tables": sorted(n for n, t in tables.items() if not t["binary"]),
            "seconds": {k: round(v, 3) for k, v in seconds.items()}}


def _post_data(worker: _Target, statement: copyplan.Statement, schema: str, step: str, say: _Progress) -> None:
    try:
        worker.run(statement)
    except psycopg.Error as exc:
        raise _failure(f"post-data of {schema} ({step}) failed at {_shown(statement.sql)}", exc) from None
    say.add("post-data", 1, "statements", step)
