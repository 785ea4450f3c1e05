"""Job kinds the agent executes, one module per role. `run` checks a job's params against the
contract and hands them, typed, to the kind's handler in a `JobContext`; the handler returns its
result as a JSON object, which `run` checks against the contract before it is sent."""

from typing import Any

from contract.failures import FailureKind
from contract.jobs import KINDS
from contract.messages import ContractError, Result

from ..errors import AgentError
from . import backup, db, diag, docker, gateway
from .context import Handler, JobContext

HANDLERS: dict[str, Handler] = {**backup.HANDLERS, **diag.HANDLERS, **db.HANDLERS, **docker.HANDLERS, **gateway.HANDLERS}


async def run(kind: str, params: Any, **context) -> Result:
    """Runs a job of `kind` with its params as sent; `context` fills the rest of its JobContext.

    Params off the contract are an `invalid` failure naming the key; a result off it (a bug
    here) an `internal` one, never sent as it is.
    """
    spec, handler = KINDS.get(kind), HANDLERS.get(kind)
    if spec is None or handler is None:
        raise AgentError(f"this agent does not know job kind {kind!r}", kind=FailureKind.INVALID)
    try:
        typed = spec.parse_params(params)
    except ContractError as exc:
        raise AgentError(str(exc), kind=FailureKind.INVALID) from None
    output = await handler(JobContext(params=typed, **context))
    try:
        return spec.parse_result(output)
    except ContractError as exc:
        raise AgentError(f"this agent's result does not match the contract: {exc}") from None
