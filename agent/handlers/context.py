"""What a job's handler gets: its typed params, a progress callback and what the agent owns."""

import pathlib
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from contract.messages import Params

from ..adapters.changes import Syncs
from ..adapters.guards import WriteGuards

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
    # The write guards this agent holds (tenant.lock, tenant.unlock, tenant.dump).
    guards: WriteGuards = field(default_factory=WriteGuards)
    # The online syncs this agent runs (tenant.dump with sync, tenant.sync_*).
    syncs: Syncs = field(default_factory=Syncs)
    # Files to or from the controller (runtime/transfers.py); None where there is no connection.
    transfers: object | None = None


Handler = Callable[[JobContext], Awaitable[dict]]
