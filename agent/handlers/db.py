"""Jobs of a db agent: a pooled tenant on the shared cluster, its backups, and the source side of
a migration.

Every job that runs a tenant's SQL (or reads its data) logs in as the tenant's owner role,
never as the superuser.
"""

import asyncio
import logging

import psycopg

from contract.failures import FailureKind

from ..adapters import backups, changes, dumpfile, dumps, ledger, tenants, transfer
from ..errors import AgentError
from ..runtime.settings import DbSettings
from . import backup
from .context import Handler, JobContext

log = logging.getLogger(__name__)

def _db_settings(ctx: JobContext):
    db = ctx.settings.get("db")
    if db is None:
        raise AgentError("this agent has no db settings (shared_cluster_url) in settings.json")
    return db

def _guards(ctx: JobContext):
    if ctx.guards is None:
        raise AgentError("this agent holds no write guards: only a db agent does", kind=FailureKind.INVALID)
    return ctx.guards

def _syncs(ctx: JobContext):
    if ctx.syncs is None:
        raise AgentError("this agent runs no online syncs: only a db agent does", kind=FailureKind.INVALID)
    return ctx.syncs

async def _on_shared_cluster(ctx: JobContext, work) -> dict:
    db = _db_settings(ctx)
    tenant = tenants.Tenant.from_params(ctx.params)

    def run() -> dict:
        with tenants.connect(db) as conn:
            tenants.bootstrap(conn, db)
            return work(conn, tenant, db)

    return await asyncio.to_thread(run)

def _tenant_login(ctx: JobContext) -> tuple[tenants.Tenant, str]:
    """The tenant of the job and a connection string that logs in as its owner role."""
    db = _db_settings(ctx)
    tenant = tenants.Tenant.from_params(ctx.params)
    with tenants.connect(db) as conn:
        tenants.bootstrap(conn, db)
        return tenant, tenants.tenant_login(conn, db, tenant)

async def _as_tenant(ctx: JobContext, work) -> dict:
    """Runs `work(conn, tenant, db)` in a session logged in as the tenant, never the superuser."""
    db = _db_settings(ctx)

    def run() -> dict:
        tenant, url = _tenant_login(ctx)
        try:
            with tenants.connect_as_tenant(url) as conn:
                return work(conn, tenant, db)
        finally:
            with tenants.connect(db) as admin, admin.transaction():
                tenants.revoke_self_grants(admin, tenant)

    return await asyncio.to_thread(run)

async def tenant_create(ctx: JobContext) -> dict:
    return await _on_shared_cluster(ctx, lambda conn, t, db: tenants.create_tenant(conn, t, db))

async def tenant_drop(ctx: JobContext) -> dict:
    """Drops the tenant from the shared cluster, then its dump files from the spool."""
    def drop(conn, tenant, db) -> dict:
        result = tenants.drop_tenant(conn, tenant, db.drop_lock_timeout)
        return {**result, "dumps_removed": dumps.remove_dumps(ctx.state_dir / "spool", tenant)}

    return await _on_shared_cluster(ctx, drop)

async def tenant_migrations(ctx: JobContext) -> dict:
    return await _as_tenant(ctx, lambda conn, t, db: {"applied": ledger.ledger(conn, t.schema)})

async def tenant_push(ctx: JobContext) -> dict:
    files = ledger.parse_files(ctx.params.files)
    dry_run = ctx.params.dry_run
    return await _as_tenant(ctx, lambda conn, t, db: tenants.push(conn, t, files, db, dry_run, ctx.progress))

async def tenant_preflight(ctx: JobContext) -> dict:
    spool = ctx.state_dir / "spool"
    return await _as_tenant(ctx, lambda conn, t, db: dumps.preflight(conn, t, spool))

async def tenant_lock(ctx: JobContext) -> dict:
    """Holds writes on the pooled copy (as the tenant), or with target_url on the stack's database."""
    def run() -> dict:
        if ctx.params.target_url:
            # A guard on a stack's database (a rollback) needs none of the shared cluster's settings.
            wait = getattr(ctx.settings.get("db"), "write_guard_lock_timeout", DbSettings.write_guard_lock_timeout)
            tenant = tenants.Tenant.from_params(ctx.params)
            return _guards(ctx).lock(ctx.params.target_url, tenant, _guard_key(tenant, "back"), wait)
        db = _db_settings(ctx)
        tenant, url = _tenant_login(ctx)
        with tenants.connect(db) as conn:
            tenants.cancel_autovacuum(conn, tenant)
        return _guards(ctx).lock(url, tenant, lock_timeout=db.write_guard_lock_timeout)

    return await asyncio.to_thread(run)

