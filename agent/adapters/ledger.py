"""The migration ledger: SQL files applied once each, in order, recorded with a checksum.

Used on both engines: a pooled tenant's schema on the shared cluster, and the API
schema of a dedicated database. `flux.flux_migrations` is keyed by schema and file name.
"""

import hashlib
import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

from contract import ledger as contract_ledger
from contract.failures import FailureKind

from ..errors import AgentError
from ..domain.sandbox import rewrite_files

_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,200}\.sql$")


def ledger(conn, schema: str) -> list[dict]:
    rows = conn.execute(
        "SELECT version, filename, checksum, applied_at FROM flux.flux_migrations"
        " WHERE tenant_schema = %s ORDER BY filename", (schema,)).fetchall()
    conn.rollback()
    return [{"version": v, "filename": f, "checksum": c, "appliedAt": a.isoformat()} for v, f, c, a in rows]


@dataclass(frozen=True)
class MigrationFile:
    filename: str
    version: str
    checksum: str
    sql: str


def parse_files(sent: list[contract_ledger.MigrationFile]) -> list[MigrationFile]:
    files = []
    for item in sent:
        filename = item.filename
        if not _FILENAME.match(filename):
            raise AgentError(f"invalid migration file name {filename!r}", kind=FailureKind.INVALID)
        text = item.sql
        digest = hashlib.sha256(text.encode()).hexdigest()
        if item.checksum and item.checksum != digest:
            raise AgentError(f"{filename}: checksum does not match its content", kind=FailureKind.INVALID)
        files.append(MigrationFile(filename, item.version or filename.split("_")[0], digest, text))
    names = [f.filename for f in files]
    if len(set(names)) != len(names):
        raise AgentError("the same migration file name appears twice", kind=FailureKind.INVALID)
    return sorted(files, key=lambda f: f.filename)


class PushConflict(AgentError):
    kind = FailureKind.CONFLICT


def apply_files(conn, schema: str, files: list[MigrationFile], statement_timeout: str, dry_run: bool,
                authenticated_as: str, progress=None) -> dict:
    """Applies files not yet in `schema`'s ledger, in order, in one transaction.

    Each file runs with search_path pinned to `schema`, as the role `conn` logged in as;
    objects aimed at `public` land in `schema` and grants to `authenticated` go to
    `authenticated_as`.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (schema,))
        applied = dict(conn.execute(
            "SELECT filename, checksum FROM flux.flux_migrations WHERE tenant_schema = %s",
            (schema,)).fetchall())
        for f in files:
            if f.filename in applied and applied[f.filename] != f.checksum:
                raise PushConflict(
                    f"{f.filename} was applied before with checksum {applied[f.filename][:12]}… and has "
                    f"changed since (now {f.checksum[:12]}…); nothing was applied. Add a new migration "
                    "file instead of editing an applied one")
        todo = [f for f in files if f.filename not in applied]
        rewritten = list(zip(todo, rewrite_files([(f.filename, f.sql) for f in todo], schema, authenticated_as)))
        result = {
            "applied": [f.filename for f in todo],
            "skipped": sorted(f.filename for f in files if f.filename in applied),
            "tablesMoved": sum(r.tables_moved for _, r in rewritten),
            "sequencesMoved": sum(r.sequences_moved for _, r in rewritten),
            "viewsMoved": sum(r.views_moved for _, r in rewritten),
            "dryRun": dry_run,
        }
        if dry_run:
            raise psycopg.Rollback()
        conn.execute("SELECT set_config('statement_timeout', %s, true)", (statement_timeout,))
        for index, (f, r) in enumerate(rewritten):
            if progress:
                progress("push", index, len(rewritten), "files", f.filename)
            conn.execute("SELECT set_config('search_path', %s, true)",
                         (sql.Identifier(schema).as_string(conn) + ", auth",))
            try:
                conn.execute(r.sql)
            except psycopg.Error as exc:
                raise AgentError(f"{f.filename}: {exc.diag.message_primary or exc}"
                                 + (f" ({exc.diag.sqlstate})" if exc.diag.sqlstate else ""),
                                 kind=FailureKind.INVALID) from None
            conn.execute(
                "INSERT INTO flux.flux_migrations (tenant_schema, version, filename, checksum)"
                " VALUES (%s, %s, %s, %s)", (schema, f.version, f.filename, f.checksum))
        if progress and rewritten:
            progress("push", len(rewritten), len(rewritten), "files", "done")
    return result
