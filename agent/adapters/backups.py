"""Backups: a project's schema as `pg_dump -Fc` with a manifest taken in the same snapshot, made
next to the data and sent to a backup host; restored with `pg_restore` into a database whose
result is checked against that manifest.

The archive travels and rests encrypted under the project's backup key (the dump file format of
dumpfile.py: chunks sealed with AES-256-GCM). The backup host stores the bytes it is sent and
can check their size and sha256, never read them.

A restore is one transaction: `pre` (BEGIN, roles the archive names, the schema emptied and made
again for its owner, the session switched to that owner), the archive's SQL as pg_restore writes
it, then `post` (ledger rows, renames, and the one COMMIT). Any error, an archive that does not
decrypt to its end, or input that stops before the COMMIT (the agent killed), and nothing of it
is committed. The archive's own statements run as the schema's owner, so
what a tenant wrote (a check constraint's function, an index expression) never runs as a
superuser of a shared cluster.
"""

import hashlib
import os
import pathlib
import re
import secrets
import subprocess
import threading
import time
import uuid

import psycopg
from psycopg import sql

from contract.failures import FailureKind

from ..errors import AgentError
from .dumpfile import DumpFileError, EncryptingWriter, decrypt
from .dumps import CHECKSUM, REFERENCED_ROLES, _Tail, libpq_env, require_tool, tables_of

SUFFIX = ".fluxbackup"
PARTIAL = ".partial"
READ_BYTES = 1 << 20


# naming and quoting

def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def literal(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError):
        raise AgentError(f"invalid {what} {str(value)[:60]!r}", kind=FailureKind.INVALID) from None


# the manifest

def manifest(conn, schema: str) -> dict:
    """What a restore of `schema` must give back, as `conn`'s snapshot sees it: per table its rows,
    checksum and size; sequences; the ledger's rows; the roles its objects name; its owner."""
    tables = {}
    for name in tables_of(conn, schema):
        rows, checksum = conn.execute(
            sql.SQL(CHECKSUM).format(sql.Identifier(schema, name))).fetchone()
        size = conn.execute("SELECT pg_total_relation_size(format('%%I.%%I', %s::text, %s::text)::regclass)",
                            (schema, name)).fetchone()[0]
        tables[name] = {"rows": rows, "checksum": checksum, "bytes": size}
    sequences = {name: value for name, value in conn.execute(
        "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = %s ORDER BY 1", (schema,)).fetchall()}
    has_ledger = conn.execute("SELECT to_regclass('flux.flux_migrations') IS NOT NULL").fetchone()[0]
    ledger = [{"version": v, "filename": f, "checksum": c, "applied_at": a} for v, f, c, a in conn.execute(
        "SELECT version, filename, checksum, applied_at::text FROM flux.flux_migrations WHERE tenant_schema = %s"
        " ORDER BY filename", (schema,)).fetchall()] if has_ledger else []
    owner = conn.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
    if owner is None:
        raise AgentError(f"schema {schema} does not exist", kind=FailureKind.NOT_FOUND)
    roles = [r[0] for r in conn.execute(REFERENCED_ROLES, {"s": schema}).fetchall()]
    return {"schema": schema, "owner": owner[0].strip('"'), "tables": tables, "sequences": sequences,
            "ledger": ledger, "roles": roles,
            "server_version": conn.execute("SHOW server_version").fetchone()[0]}


def compare(expected: dict, got: dict) -> list[str]:
    """What differs between a backup's manifest and a restored copy's, in words; empty when nothing."""
    problems = []
    for name, table in sorted(expected["tables"].items()):
        seen = got["tables"].get(name)
        if seen is None:
            problems.append(f"table {name} is missing")
        elif seen["rows"] != table["rows"]:
            problems.append(f"table {name}: {seen['rows']} rows restored, the backup has {table['rows']}")
        elif seen["checksum"] != table["checksum"]:
            problems.append(f"table {name}: the rows restored differ from the backup's (checksum)")
    problems += [f"table {name} is not in the backup" for name in sorted(set(got["tables"]) - set(expected["tables"]))]
    for name, value in sorted(expected["sequences"].items()):
        if got["sequences"].get(name) != value:
            problems.append(f"sequence {name}: at {got['sequences'].get(name)}, the backup has {value}")
    mine = [(r["version"], r["filename"], r["checksum"]) for r in expected["ledger"]]
    theirs = [(r["version"], r["filename"], r["checksum"]) for r in got["ledger"]]
    if mine != theirs:
        problems.append(f"ledger: {len(theirs)} migration rows restored, the backup has {len(mine)}")
    return problems