async def tenant_unlock(ctx: JobContext) -> dict:
    """Releases the write guard; with `revoke_writes` (after cutover) the pooled copy turns read-only
    for every tenant role, in the guard's own transaction when it is held."""
    def run() -> dict:
        tenant = tenants.Tenant.from_params(ctx.params)
        if ctx.params.target_url:
            return _guards(ctx).unlock(None, tenant, False, _guard_key(tenant, "back"))
        if not ctx.params.revoke_writes:
            return _guards(ctx).unlock(None, tenant, False)
        db = _db_settings(ctx)
        result = _guards(ctx).unlock(db.shared_cluster_url, tenant, True)
        revoked = result.pop("revoked", [])
        with tenants.connect(db) as conn:
            return {**result, **tenants.freeze(conn, tenant, revoked)}

    return await asyncio.to_thread(run)

async def tenant_dump(ctx: JobContext) -> dict:
    p = ctx.params
    tenant = tenants.Tenant.from_params(p)
    key = dumpfile.parse_key(p.dump_key)
    _require_guard(ctx, tenant)
    name = p.name or tenant.schema
    spool = ctx.state_dir / "spool"

    def run() -> dict:
        url = _frozen_copy_url(ctx, tenant) if p.frozen_copy else _tenant_login(ctx)[1]
        dumps.prune_leftovers(spool)
        if p.sync:
            return _dump_and_follow(ctx, tenant, url, spool, name, key)
        if p.target_url is None:
            return dumps.dump(url, tenant, spool, name, key=key, expected_bytes=p.expected_bytes,
                              table_count=p.table_count, progress=ctx.progress)
        moved = transfer.move(url, tenant, p.target_url, spool=spool, name=name, key=key,
                              expected_bytes=p.expected_bytes, table_count=p.table_count, progress=ctx.progress)
        return _dumped(moved)

    return await asyncio.to_thread(run)


def _frozen_copy_url(ctx: JobContext, tenant) -> str:
    """The kept read-only copy of a migrated project is read as the agent's own role: its owner no
    longer logs in. Only such a copy: a live tenant is always read as itself."""
    db = _db_settings(ctx)
    with tenants.connect(db) as conn:
        return tenants.kept_copy_reader(conn, tenant, db.shared_cluster_url)


def _require_guard(ctx: JobContext, tenant) -> None:
    if ctx.params.require_guard and not _guards(ctx).held(tenant):
        # The same job sent again finds no guard either: the controller must lock again first.
        raise AgentError("the write guard on the source is not held (the agent restarted?); "
                         "lock again before copying", kind=FailureKind.CONFLICT)


async def tenant_copy(ctx: JobContext) -> dict:
    """The tenant into the dedicated database by the parallel copy, with no dump file (a full
    offline migrate keeps one after the cutover, from the frozen pooled copy)."""
    p = ctx.params
    tenant = tenants.Tenant.from_params(p)
    _require_guard(ctx, tenant)

    def run() -> dict:
        _, url = _tenant_login(ctx)
        moved = transfer.move(url, tenant, p.target_url, expected_bytes=p.expected_bytes, progress=ctx.progress)
        return {k: moved[k] for k in ("tables", "rows", "bytes", "ledger_rows", "seconds", "phases")}

    return await asyncio.to_thread(run)


def _dump_and_follow(ctx: JobContext, tenant, url: str, spool, name: str, key: bytes) -> dict:
    """The copy from a new slot's snapshot, then the kept dump file from the same snapshot (both
    transfer.move); then the slot applied to the target from where the copy ends, unless the target
    is in bulk-load mode (stacks.BULK_LOAD_COMMAND)."""
    p = ctx.params
    admin = _db_settings(ctx).shared_cluster_url
    _syncs(ctx).end(tenant, admin)
    replication, snapshot, lsn = changes.create_slot(admin, tenant)
    try:
        moved = transfer.move(url, tenant, p.target_url, snapshot=snapshot, spool=spool, name=name, key=key,
                              expected_bytes=p.expected_bytes, table_count=p.table_count, progress=ctx.progress)
    except BaseException:
        replication.close()
        changes.drop_slot(admin, tenant)
        raise
    replication.close()
    changes.forget_position(p.target_url, tenant)
    with psycopg.connect(p.target_url, connect_timeout=10) as target:
        bulk_load = target.execute("SHOW wal_level").fetchone()[0] == "minimal"
    if not bulk_load:
        _syncs(ctx).follow(tenant, admin, p.target_url, p.max_lag_bytes or changes.DEFAULT_MAX_LAG_BYTES)
    # else the stack restarts with its usual settings first (stack.bootstrap); the slot keeps every
    # change meanwhile, and tenant.sync_status starts applying them.
    return {**_dumped(moved), "sync_lsn": lsn}


