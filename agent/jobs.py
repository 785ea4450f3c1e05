"""Job kinds the agent executes. `run` checks a job's params against the contract and hands
them, typed, to the kind's handler in a `JobContext`; the handler returns its result as a JSON
object, which `run` checks against the contract before it is sent."""

import asyncio
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import psycopg

from contract.failures import FailureKind
from contract.jobs import KINDS
from contract.messages import ContractError, Params, Result

from . import dumps, ledger, stacks, tenants
from .settings import DockerSettings
from .errors import AgentError

ProgressFn = Callable[[str, int, int, str, str], None]


@dataclass
class JobContext:
    job_id: str
    # The params type of the job's kind (contract/).
    params: Params
    progress: ProgressFn
    collect_facts: Callable[[], dict]
    settings: dict = field(default_factory=dict)
    gateway: object | None = None
    state_dir: pathlib.Path = pathlib.Path(".")


Handler = Callable[[JobContext], Awaitable[dict]]


async def facts_collect(ctx: JobContext) -> dict:
    """Re-reads the host's facts (tool versions, free disk) and returns them."""
    return await asyncio.to_thread(ctx.collect_facts)


async def diag_wait(ctx: JobContext) -> dict:
    """Waits `seconds`, reporting progress each second: exercises the job path end to end."""
    seconds = ctx.params.seconds
    started = time.monotonic()
    whole = int(seconds)
    for done in range(whole):
        ctx.progress("waiting", done, whole, "s", "")
        await asyncio.sleep(1)
    await asyncio.sleep(seconds - whole)
    ctx.progress("waiting", whole, whole, "s", "done")
    return {"waited_s": round(time.monotonic() - started, 3), "pid": os.getpid()}


def _db_settings(ctx: JobContext):
    db = ctx.settings.get("db")
    if db is None:
        raise AgentError("this agent has no db settings (shared_cluster_url) in settings.json")
    return db


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
        result = tenants.drop_tenant(conn, tenant)
        return {**result, "dumps_removed": dumps.remove_dumps(ctx.state_dir / "spool", tenant)}

    return await _on_shared_cluster(ctx, drop)


async def tenant_migrations(ctx: JobContext) -> dict:
    return await _as_tenant(ctx, lambda conn, t, db: {"applied": ledger.ledger(conn, t.schema)})


async def tenant_push(ctx: JobContext) -> dict:
    files = ledger.parse_files(ctx.params.files)
    dry_run = ctx.params.dry_run
    return await _as_tenant(ctx, lambda conn, t, db: tenants.push(conn, t, files, db, dry_run, ctx.progress))


async def gateway_sync(ctx: JobContext) -> dict:
    if ctx.gateway is None:
        raise AgentError("this agent has no gateway role configured (settings.json: gateway)")
    p = ctx.params
    return await ctx.gateway.sync(p.version, p.base_version, p.part, p.parts, [r.to_wire() for r in p.upsert],
                                  p.remove)


def _stack(ctx: JobContext) -> tuple[stacks.StackSpec, DockerSettings]:
    return stacks.StackSpec.from_params(ctx.params), ctx.settings.get("docker") or DockerSettings()


async def stack_provision(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)
    return await asyncio.to_thread(stacks.provision, spec, settings, ctx.progress)


async def stack_observe(ctx: JobContext) -> dict:
    spec, _ = _stack(ctx)
    return await asyncio.to_thread(stacks.observe, spec)


async def stack_start(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)
    return await asyncio.to_thread(stacks.start, spec, settings)


async def stack_stop(ctx: JobContext) -> dict:
    spec, _ = _stack(ctx)
    return await asyncio.to_thread(stacks.stop, spec)


async def stack_remove(ctx: JobContext) -> dict:
    spec, _ = _stack(ctx)
    return await asyncio.to_thread(stacks.remove, spec)


async def stack_probe(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)
    return await asyncio.to_thread(stacks.probe_only, spec, settings)


async def stack_bootstrap(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)
    return await asyncio.to_thread(stacks.bootstrap, spec, settings)


async def stack_image_info(ctx: JobContext) -> dict:
    settings = ctx.settings.get("docker") or DockerSettings()
    return {"postgres_major": await asyncio.to_thread(stacks.postgres_major, settings),
            "postgres_image": settings.postgres_image, "postgrest_image": settings.postgrest_image}


def _on_stack_db(ctx: JobContext, work):
    spec, settings = _stack(ctx)

    def run() -> dict:
        with psycopg.connect(stacks.admin_url(spec, settings)) as conn:
            return work(conn, spec)

    return asyncio.to_thread(run)