# making one

def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def make(url: str, schema: str, dump_argv: list[str], env: dict | None, key: bytes, sender, progress=None) -> dict:
    """Dumps `schema` with `dump_argv` (a pg_dump that reaches the database at `url`) in a
    snapshot exported at `url`, encrypts it under `key` and writes it to `sender`; returns the
    archive's and the stored file's size and sha256, and the manifest taken in that snapshot."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        return _make(conn, schema, dump_argv, env, key, sender, progress)


def _make(conn, schema: str, dump_argv: list[str], env: dict | None, key: bytes, sender, progress) -> dict:
    say = progress or (lambda *a: None)
    started = time.monotonic()
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
    facts = manifest(conn, schema)
    say("backup", 0, sum(t["bytes"] for t in facts["tables"].values()), "bytes", "manifest taken")
    dumper = subprocess.Popen([*dump_argv, "--format=custom", "--schema", schema, "--no-publications",
                               "--no-subscriptions", "--no-tablespaces", f"--snapshot={snapshot}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    tail = _Tail(dumper.stderr)
    archive = hashlib.sha256()
    archive_bytes = 0
    try:
        stored = EncryptingWriter(sender, key)
        for data in iter(lambda: dumper.stdout.read1(READ_BYTES), b""):
            stored.write(data)
            archive.update(data)
            archive_bytes += len(data)
            say("backup", archive_bytes, 0, "bytes", "")
        stored.close()
        if dumper.wait() != 0:
            raise AgentError(f"pg_dump of {schema} failed: {tail.text()}", retryable=True)
        sender.close()
    except BaseException:
        sender.abort()
        raise
    finally:
        _stop(dumper)
        conn.execute("ROLLBACK")
    return {"bytes": stored.bytes, "sha256": stored.sha256, "archive_bytes": archive_bytes,
            "archive_sha256": archive.hexdigest(), "manifest": facts,
            "seconds": round(time.monotonic() - started, 3)}


# a plain dump, streamed

def stream_dump(dump_argv: list[str], env: dict | None, flags, sender, schema: str | None) -> dict:
    """pg_dump's plain SQL of `schema` (the whole database when None) with `flags`, to `sender`."""
    started = time.monotonic()
    args = [*dump_argv, "--no-publications", "--no-subscriptions", "--no-tablespaces",
            *(["--schema", schema] if schema else []), *(["--schema-only"] if flags.schema_only else []),
            *(["--data-only"] if flags.data_only else []), *(["--clean", "--if-exists"] if flags.clean else [])]
    dumper = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    tail = _Tail(dumper.stderr)
    try:
        for data in iter(lambda: dumper.stdout.read1(READ_BYTES), b""):
            sender.write(data)
        if dumper.wait() != 0:
            raise AgentError(f"pg_dump failed: {tail.text()}", retryable=True)
        sent = sender.close()
    except BaseException:
        sender.abort()
        raise
    finally:
        _stop(dumper)
    return {"bytes": sent, "seconds": round(time.monotonic() - started, 3)}


# on the backup host

def _path(root: pathlib.Path, project_id: str, backup_id: str) -> pathlib.Path:
    return root / _uuid(project_id, "project id") / f"{_uuid(backup_id, 'backup id')}{SUFFIX}"


