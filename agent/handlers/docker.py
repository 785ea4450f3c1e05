"""Jobs of a docker agent: a dedicated project's Postgres and PostgREST containers, their backups,
and scratch containers that check any backup."""

import asyncio
import collections
import contextlib
import logging
import secrets

import psycopg
from docker.errors import DockerException, NotFound

from contract.failures import FailureKind

from ..adapters import apiroles, backups, ledger, stacks
from ..adapters.ports import free_port
from ..errors import AgentError
from ..runtime.settings import DockerSettings
from . import backup
from .context import Handler, JobContext

log = logging.getLogger(__name__)

SCRATCH_LABEL = "flux.scratch"


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


# backups of a dedicated stack, and scratch containers to check any backup in (handlers/backup.py)


async def stack_backup(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)

    def run() -> dict:
        url = stacks.admin_url(spec, settings)
        dump, _, _, env = backups.container_tools(spec.db)
        sender = backup.transfers(ctx).sender(ctx.params.transfer_id)
        return backups.make(url, spec.api_schema, dump, env, backup.key(ctx), sender, ctx.progress)

    return await asyncio.to_thread(run)


async def stack_dump_stream(ctx: JobContext) -> dict:
    """The stack's database (or its API schema only) as plain SQL, from inside its container."""
    spec, _ = _stack(ctx)
    flags = ctx.params.flags

    def run() -> dict:
        dump, _, _, env = backups.container_tools(spec.db)
        sender = backup.transfers(ctx).sender(ctx.params.transfer_id)
        return backups.stream_dump(dump, env, flags, sender, spec.api_schema if flags.api_schema_only else None)

    return await asyncio.to_thread(run)


async def stack_restore(ctx: JobContext) -> dict:
    """The backup into this stack's database, in one transaction: its own backup, or another
    project's with its schema and roles renamed to this one's (`renames`)."""
    spec, settings = _stack(ctx)
    facts = backup.manifest(ctx)
    renames = dict(ctx.params.renames)
    source = facts["schema"]
    if renames.get(source, source) != spec.api_schema:
        raise AgentError(f"the backup's schema {source} would not become this stack's API schema {spec.api_schema}",
                         kind=FailureKind.INVALID)
    grants = []
    if spec.app_role:
        grants = [f"GRANT {backups.ident(spec.app_role)} TO authenticator;",
                  f"GRANT authenticated TO {backups.ident(spec.app_role)};"]

    def run() -> dict:
        url = stacks.admin_url(spec, settings)
        _, restore, psql, env = backups.container_tools(spec.db)
        reader = backup.transfers(ctx).receiver(ctx.params.transfer_id)
        extra = spec.api_schema if spec.api_schema != source else None
        restored = backups.restore(reader, backup.key(ctx), source, restore, psql, env,
                                   backups.pre_sql(facts, source, extra_drop=extra, auth_usage=True),
                                   backups.post_sql(facts, source, renames, grants), ctx.progress)
        with psycopg.connect(url, connect_timeout=10) as conn:
            got = backups.manifest(conn, spec.api_schema)
        return backup.summary(backups.compare(facts, got), facts, restored)

    return await asyncio.to_thread(run)


@contextlib.contextmanager
def scratch_database(settings: DockerSettings, backup_id: str):
    """A throwaway Postgres container, removed on the way out whatever happened."""
    engine = stacks.client()
    name = f"flux-scratch-{backup_id[:8]}-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(24)
    port = free_port(settings.publish_host)
    stacks._ensure_image(engine, settings.postgres_image)
    container = None
    try:
        container = engine.containers.run(
            settings.postgres_image, detach=True, name=name,
            labels={**settings.labels, "flux.managed": "true", SCRATCH_LABEL: backup_id},
            environment={"POSTGRES_PASSWORD": password}, ports={"5432/tcp": (settings.publish_host, port)},
            mem_limit=settings.memory_limit, nano_cpus=int(settings.cpus * 1e9))
        url = f"postgresql://postgres:{password}@{settings.advertise_host}:{port}/postgres"
        stacks.wait_for_db(url)
        yield container, url
    except DockerException as exc:
        raise AgentError(f"Docker could not run a scratch database: {exc}", kind=FailureKind.UNAVAILABLE) from None
    finally:
        if container is not None:
            try:
                container.remove(force=True, v=True)
            except NotFound:
                pass
            except DockerException as exc:
                log.warning("scratch container %s was not removed: %s", name, exc)


async def scratch_verify(ctx: JobContext) -> dict:
    """Restores the backup into a scratch container and compares it with its manifest."""
    settings = ctx.settings.get("docker") or DockerSettings()
    facts = backup.manifest(ctx)
    schema = facts["schema"]

    def run() -> dict:
        with scratch_database(settings, ctx.params.backup_id) as (container, url):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(apiroles.API_ROLES_AND_LEDGER)
            _, restore, psql, env = backups.container_tools(container.name)
            reader = backup.transfers(ctx).receiver(ctx.params.transfer_id)
            restored = backups.restore(reader, backup.key(ctx), schema, restore, psql, env,
                                       backups.pre_sql(facts, schema, auth_usage=True), backups.post_sql(facts, schema),
                                       ctx.progress)
            with psycopg.connect(url, connect_timeout=10) as conn:
                got = backups.manifest(conn, schema)
            return backup.summary(backups.compare(facts, got), facts, restored)

    return await asyncio.to_thread(run)


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
    "stack.backup": stack_backup,
    "stack.restore": stack_restore,
    "stack.dump_stream": stack_dump_stream,
    "scratch.verify": scratch_verify,
}