async def stack_push(ctx: JobContext) -> dict:
    files = ledger.parse_files(ctx.params.files)
    dry_run = ctx.params.dry_run
    return await _on_stack_db(ctx, lambda conn, spec: ledger.apply_files(
        conn, spec.api_schema, files, "60s", dry_run, authenticated_as="authenticated",
        progress=ctx.progress))


async def stack_migrations(ctx: JobContext) -> dict:
    return await _on_stack_db(ctx, lambda conn, spec: {"applied": ledger.ledger(conn, spec.api_schema)})


async def tenant_preflight(ctx: JobContext) -> dict:
    spool = ctx.state_dir / "spool"
    return await _as_tenant(ctx, lambda conn, t, db: dumps.preflight(conn, t, spool))


async def tenant_lock(ctx: JobContext) -> dict:
    def run() -> dict:
        tenant, url = _tenant_login(ctx)
        return dumps.lock(url, tenant)

    return await asyncio.to_thread(run)


async def tenant_unlock(ctx: JobContext) -> dict:
    """Releases the write guard; with `revoke_writes` (after cutover) the pooled copy turns read-only
    for every tenant role, in the guard's own transaction when it is held."""
    def run() -> dict:
        tenant = tenants.Tenant.from_params(ctx.params)
        if not ctx.params.revoke_writes:
            return dumps.unlock(None, tenant, False)
        db = _db_settings(ctx)
        result = dumps.unlock(db.shared_cluster_url, tenant, True)
        with tenants.connect(db) as conn:
            return {**result, **tenants.freeze(conn, tenant)}

    return await asyncio.to_thread(run)


async def tenant_dump(ctx: JobContext) -> dict:
    p = ctx.params
    tenant = tenants.Tenant.from_params(p)
    if p.require_guard and not dumps.guard_held(tenant):
        # The same job sent again finds no guard either: the controller must lock again first.
        raise AgentError("the write guard on the source is not held (the agent restarted?); "
                         "lock again before dumping", kind=FailureKind.CONFLICT)
    name = p.name or tenant.schema
    if not name.replace("-", "").replace("_", "").isalnum():
        raise AgentError(f"invalid dump name {name!r}", kind=FailureKind.INVALID)

    def run() -> dict:
        _, url = _tenant_login(ctx)
        dumps.prune_dumps(ctx.state_dir / "spool", _db_settings(ctx).dump_retention_days * 86400)
        return dumps.dump(url, tenant, ctx.state_dir / "spool", name, p.target_url, p.target_major,
                          p.expected_bytes, p.table_count, ctx.progress)

    return await asyncio.to_thread(run)


async def tenant_verify(ctx: JobContext) -> dict:
    def run() -> dict:
        tenant, url = _tenant_login(ctx)
        return dumps.verify(url, tenant, ctx.params.target_url)

    return await asyncio.to_thread(run)


HANDLERS: dict[str, Handler] = {
    "facts.collect": facts_collect,
    "diag.wait": diag_wait,
    "tenant.create": tenant_create,
    "tenant.drop": tenant_drop,
    "tenant.migrations": tenant_migrations,
    "tenant.push": tenant_push,
    "gateway.sync": gateway_sync,
    "stack.provision": stack_provision,
    "stack.observe": stack_observe,
    "stack.start": stack_start,
    "stack.stop": stack_stop,
    "stack.remove": stack_remove,
    "stack.probe": stack_probe,
    "stack.bootstrap": stack_bootstrap,
    "stack.image_info": stack_image_info,
    "stack.push": stack_push,
    "stack.migrations": stack_migrations,
    "tenant.preflight": tenant_preflight,
    "tenant.lock": tenant_lock,
    "tenant.unlock": tenant_unlock,
    "tenant.dump": tenant_dump,
    "tenant.verify": tenant_verify,
}


async def run(kind: str, params: Any, **context) -> Result:
    """Runs a job of `kind` with its params as sent; `context` fills the rest of its JobContext.

    Params off the contract are an `invalid` failure naming the key; a result off it (a bug
    here) an `internal` one, never sent as it is.
    """
    spec, handler = KINDS.get(kind), HANDLERS.get(kind)
    if spec is None or handler is None:
        raise AgentError(f"this agent does not know job kind {kind!r}", kind=FailureKind.INVALID)
    try:
        typed = spec.parse_params(params)
    except ContractError as exc:
        raise AgentError(str(exc), kind=FailureKind.INVALID) from None
    output = await handler(JobContext(params=typed, **context))
    try:
        return spec.parse_result(output)
    except ContractError as exc:
        raise AgentError(f"this agent's result does not match the contract: {exc}") from None
