"""Backups, by role: a db agent makes and restores a pooled tenant's (handlers/db.py), a docker
agent a dedicated stack's and checks any of them in a scratch container (handlers/docker.py), and
a backup agent keeps the files (here).

The bytes go through the controller (runtime/transfers.py); the backup key comes with the job
and stays in this process's memory.
"""

import asyncio
import pathlib

from contract.failures import FailureKind

from ..adapters import backups
from ..adapters.dumpfile import parse_key
from ..errors import AgentError
from .context import Handler, JobContext


def key(ctx: JobContext) -> bytes:
    return parse_key(ctx.params.backup_key, "backup_key")


def transfers(ctx: JobContext):
    if ctx.transfers is None:
        raise AgentError("this agent has no connection to send files over", kind=FailureKind.UNAVAILABLE)
    return ctx.transfers


def manifest(ctx: JobContext) -> dict:
    return ctx.params.manifest.to_wire()


def summary(problems: list[str], facts: dict, restored: dict) -> dict:
    return {"problems": problems, "tables": len(facts["tables"]),
            "rows": sum(t["rows"] for t in facts["tables"].values()),
            "archive_bytes": restored["archive_bytes"], "seconds": restored["seconds"]}


# backup agents


def _root(ctx: JobContext) -> pathlib.Path:
    backup = ctx.settings.get("backup")
    if backup is None:
        raise AgentError("this agent has no backup settings (dir) in settings.json")
    return pathlib.Path(backup.dir)


async def backup_store(ctx: JobContext) -> dict:
    p = ctx.params

    def run() -> dict:
        return backups.store(_root(ctx), p.project_id, p.backup_id, transfers(ctx).receiver(p.transfer_id))

    return await asyncio.to_thread(run)


async def backup_send(ctx: JobContext) -> dict:
    p = ctx.params

    def run() -> dict:
        root = _root(ctx)
        backups._path(root, p.project_id, p.backup_id)  # a bad id fails before the transfer starts
        return backups.send(root, p.project_id, p.backup_id, transfers(ctx).sender(p.transfer_id))

    return await asyncio.to_thread(run)


async def backup_check(ctx: JobContext) -> dict:
    return await asyncio.to_thread(backups.check, _root(ctx), ctx.params.project_id, ctx.params.backup_ids)


async def backup_remove(ctx: JobContext) -> dict:
    return await asyncio.to_thread(backups.remove, _root(ctx), ctx.params.project_id, ctx.params.backup_ids)


HANDLERS: dict[str, Handler] = {
    "backup.store": backup_store,
    "backup.send": backup_send,
    "backup.check": backup_check,
    "backup.remove": backup_remove,
}
