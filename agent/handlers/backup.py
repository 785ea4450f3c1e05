"""Jobs on backups, by role: a db agent makes and restores a pooled tenant's, a docker agent a
dedicated stack's and checks any of them in a scratch container, a backup agent keeps the files.

The bytes go through the controller (runtime/transfers.py); the backup key comes with the job
and stays in this process's memory.
"""

import asyncio
import contextlib
import logging
import pathlib
import secrets

import psycopg
from docker.errors import DockerException, NotFound

from contract.failures import FailureKind

from ..adapters import apiroles, backups, stacks, tenants
from ..adapters.dumpfile import parse_key
from ..adapters.ports import free_port
from ..errors import AgentError
from ..runtime.settings import DockerSettings
from .context import Handler, JobContext
from .db import _db_settings
from .docker import _stack

log = logging.getLogger(__name__)

SCRATCH_LABEL = "flux.scratch"


def _key(ctx: JobContext) -> bytes:
    return parse_key(ctx.params.backup_key, "backup_key")


def _transfers(ctx: JobContext):
    if ctx.transfers is None:
        raise AgentError("this agent has no connection to send files over", kind=FailureKind.UNAVAILABLE)
    return ctx.transfers


def _manifest(ctx: JobContext) -> dict:
    return ctx.params.manifest.to_wire()


def _summary(problems: list[str], facts: dict, restored: dict) -> dict:
    return {"problems": problems, "tables": len(facts["tables"]),
            "rows": sum(t["rows"] for t in facts["tables"].values()),
            "archive_bytes": restored["archive_bytes"], "seconds": restored["seconds"]}


# db agents: a pooled tenant


def _shared_url(ctx: JobContext) -> str:
    return _db_settings(ctx).shared_cluster_url


async def tenant_backup(ctx: JobContext) -> dict:
    """pg_dump of the tenant schema as the cluster's superuser: reading runs no tenant code, and
    row security (even forced on its owner) hides nothing from the backup."""
    tenant = tenants.Tenant.from_params(ctx.params)
    url = _shared_url(ctx)

    def run() -> dict:
        dump, _, _, env = backups.local_tools(url)
        sender = _transfers(ctx).sender(ctx.params.transfer_id)
        return backups.make(url, tenant.schema, dump, env, _key(ctx), sender, ctx.progress)

    return await asyncio.to_thread(run)


async def tenant_restore(ctx: JobContext) -> dict:
    """The tenant schema as the backup has it, in one transaction whose archive SQL runs as the
    tenant's owner; the runtime role gets back the grants it had."""
    tenant = tenants.Tenant.from_params(ctx.params)
    url = _shared_url(ctx)
    facts = _manifest(ctx)
    if facts["owner"] != tenant.owner_role:
        raise AgentError(f"the backup's schema is owned by {facts['owner']}, not by this tenant's owner role",
                         kind=FailureKind.INVALID)

    def run() -> dict:
        _, restore, psql, env = backups.local_tools(url)
        reader = _transfers(ctx).receiver(ctx.params.transfer_id)
        restored = backups.restore(reader, _key(ctx), tenant.schema, restore, psql, env,
                                   backups.pre_sql(facts, tenant.schema), backups.post_sql(facts, tenant.schema),
                                   ctx.progress)
        with psycopg.connect(url, connect_timeout=10) as conn:
            got = backups.manifest(conn, tenant.schema)
        return _summary(backups.compare(facts, got), facts, restored)

    return await asyncio.to_thread(run)


async def tenant_dump_stream(ctx: JobContext) -> dict:
    """The tenant schema as plain SQL (pg_dump as the cluster's superuser, like a backup), sent as it comes."""
    tenant = tenants.Tenant.from_params(ctx.params)
    url = _shared_url(ctx)

    def run() -> dict:
        dump, _, _, env = backups.local_tools(url)
        sender = _transfers(ctx).sender(ctx.params.transfer_id)
        return backups.stream_dump(dump, env, ctx.params.flags, sender, tenant.schema)

    return await asyncio.to_thread(run)


# docker agents: a dedicated stack, and scratch containers


