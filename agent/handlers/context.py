"""What a job's handler gets: its typed params, a progress callback and what the agent owns."""

import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

from contract.messages import Params

if TYPE_CHECKING:  # a db agent's own (handlers/__init__.py: each role's code is its agents' only)
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
    # A db agent's write guards (tenant.lock, tenant.unlock, tenant.dump) and online syncs
    # (tenant.dump with sync, tenant.sync_*), held as long as it runs; None on other agents.
    guards: "WriteGuards | None" = None
    syncs: "Syncs | None" = None
    # Files to or from the controller (runtime/transfers.py); None where there is no connection.
    transfers: object | None = None


Handler = Callable[[JobContext], Awaitable[dict]]
