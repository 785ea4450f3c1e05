"""Jobs of a docker agent: a dedicated project's Postgres and PostgREST containers."""

import asyncio
import collections

import psycopg

from ..adapters import ledger, stacks
from ..runtime.settings import DockerSettings
from .context import Handler, JobContext


def _stack(ctx: JobContext) -> tuple[stacks.StackSpec, DockerSettings]:
    return stacks.StackSpec.from_params(ctx.params), ctx.settings.get("docker") or DockerSettings()

# Jobs that make, change or remove a stack's containers run one at a time for each stack, in the
# order they came: a stack.remove sent while a stack.provision still runs (a controller that
# restarted and rolls back what its predecessor began) waits for it, instead of removing what is
# there so far and leaving what the provision makes after. A lock for each stack the agent has
# been sent (a few hundred bytes each), kept while it runs.
_changing: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)


async def _one_at_a_time(spec: stacks.StackSpec, work, *args):
    async with _changing[spec.prefix]:
        return await asyncio.to_thread(work, *args)

async def stack_provision(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)
    return await _one_at_a_time(spec, stacks.provision, spec, settings, ctx.progress)

async def stack_observe(ctx: JobContext) -> dict:
    spec, _ = _stack(ctx)
    return await asyncio.to_thread(stacks.observe, spec)

async def stack_start(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)
    return await _one_at_a_time(spec, stacks.start, spec, settings)

async def stack_stop(ctx: JobContext) -> dict:
    spec, _ = _stack(ctx)
    return await _one_at_a_time(spec, stacks.stop, spec)

async def stack_remove(ctx: JobContext) -> dict:
    spec, _ = _stack(ctx)
    return await _one_at_a_time(spec, stacks.remove, spec)

async def stack_find(ctx: JobContext) -> dict:
    return await asyncio.to_thread(stacks.find, ctx.params.hash)

async def stack_logs(ctx: JobContext) -> dict:
    spec, _ = _stack(ctx)
    p = ctx.params
    return await asyncio.to_thread(stacks.logs, spec, p.service, p.tail, p.since)

async def stack_probe(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)
    return await asyncio.to_thread(stacks.probe_only, spec, settings)

async def stack_bootstrap(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)
    return await _one_at_a_time(spec, stacks.bootstrap, spec, settings)

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


HANDLERS: dict[str, Handler] = {
    "stack.provision": stack_provision,
    "stack.observe": stack_observe,
    "stack.start": stack_start,
    "stack.stop": stack_stop,
    "stack.remove": stack_remove,
    "stack.find": stack_find,
    "stack.logs": stack_logs,
    "stack.probe": stack_probe,
    "stack.bootstrap": stack_bootstrap,
    "stack.image_info": stack_image_info,
    "stack.push": stack_push,
    "stack.migrations": stack_migrations,
}
