"""gateway.sync: the route table, sent to gateway agents whole or as a delta, in parts; gateway.logs:
the requests a gateway served for a project."""

from .messages import Message, Params, Result, message
from .stacks import MAX_LOG_LINES, LogLine


@message
class Route(Message):
    """How a gateway serves one project."""

    project_id: str
    # The service host and the legacy one.
    hosts: list[str]
    mode: str
    schema: str
    # The role app tokens act as; null for a project created dedicated.
    app_role: str | None
    jwt_secret: str
    # "pool" (the pooled PostgREST, whose address only the gateway knows) or host:port.
    upstream: str
    maintenance: bool


@message
class GatewaySyncParams(Params):
    KIND = "gateway.sync"
    version: int
    # The version the delta applies to; null: the whole table, from empty.
    base_version: int | None
    part: int
    parts: int
    upsert: list[Route]
    # Project ids.
    remove: list[str]

    def check(self) -> None:
        if self.parts < 1:
            self.refuse("parts", "must be at least 1")
        if not 0 <= self.part < self.parts:
            self.refuse("part", "must be from 0 to parts - 1")


@message
class GatewaySynced(Result):
    """One part received. A part before the last says `version`, `received_parts` and `parts`; the
    last part (or one of a version older than the table held, `stale`) says `applied_version`,
    the table in force, and `routes`."""

    KIND = "gateway.sync"
    applied_version: int | None = None
    routes: int | None = None
    stale: bool = False
    caddy_reloaded: bool = False
    version: int | None = None
    received_parts: int | None = None
    parts: int | None = None


# gateway.logs


@message
class GatewayLogsParams(Params):
    """Requests the gateway served for these hosts (one project's): the last `tail`, or those after `since`."""

    KIND = "gateway.logs"
    hosts: list[str]
    tail: int = 100
    # A timestamp this gateway gave a line before (ISO 8601, microseconds): only later lines.
    since: str | None = None

    def check(self) -> None:
        if not self.hosts or len(self.hosts) > 16:
            self.refuse("hosts", "must name 1 to 16 hosts")
        if not 1 <= self.tail <= MAX_LOG_LINES:
            self.refuse("tail", f"must be between 1 and {MAX_LOG_LINES}")


@message
class GatewayLogs(Result):
    KIND = "gateway.logs"
    lines: list[LogLine]
    # Where the next call takes up (its since): the last line's time, or this host's time now.
    until: str
