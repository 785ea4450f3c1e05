"""Diagnostic jobs: the host's facts, and a wait that exercises the job path end to end."""

import asyncio
import os
import time

from .context import Handler, JobContext


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


HANDLERS: dict[str, Handler] = {
    "facts.collect": facts_collect,
    "diag.wait": diag_wait,
}
