"""Jobs of a gateway agent: the route table it serves."""

import asyncio

from ..errors import AgentError
from .context import Handler, JobContext


async def gateway_sync(ctx: JobContext) -> dict:
    if ctx.gateway is None:
        raise AgentError("this agent has no gateway role configured (settings.json: gateway)")
    p = ctx.params
    return await ctx.gateway.sync(p.version, p.base_version, p.part, p.parts, [r.to_wire() for r in p.upsert],
                                  p.remove)


async def gateway_logs(ctx: JobContext) -> dict:
    if ctx.gateway is None:
        raise AgentError("this agent has no gateway role configured (settings.json: gateway)")
    p = ctx.params
    return await asyncio.to_thread(ctx.gateway.access_lines, p.hosts, p.tail, p.since)


HANDLERS: dict[str, Handler] = {
    "gateway.sync": gateway_sync,
    "gateway.logs": gateway_logs,
}
