"""A tenant moved into a dedicated database: its schema and rows by the parallel copy
(fastcopy.py), its ledger rows, and, when asked, the kept dump file (dumps.py) of the very same
snapshot, written after the copy so it never slows the copy down.

An offline migrate runs this under the write guard; its dump file may instead be written later,
from the pooled copy frozen at the cutover (the kept dump is then off the pause altogether). An
online one passes the snapshot its replication slot exported.
"""

import logging
import pathlib
import time

import psycopg

from . import dumps, fastcopy
from .tenants import Tenant

log = logging.getLogger(__name__)

# Parallel streams of the copy into a stack: one per core of a small db host.
COPY_WORKERS = 2


def move(source_url: str, tenant: Tenant, target_url: str, *, snapshot: str | None = None,
         spool: pathlib.Path | None = None, name: str | None = None, key: bytes | None = None,
         expected_bytes: int = 0, table_count: int = 0, progress=None, time_limit_s: float | None = None,
         workers: int = COPY_WORKERS) -> dict:
    """Copies the tenant into `target_url` (emptied first of what an earlier attempt left) as
    `snapshot` sees it, or a snapshot exported here; with `key`, then keeps an encrypted dump of
    the same snapshot in `spool` as `name`. Returns the copy's figures, and the file's under `kept`.

    The copy and the dump each stop after `time_limit_s` (by default scaled to `expected_bytes`)."""
    limit = dumps.time_limit(expected_bytes) if time_limit_s is None else time_limit_s
    say = progress or (lambda *a: None)
    started = time.monotonic()
    holder = None
    with psycopg.connect(source_url, connect_timeout=10) as source:
        roles = dumps.referenced_roles(source, tenant.schema)
    if snapshot is None:
        # Held open until the dump file is written: both read this snapshot.
        holder = psycopg.connect(source_url, connect_timeout=10)
        holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = holder.execute("SELECT pg_export_snapshot()").fetchone()[0]
    try:
        dumps.prepare_target(target_url, tenant, roles)
        copied = fastcopy.copy_schema(source_url, tenant.schema, target_url, snapshot=snapshot, workers=workers,
                                      progress=say, time_limit_s=limit)
        with psycopg.connect(source_url, connect_timeout=10) as source:
            ledger_rows = dumps.copy_ledger(source, target_url, tenant)
        log.info("copy of %s: %d tables, %d rows, %d bytes; seconds %s", tenant.schema, copied["tables"],
                 copied["rows"], copied["bytes"], copied["seconds"])
        kept = None
        if key is not None:
            kept = dumps.dump(source_url, tenant, spool, name or tenant.schema, expected_bytes=expected_bytes,
                              table_count=table_count, progress=say, key=key, snapshot=snapshot,
                              time_limit_s=max(limit - (time.monotonic() - started), 1))
            log.info("kept dump of %s: %d bytes in %.2fs", tenant.schema, kept["bytes"], kept.get("seconds") or 0)
    finally:
        if holder is not None:
            holder.close()
    return {"tables": copied["tables"], "rows": copied["rows"], "bytes": copied["bytes"],
            "ledger_rows": ledger_rows, "seconds": copied["seconds"]["total"], "phases": copied["seconds"],
            "kept": kept}
