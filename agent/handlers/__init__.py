"""Job kinds the agent executes, one module per role. `run` checks a job's params against the
contract and hands them, typed, to the kind's handler in a `JobContext`; the handler returns its
result as a JSON object, which `run` checks against the contract before it is sent.

A role's module is imported when an agent of that role starts (`load`), or the first time a job
of its kinds runs: an agent holds only its own roles' code, so a db agent never loads the
Docker SDK, nor a gateway agent that or the tenants' SQL.
"""

import importlib
from typing import Any

from contract.failures import FailureKind
from contract.jobs import KINDS
from contract.messages import ContractError, Result

from ..errors import AgentError
from .context import Handler, JobContext

# The module (of this package) that runs each family of job kinds, by the kind's prefix.
MODULES = {"facts": "diag", "diag": "diag", "tenant": "db", "stack": "docker", "scratch": "docker",
           "backup": "backup", "gateway": "gateway"}
# The modules an agent of each role needs from its start.
ROLE_MODULES = {"db": ("db",), "docker": ("docker",), "gateway": ("gateway",), "backup": ("backup",)}


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def load(roles: list[str]) -> None:
    """Imports the modules of `roles`' jobs (and of the jobs every agent runs), so that one that
    cannot load stops the agent at its start rather than failing its first job."""
    for name in ("diag", *(m for role in roles for m in ROLE_MODULES.get(role, ()))):
        _module(name)


def handler(kind: str) -> Handler | None:
    module = MODULES.get(kind.partition(".")[0])
    return None if module is None else _module(module).HANDLERS.get(kind)


def every_handler() -> dict[str, Handler]:
    """Every kind's handler, from all the modules (loads them all)."""
    return {kind: found for name in sorted(set(MODULES.values())) for kind, found in _module(name).HANDLERS.items()}


async def run(kind: str, params: Any, **context) -> Result:
    """Runs a job of `kind` with its params as sent; `context` fills the rest of its JobContext.

    Params off the contract are an `invalid` failure naming the key; a result off it (a bug
    here) an `internal` one, never sent as it is.
    """
    spec, found = KINDS.get(kind), handler(kind)
    if spec is None or found is None:
        raise AgentError(f"this agent does not know job kind {kind!r}", kind=FailureKind.INVALID)
    try:
        typed = spec.parse_params(params)
    except ContractError as exc:
        raise AgentError(str(exc), kind=FailureKind.INVALID) from None
    output = await found(JobContext(params=typed, **context))
    try:
        return spec.parse_result(output)
    except ContractError as exc:
        raise AgentError(f"this agent's result does not match the contract: {exc}") from None
