"""Jobs any agent runs: its facts, and a wait that exercises the job path end to end."""

from .messages import Params, Result, message


@message
class FactsCollectParams(Params):
    KIND = "facts.collect"


@message
class Facts(Result):
    KIND = "facts.collect"
    hostname: str
    agent_version: str
    # Tool name (pg_dump, psql, docker) to version; absent tools are left out.
    tools: dict[str, str]
    spool_free_bytes: int
    roles: list[str]


MAX_WAIT_S = 3600


@message
class DiagWaitParams(Params):
    KIND = "diag.wait"
    seconds: float = 1
    # Ignored: lets a test try the message size limits with a job of any size.
    pad: str = ""

    def check(self) -> None:
        if not 0 <= self.seconds <= MAX_WAIT_S:
            self.refuse("seconds", f"must be from 0 to {MAX_WAIT_S}")


@message
class DiagWaited(Result):
    KIND = "diag.wait"
    waited_s: float
    pid: int