def store(root: pathlib.Path, project_id: str, backup_id: str, receiver) -> dict:
    """Writes what `receiver` sends to the backup's file, whole or not at all."""
    path = _path(root, project_id, backup_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists():
        raise AgentError(f"backup file {path} exists already", kind=FailureKind.CONFLICT)
    partial = path.with_name(path.name + PARTIAL)
    digest = hashlib.sha256()
    size = 0
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            for data in iter(receiver.chunk, b""):
                out.write(data)
                digest.update(data)
                size += len(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        receiver.abort()
        partial.unlink(missing_ok=True)
        raise
    return {"path": str(path), "bytes": size, "sha256": digest.hexdigest()}


def _digest(path: pathlib.Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for data in iter(lambda: handle.read(READ_BYTES), b""):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()


def check(root: pathlib.Path, project_id: str, backup_ids: list[str]) -> dict:
    files = []
    for backup_id in backup_ids:
        path = _path(root, project_id, backup_id)
        if not path.exists():
            files.append({"backup_id": backup_id, "exists": False, "bytes": 0, "sha256": ""})
            continue
        size, sha = _digest(path)
        files.append({"backup_id": backup_id, "exists": True, "bytes": size, "sha256": sha})
    return {"files": files}


def send(root: pathlib.Path, project_id: str, backup_id: str, sender) -> dict:
    path = _path(root, project_id, backup_id)
    if not path.exists():
        raise AgentError(f"backup file {path} is not on this host", kind=FailureKind.NOT_FOUND)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for data in iter(lambda: handle.read(READ_BYTES), b""):
                sender.write(data)
                digest.update(data)
        sent = sender.close()
    except BaseException:
        sender.abort()
        raise
    return {"bytes": sent, "sha256": digest.hexdigest()}


def remove(root: pathlib.Path, project_id: str, backup_ids: list[str]) -> dict:
    removed, missing = [], []
    for backup_id in backup_ids:
        path = _path(root, project_id, backup_id)
        try:
            path.unlink()
            removed.append(backup_id)
        except FileNotFoundError:
            missing.append(backup_id)
    if removed:
        try:
            path.parent.rmdir()
        except OSError:
            pass
    return {"removed": removed, "missing": missing}


# restoring one

def _guarded(body: str) -> str:
    """`body` as a DO block, quoted with a dollar tag that cannot occur in it (names come from tenants)."""
    tag = f"$r{secrets.token_hex(8)}$"
    while tag in body:
        tag = f"$r{secrets.token_hex(8)}$"
    return f"DO {tag} BEGIN {body} END {tag};"


def pre_sql(facts: dict, schema: str, extra_drop: str | None = None, auth_usage: bool = False) -> str:
    """Roles the archive names, its schema empty and owned as before, the session as its owner.

    With `auth_usage` those roles may use the `auth` schema (auth.uid()), as every role may on a
    shared cluster: a database of its own (a stack, a scratch one) grants it to its API roles only."""
    out = ["SET client_min_messages = warning;", "BEGIN;"]
    for role in sorted({facts["owner"], *facts["roles"]}):
        out.append(_guarded(f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {literal(role)}) THEN "
                            f"CREATE ROLE {ident(role)} NOLOGIN; END IF;"))
        if auth_usage:
            out.append(f"GRANT USAGE ON SCHEMA auth TO {ident(role)};")
    for name in {schema, extra_drop} - {None}:
        out.append(f"DROP SCHEMA IF EXISTS {ident(name)} CASCADE;")
        out.append(f"DELETE FROM flux.flux_migrations WHERE tenant_schema = {literal(name)};")
    out.append(f"CREATE SCHEMA {ident(schema)} AUTHORIZATION {ident(facts['owner'])};")
    out.append(f"SET ROLE {ident(facts['owner'])};")
    return "\n".join(out) + "\n"


def post_sql(facts: dict, schema: str, renames: dict | None = None, grants: list[str] | None = None) -> str:
    """Back to the login role; the ledger's rows; then schema and roles under their new names."""
    renames = renames or {}
    out = ["RESET ROLE;"]
    target = renames.get(schema, schema)
    for row in facts["ledger"]:
        out.append("INSERT INTO flux.flux_migrations (tenant_schema, version, filename, checksum, applied_at) "
                   f"VALUES ({literal(target)}, {literal(row['version'])}, {literal(row['filename'])}, "
                   f"{literal(row['checksum'])}, coalesce({literal(row['applied_at'])}::timestamptz, now()));")
    for old, new in renames.items():
        if old == new:
            continue
        if old == schema:
            out.append(f"ALTER SCHEMA {ident(old)} RENAME TO {ident(new)};")
        else:
            out.append(_guarded(f"IF EXISTS (SELECT FROM pg_roles WHERE rolname = {literal(old)}) AND NOT EXISTS "
                                f"(SELECT FROM pg_roles WHERE rolname = {literal(new)}) THEN ALTER ROLE {ident(old)} "
                                f"RENAME TO {ident(new)}; END IF;"))
    out += grants or []
    # The only commit: input that ends before it (the agent stopped) is rolled back by the server.
    out.append("COMMIT;")
    return "\n".join(out) + "\n"


_CREATE_SCHEMA = re.compile(rb'^CREATE SCHEMA ("?)(.+)\1;\s*$')


def _errors(text: str) -> str:
    """psql's ERROR lines only: its DETAIL and CONTEXT lines can quote a tenant's rows."""
    errors = [line.strip() for line in text.splitlines() if "ERROR:" in line]
    return "; ".join(errors)[-800:] or "psql failed"


def restore(reader, key: bytes, schema: str, restore_argv: list[str], psql_argv: list[str], env: dict | None,
            pre: str, post: str, progress=None) -> dict:
    """Decrypts the archive `reader` gives and restores it in one transaction (see the module)."""
    say = progress or (lambda *a: None)
    started = time.monotonic()
    psql = subprocess.Popen([*psql_argv, "-X", "-q", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    psql_tail = _Tail(psql.stderr)
    restorer = subprocess.Popen([*restore_argv, "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
    restore_tail = _Tail(restorer.stderr)
    failed: list[BaseException] = []
    archive_bytes = 0

    def feed() -> None:
        nonlocal archive_bytes
        try:
            for plain in decrypt(reader.read, key):
                restorer.stdin.write(plain)
                archive_bytes += len(plain)
        except BaseException as exc:  # noqa: BLE001 - reported below, in the job's thread
            failed.append(exc)
            _stop(restorer)
        finally:
            try:
                restorer.stdin.close()
            except OSError:
                pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    committed = False
    try:
        psql.stdin.write(pre.encode())
        lines = 0
        in_copy = schema_made = False
        for line in restorer.stdout:
            if in_copy:
                in_copy = line != b"\\.\n"
            elif line.startswith(b"COPY ") and line.rstrip().endswith(b"FROM stdin;"):
                in_copy = True
            elif not schema_made:
                match = _CREATE_SCHEMA.match(line)
                if match and match.group(2).decode(errors="replace").replace('""', '"') == schema:
                    schema_made = True
                    continue  # made by `pre`, for its owner
            psql.stdin.write(line)
            lines += 1
            if lines % 100_000 == 0:
                say("restore", archive_bytes, 0, "bytes", "")
        feeder.join()
        restored = restorer.wait() == 0
        if failed or not restored:
            reason = failed[0] if failed else None
            if isinstance(reason, DumpFileError):
                raise AgentError(f"the backup does not decrypt: {reason.message}", kind=FailureKind.INVALID)
            if isinstance(reason, AgentError):
                raise reason
            raise AgentError(f"pg_restore failed: {restore_tail.text() or reason}", kind=FailureKind.INVALID)
        psql.stdin.write(post.encode())
        psql.stdin.close()
        if psql.wait() != 0:
            raise AgentError(f"the restore was rolled back: {_errors(psql_tail.text(4000))}", kind=FailureKind.INVALID)
        committed = True
    except BrokenPipeError:
        psql.wait()
        raise AgentError(f"the restore was rolled back: {_errors(psql_tail.text(4000))}",
                         kind=FailureKind.INVALID) from None
    finally:
        if not committed:
            _stop(psql)  # input cut short: psql -1 never commits it
            reader.abort()
        _stop(restorer)
        feeder.join(timeout=10)
    say("restore", archive_bytes, archive_bytes, "bytes", "done")
    return {"archive_bytes": archive_bytes, "seconds": round(time.monotonic() - started, 3)}


# where the tools run

def local_tools(url: str) -> tuple[list[str], list[str], list[str], dict]:
    """pg_dump, pg_restore and psql on this host, for the database at `url`."""
    env = libpq_env(url)
    return ([require_tool("pg_dump")], [require_tool("pg_restore")], [require_tool("psql")], env)


def container_tools(container: str) -> tuple[list[str], list[str], list[str], dict]:
    """The same tools inside a Postgres container, as its superuser over its local socket."""
    docker = require_tool("docker")
    exec_ = [docker, "exec", "-i", container]
    return ([*exec_, "pg_dump", "-U", "postgres", "-d", "postgres"], [*exec_, "pg_restore"],
            [*exec_, "psql", "-U", "postgres", "-d", "postgres"], None)