async def stack_backup(ctx: JobContext) -> dict:
    spec, settings = _stack(ctx)

    def run() -> dict:
        url = stacks.admin_url(spec, settings)
        dump, _, _, env = backups.container_tools(spec.db)
        sender = _transfers(ctx).sender(ctx.params.transfer_id)
        return backups.make(url, spec.api_schema, dump, env, _key(ctx), sender, ctx.progress)

    return await asyncio.to_thread(run)


async def stack_dump_stream(ctx: JobContext) -> dict:
    """The stack's database (or its API schema only) as plain SQL, from inside its container."""
    spec, _ = _stack(ctx)
    flags = ctx.params.flags

    def run() -> dict:
        dump, _, _, env = backups.container_tools(spec.db)
        sender = _transfers(ctx).sender(ctx.params.transfer_id)
        return backups.stream_dump(dump, env, flags, sender, spec.api_schema if flags.api_schema_only else None)

    return await asyncio.to_thread(run)


async def stack_restore(ctx: JobContext) -> dict:
    """The backup into this stack's database, in one transaction: its own backup, or another
    project's with its schema and roles renamed to this one's (`renames`)."""
    spec, settings = _stack(ctx)
    facts = _manifest(ctx)
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
        reader = _transfers(ctx).receiver(ctx.params.transfer_id)
        extra = spec.api_schema if spec.api_schema != source else None
        restored = backups.restore(reader, _key(ctx), source, restore, psql, env,
                                   backups.pre_sql(facts, source, extra_drop=extra, auth_usage=True),
                                   backups.post_sql(facts, source, renames, grants), ctx.progress)
        with psycopg.connect(url, connect_timeout=10) as conn:
            got = backups.manifest(conn, spec.api_schema)
        return _summary(backups.compare(facts, got), facts, restored)

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
            settings.postgres_image, detach=True, name=name, labels={"flux.managed": "true", SCRATCH_LABEL: backup_id},
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
    facts = _manifest(ctx)
    schema = facts["schema"]

    def run() -> dict:
        with scratch_database(settings, ctx.params.backup_id) as (container, url):
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(apiroles.API_ROLES_AND_LEDGER)
            _, restore, psql, env = backups.container_tools(container.name)
            reader = _transfers(ctx).receiver(ctx.params.transfer_id)
            restored = backups.restore(reader, _key(ctx), schema, restore, psql, env,
                                       backups.pre_sql(facts, schema, auth_usage=True), backups.post_sql(facts, schema),
                                       ctx.progress)
            with psycopg.connect(url, connect_timeout=10) as conn:
                got = backups.manifest(conn, schema)
            return _summary(backups.compare(facts, got), facts, restored)

    return await asyncio.to_thread(run)


# backup agents


def _root(ctx: JobContext) -> pathlib.Path:
    backup = ctx.settings.get("backup")
    if backup is None:
        raise AgentError("this agent has no backup settings (dir) in settings.json")
    return pathlib.Path(backup.dir)


async def backup_store(ctx: JobContext) -> dict:
    p = ctx.params

    def run() -> dict:
        return backups.store(_root(ctx), p.project_id, p.backup_id, _transfers(ctx).receiver(p.transfer_id))

    return await asyncio.to_thread(run)


async def backup_send(ctx: JobContext) -> dict:
    p = ctx.params

    def run() -> dict:
        root = _root(ctx)
        backups._path(root, p.project_id, p.backup_id)  # a bad id fails before the transfer starts
        return backups.send(root, p.project_id, p.backup_id, _transfers(ctx).sender(p.transfer_id))

    return await asyncio.to_thread(run)


async def backup_check(ctx: JobContext) -> dict:
    return await asyncio.to_thread(backups.check, _root(ctx), ctx.params.project_id, ctx.params.backup_ids)


async def backup_remove(ctx: JobContext) -> dict:
    return await asyncio.to_thread(backups.remove, _root(ctx), ctx.params.project_id, ctx.params.backup_ids)


HANDLERS: dict[str, Handler] = {
    "tenant.backup": tenant_backup,
    "tenant.restore": tenant_restore,
    "stack.backup": stack_backup,
    "stack.restore": stack_restore,
    "tenant.dump_stream": tenant_dump_stream,
    "stack.dump_stream": stack_dump_stream,
    "scratch.verify": scratch_verify,
    "backup.store": backup_store,
    "backup.send": backup_send,
    "backup.check": backup_check,
    "backup.remove": backup_remove,
}