def _dumped(moved: dict) -> dict:
    """tenant.dump's result for a move that copied into the target and kept a file."""
    return {**moved["kept"], "restored": True, "tables": moved["tables"], "ledger_rows": moved["ledger_rows"],
            "seconds": moved["seconds"]}


async def tenant_dump_remove(ctx: JobContext) -> dict:
    """Removes dump files of the tenant the controller names (retention, drop, delete)."""
    tenant = tenants.Tenant.from_params(ctx.params)
    return await asyncio.to_thread(dumps.remove_files, ctx.state_dir / "spool", tenant, ctx.params.paths)


async def tenant_dump_stat(ctx: JobContext) -> dict:
    """Whether each of the tenant's dump files named is there, and its size."""
    tenant = tenants.Tenant.from_params(ctx.params)
    return await asyncio.to_thread(dumps.stat_files, ctx.state_dir / "spool", tenant, ctx.params.paths)


async def tenant_verify(ctx: JobContext) -> dict:
    def run() -> dict:
        tenant, url = _tenant_login(ctx)
        return dumps.verify(url, tenant, ctx.params.target_url)

    return await asyncio.to_thread(run)


def _ends(ctx: JobContext) -> tuple[str, str | None]:
    """(source, target) connection strings of the job's sync: forward from the shared cluster to the
    stack, back from the stack to the shared cluster."""
    p = ctx.params
    shared = _db_settings(ctx).shared_cluster_url
    return (shared, p.target_url) if p.direction == "forward" else (p.target_url, shared)


async def tenant_sync_status(ctx: JobContext) -> dict:
    """Where the tenant's sync stands; resumes one whose slot outlived its apply here."""
    p = ctx.params
    tenant = tenants.Tenant.from_params(p)
    source, target = _ends(ctx)

    def run() -> dict:
        with psycopg.connect(source, autocommit=True, connect_timeout=10) as conn:
            slot = changes.slot_state(conn, tenant)
        follow = _syncs(ctx).get(tenant, p.direction)
        if slot is not None and target and (follow is None or not follow.running):
            follow = _syncs(ctx).follow(tenant, source, target, p.max_lag_bytes or changes.DEFAULT_MAX_LAG_BYTES,
                                      p.direction)
        state = follow.status() if follow is not None else {"running": False}
        return {**state, "slot": slot is not None, "source_lsn": slot and slot["source_lsn"],
                "lag_bytes": slot and slot["lag_bytes"]}

    return await asyncio.to_thread(run)


def _running_sync(ctx: JobContext, tenant, direction: str, drained_too: bool = False) -> changes.Follow:
    """The tenant's sync in `direction` on this agent (or one a drain stopped, with `drained_too`)."""
    follow = _syncs(ctx).get(tenant, direction)
    if follow is None or not (follow.running or (drained_too and follow.stopped_at)):
        raise AgentError(f"no sync of {tenant.schema} runs on this agent"
                         + (f": {follow.error}" if follow is not None and follow.error else ""),
                         kind=FailureKind.CONFLICT)
    return follow


def _guard_key(tenant, direction: str) -> str | None:
    """Forward, the guard is on the pooled copy; back, on the stack's database."""
    return None if direction == "forward" else f"{tenant.schema}@stack"


async def tenant_sync_drain(ctx: JobContext) -> dict:
    """Inside the pause (the write guard held on the sync's source): the target gets every
    transaction committed before now, the sync stops, and the sequences are set as the source has
    them. Forward with `reverse`, a slot on the stack then records its changes for the way back."""
    p = ctx.params
    tenant = tenants.Tenant.from_params(p)
    if not _guards(ctx).held(tenant, _guard_key(tenant, p.direction)):
        raise AgentError("the write guard on the sync's source is not held (the agent restarted?); the sync "
                         "cannot be drained while writes go on", kind=FailureKind.CONFLICT)
    source, target = _ends(ctx)

    def run() -> dict:
        follow = _running_sync(ctx, tenant, p.direction, drained_too=True)
        drained = follow.drain(follow.stopped_at or changes.pause_lsn(source), p.timeout_s)
        drained["sequences"] = changes.set_sequences(source, tenant, target)
        if p.reverse:
            try:
                changes.create_reverse_slot(p.target_url, tenant)
                drained.update(reverse=True)
            except AgentError as exc:
                drained.update(reverse=False, reverse_error=exc.message)
        return drained

    return await asyncio.to_thread(run)


async def tenant_sync_stop(ctx: JobContext) -> dict:
    """Stops the tenant's sync and drops its slot and publication, whether or not one runs."""
    p = ctx.params
    tenant = tenants.Tenant.from_params(p)
    source, target = _ends(ctx)

    def run() -> dict:
        ended = _syncs(ctx).end(tenant, source, p.direction)
        if target:
            try:
                changes.forget_position(target, tenant)
            except Exception as exc:  # the target may be gone already (a stack removed first)
                log.info("sync position of %s not removed from the target: %s", tenant.schema, exc)
        return ended

    return await asyncio.to_thread(run)


