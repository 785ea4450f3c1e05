"""Jobs on a dedicated stack (docker agents): a project's own Postgres and PostgREST containers."""

from .ledger import Ledger, MigrationFile, Pushed
from .messages import Message, Params, Result, message, wire_field


# The API container's settings Flux sets itself; an owner chooses any other PGRST_* one.
MANAGED_API_ENV = frozenset({"PGRST_DB_URI", "PGRST_DB_SCHEMAS", "PGRST_DB_ANON_ROLE", "PGRST_JWT_SECRET",
                             "PGRST_SERVER_HOST", "PGRST_SERVER_PORT"})
_SETTING_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


def api_setting(key: str) -> bool:
    """Whether `key` names a PostgREST setting: PGRST_ then 1 to 60 capitals, digits or _."""
    return key.startswith("PGRST_") and 0 < len(key) - 6 <= 60 and set(key[6:]) <= _SETTING_CHARS


@message
class StackRef(Params):
    """The stack a job is about; enough to find, stop or remove its objects."""

    project_id: str
    slug: str
    hash: str
    # `api` for a project created dedicated; a migrated one keeps its tenant schema.
    api_schema: str
    # A migrated project's runtime role (its app tokens act as it); null for one created dedicated.
    app_role: str | None


@message
class StackWithSecrets(StackRef):
    """A stack with what it takes to run it: its secrets and the ports it keeps (null: pick free ones)."""

    jwt_secret: str
    postgres_password: str
    authenticator_password: str
    api_port: int | None
    db_port: int | None
    # PostgREST settings the owner chose (PGRST_* keys Flux does not set); null leaves the API's as
    # they are.
    api_env: dict[str, str] | None = None

    def check(self) -> None:
        for key in self.api_env or {}:
            if not api_setting(key) or key in MANAGED_API_ENV:
                self.refuse("api_env", f"{key[:80]!r} is not a PostgREST setting an owner may choose")


# stack.provision


@message
class StackProvisionParams(StackWithSecrets):
    KIND = "stack.provision"
    # A new stack a migration is about to fill: its Postgres starts in bulk-load mode (no WAL for
    # the copy's rows) until stack.bootstrap starts it again with its usual settings.
    bulk_load: bool = False


@message
class StackProvisioned(Result):
    KIND = "stack.provision"
    # Step name to ok or changed.
    steps: dict[str, str]
    changed: bool
    api_upstream: str
    api_port: int
    db_host: str
    db_port: int


# stack.observe


@message
class StackObserveParams(StackRef):
    KIND = "stack.observe"


@message
class StackObserved(Result):
    KIND = "stack.observe"
    # Running, Stopped, Partial, Missing or Drift.
    state: str
    # Container name to its Docker status, or missing.
    containers: dict[str, str]
    foreign: list[str]


# stack.start


@message
class StackStartParams(StackWithSecrets):
    KIND = "stack.start"


@message
class StackStarted(Result):
    KIND = "stack.start"
    api_upstream: str


# stack.stop


@message
class StackStopParams(StackRef):
    KIND = "stack.stop"


@message
class StackStopped(Result):
    KIND = "stack.stop"
    stopped: list[str]


# stack.remove


@message
class StackRemoveParams(StackRef):
    KIND = "stack.remove"


@message
class StackRemoved(Result):
    KIND = "stack.remove"
    removed: list[str]


# stack.find


@message
class StackFindParams(Params):
    """Every Docker object on the engine labelled with a project hash (a project missing from the
    catalog leaves them behind: `flux nuke --force` finds and removes them)."""
    KIND = "stack.find"
    hash: str

    def check(self) -> None:
        if not (len(self.hash) == 7 and all(c in "0123456789abcdef" for c in self.hash)):
            self.refuse("hash", "expected 7 lower-case hex characters")


@message
class FoundStack(Message):
    project_id: str
    slug: str
    # "container NAME", "volume NAME", "network NAME"
    objects: list[str]


@message
class StackFound(Result):
    KIND = "stack.find"
    stacks: list[FoundStack]


# stack.logs


@message
class StackLogsParams(StackRef):
    """Lines one of the stack's containers wrote: the last `tail`, or those after `since`."""
    KIND = "stack.logs"
    service: str
    tail: int = 100
    # A timestamp the engine gave a line before (RFC 3339, nanoseconds): only later lines.
    since: str | None = None

    def check(self) -> None:
        if self.service not in ("api", "db"):
            self.refuse("service", "must be api or db")
        if not 1 <= self.tail <= MAX_LOG_LINES:
            self.refuse("tail", f"must be between 1 and {MAX_LOG_LINES}")


MAX_LOG_LINES = 2000


@message
class LogLine(Message):
    at: str
    line: str


@message
class StackLogs(Result):
    KIND = "stack.logs"
    lines: list[LogLine]
    # Whether the container runs (a stopped one's last lines are still there).
    running: bool
    # Where the next call takes up (its since): the last line's timestamp, or the engine host's time.
    until: str


# stack.probe


@message
class StackProbeParams(StackWithSecrets):
    KIND = "stack.probe"


@message
class StackProbed(Result):
    KIND = "stack.probe"
    status: int


# stack.bootstrap


@message
class StackBootstrapParams(StackWithSecrets):
    KIND = "stack.bootstrap"


@message
class StackBootstrapped(Result):
    KIND = "stack.bootstrap"
    # ok or changed
    role_bootstrap: str = wire_field("role bootstrap")
    # Seconds the stack's Postgres took to leave bulk-load mode (restarted with its usual
    # settings); null when it was not in it.
    restarted_s: float | None = None


# stack.image_info


@message
class StackImageInfoParams(Params):
    KIND = "stack.image_info"


@message
class StackImage(Result):
    KIND = "stack.image_info"
    postgres_major: int
    postgres_image: str
    postgrest_image: str


# stack.push


@message
class StackPushParams(StackWithSecrets):
    KIND = "stack.push"
    files: list[MigrationFile]
    dry_run: bool


@message
class StackPushed(Pushed):
    KIND = "stack.push"


# stack.migrations


@message
class StackMigrationsParams(StackWithSecrets):
    KIND = "stack.migrations"


@message
class StackLedger(Ledger):
    KIND = "stack.migrations"
