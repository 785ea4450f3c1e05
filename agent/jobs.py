"""Job kinds the agent executes. Each handler gets a `JobContext` and returns a JSON object."""

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from .errors import AgentError

ProgressFn = Callable[[str, int, int, str, str], None]


@dataclass
class JobContext:
    job_id: str
    params: dict
    progress: ProgressFn
    collect_facts: Callable[[], dict]


Handler = Callable[[JobContext], Awaitable[dict]]


async def facts_collect(ctx: JobContext) -> dict:
    """Re-reads the host's facts (tool versions, free disk) and returns them."""
    return await asyncio.to_thread(ctx.collect_facts)


async def diag_wait(ctx: JobContext) -> dict:
    """Waits `seconds`, reporting progress each second: exercises the job path end to end."""
    seconds = ctx.params.get("seconds", 1)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds <= 3600:
        raise AgentError(f"diag.wait: seconds must be a number from 0 to 3600, got {seconds!r}")
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