async def tenant_thaw(ctx: JobContext) -> dict:
    """The kept pooled copy takes writes again (a rollback, before routes move back to it)."""
    return await _on_shared_cluster(ctx, lambda conn, t, db: tenants.thaw(conn, t))


async def tenant_sync_check(ctx: JobContext) -> dict:
    """Every table compared, rows and checksum, between the source at one LSN and the target with
    everything before it applied; writes go on meanwhile."""
    tenant = tenants.Tenant.from_params(ctx.params)
    p = ctx.params

    def run() -> dict:
        follow = _running_sync(ctx, tenant, p.direction)
        checkpoint = follow.checkpoint(p.timeout_s)
        # Forward, the pooled tenant is read as its own role; back, the stack as its superuser.
        url = _tenant_login(ctx)[1] if p.direction == "forward" else _ends(ctx)[0]
        # Back, a difference is the controller's to act on (it moves the project back): it is reported.
        return changes.verify_checkpoint(url, tenant, checkpoint, strict=p.direction == "forward")

    return await asyncio.to_thread(run)


# backups of a pooled tenant (handlers/backup.py)


def _shared_url(ctx: JobContext) -> str:
    return _db_settings(ctx).shared_cluster_url


async def tenant_backup(ctx: JobContext) -> dict:
    """pg_dump of the tenant schema as the cluster's superuser: reading runs no tenant code, and
    row security (even forced on its owner) hides nothing from the backup."""
    tenant = tenants.Tenant.from_params(ctx.params)
    url = _shared_url(ctx)

    def run() -> dict:
        dump, _, _, env = backups.local_tools(url)
        sender = backup.transfers(ctx).sender(ctx.params.transfer_id)
        return backups.make(url, tenant.schema, dump, env, backup.key(ctx), sender, ctx.progress)

    return await asyncio.to_thread(run)


async def tenant_restore(ctx: JobContext) -> dict:
    """The tenant schema as the backup has it, in one transaction whose archive SQL runs as the
    tenant's owner; the runtime role gets back the grants it had."""
    tenant = tenants.Tenant.from_params(ctx.params)
    url = _shared_url(ctx)
    facts = backup.manifest(ctx)
    if facts["owner"] != tenant.owner_role:
        raise AgentError(f"the backup's schema is owned by {facts['owner']}, not by this tenant's owner role",
                         kind=FailureKind.INVALID)

    def run() -> dict:
        _, restore, psql, env = backups.local_tools(url)
        reader = backup.transfers(ctx).receiver(ctx.params.transfer_id)
        restored = backups.restore(reader, backup.key(ctx), tenant.schema, restore, psql, env,
                                   backups.pre_sql(facts, tenant.schema), backups.post_sql(facts, tenant.schema),
                                   ctx.progress)
        with psycopg.connect(url, connect_timeout=10) as conn:
            got = backups.manifest(conn, tenant.schema)
        return backup.summary(backups.compare(facts, got), facts, restored)

    return await asyncio.to_thread(run)


async def tenant_dump_stream(ctx: JobContext) -> dict:
    """The tenant schema as plain SQL (pg_dump as the cluster's superuser, like a backup), sent as it comes."""
    tenant = tenants.Tenant.from_params(ctx.params)
    url = _shared_url(ctx)

    def run() -> dict:
        dump, _, _, env = backups.local_tools(url)
        sender = backup.transfers(ctx).sender(ctx.params.transfer_id)
        return backups.stream_dump(dump, env, ctx.params.flags, sender, tenant.schema)

    return await asyncio.to_thread(run)


HANDLERS: dict[str, Handler] = {
    "tenant.create": tenant_create,
    "tenant.drop": tenant_drop,
    "tenant.migrations": tenant_migrations,
    "tenant.push": tenant_push,
    "tenant.preflight": tenant_preflight,
    "tenant.lock": tenant_lock,
    "tenant.unlock": tenant_unlock,
    "tenant.dump": tenant_dump,
    "tenant.copy": tenant_copy,
    "tenant.dump_remove": tenant_dump_remove,
    "tenant.dump_stat": tenant_dump_stat,
    "tenant.verify": tenant_verify,
    "tenant.sync_status": tenant_sync_status,
    "tenant.sync_drain": tenant_sync_drain,
    "tenant.sync_stop": tenant_sync_stop,
    "tenant.sync_check": tenant_sync_check,
    "tenant.thaw": tenant_thaw,
    "tenant.backup": tenant_backup,
    "tenant.restore": tenant_restore,
    "tenant.dump_stream": tenant_dump_stream,
}
