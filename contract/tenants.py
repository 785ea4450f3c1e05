"""Jobs on a pooled tenant (db agents): its schema and roles on the shared cluster, pushes, and
the steps of a migration's source side (preflight, write guard, dump, verify)."""

from .ledger import Ledger, MigrationFile, Pushed
from .messages import Message, Params, Result, message


@message
class TenantRef(Params):
    """The tenant a job is about: its project's id and short id (the id's first 12 hex digits)."""

    project_id: str
    short_id: str


# tenant.create


@message
class TenantCreateParams(TenantRef):
    KIND = "tenant.create"


@message
class TenantCreated(Result):
    KIND = "tenant.create"
    schema: str
    runtime_role: str
    owner_role: str
    # "role <name>" and "schema <name>" to ok or changed.
    steps: dict[str, str]


# tenant.drop


@message
class TenantDropParams(TenantRef):
    KIND = "tenant.drop"


@message
class TenantDropped(Result):
    KIND = "tenant.drop"
    schema_dropped: bool
    roles_dropped: list[str]
    dumps_removed: int


# tenant.migrations


@message
class TenantMigrationsParams(TenantRef):
    KIND = "tenant.migrations"


@message
class TenantLedger(Ledger):
    KIND = "tenant.migrations"


# tenant.push


@message
class TenantPushParams(TenantRef):
    KIND = "tenant.push"
    files: list[MigrationFile]
    dry_run: bool


@message
class TenantPushed(Pushed):
    KIND = "tenant.push"


# tenant.preflight


@message
class PreflightTable(Message):
    name: str
    rows: int
    bytes: int
    rls: bool


@message
class PreflightSequence(Message):
    name: str
    # Null for a sequence never used.
    last_value: int | None


@message
class PreflightLedgerRow(Message):
    version: str
    filename: str
    checksum: str


@message
class LargeObjects(Message):
    owners: list[str]
    count: int


@message
class PgTools(Message):
    """Versions of the PostgreSQL client tools on the db agent's host; null when absent."""

    pg_dump: str | None
    psql: str | None


@message
class LogicalReplication(Message):
    """What an online migrate needs of the shared cluster and of the tenant's tables."""

    wal_level: str
    max_slots: int
    free_slots: int
    max_senders: int
    free_senders: int
    # -1: a slot may keep any amount of WAL.
    max_slot_wal_keep_mb: int
    # Tables whose updates and deletes could not be published (no primary key, replica identity default).
    tables_without_key: list[str]


@message
class TenantPreflightParams(TenantRef):
    KIND = "tenant.preflight"


@message
class Preflight(Result):
    KIND = "tenant.preflight"
    schema: str
    tables: list[PreflightTable]
    views: list[str]
    sequences: list[PreflightSequence]
    extensions: list[str]
    ledger: list[PreflightLedgerRow]
    policy_roles: list[str]
    roles: list[str]
    large_objects: LargeObjects
    total_bytes: int
    tools: PgTools
    spool_free_bytes: int
    logical: LogicalReplication | None = None


# tenant.lock


@message
class TenantLockParams(TenantRef):
    KIND = "tenant.lock"
    # Hold writes on this (the dedicated) database instead of the pooled copy: a rollback's pause.
    target_url: str | None = None


@message
class TenantLocked(Result):
    KIND = "tenant.lock"
    locked: bool
    # False when the guard was already held; `tables` is given when it was taken now.
    changed: bool
    tables: int | None = None


# tenant.unlock


@message
class TenantUnlockParams(TenantRef):
    KIND = "tenant.unlock"
    # After cutover: the pooled copy turns read-only for every tenant role.
    revoke_writes: bool
    # Release the guard held on this (the dedicated) database instead.
    target_url: str | None = None

    def check(self) -> None:
        if self.target_url is not None and self.revoke_writes:
            self.refuse("revoke_writes", "applies to the pooled copy, not with target_url")


@message
class TenantUnlocked(Result):
    KIND = "tenant.unlock"
    locked: bool
    held: bool
    source_read_only: bool
    # With revoke_writes: the copy is frozen, and its size in bytes.
    frozen: bool | None = None
    bytes: int | None = None


# tenant.dump


@message
class TenantDumpParams(TenantRef):
    KIND = "tenant.dump"
    expected_bytes: int
    table_count: int
    # The dump file's data key (base64 of 32 bytes), kept sealed in the controller's catalog;
    # the agent holds it in memory only, while it writes the file encrypted.
    dump_key: str
    # The dump file's name in the spool; the tenant schema's name by default.
    name: str | None = None
    # Restores into this database as the dump streams; none keeps the dump in the spool only.
    target_url: str | None = None
    # The target server's major version: required with target_url.
    target_major: int | None = None
    # Refuse to dump unless the write guard (tenant.lock) is held on this agent.
    require_guard: bool = False
    # Online: dump from the snapshot of a new logical slot, then keep applying the tenant's
    # changes to target_url (tenant.sync_*) until the cutover drains them.
    sync: bool = False
    # A sync further behind the shared cluster than this stops and drops its slot.
    max_lag_bytes: int | None = None
    # The tenant is the kept read-only copy of a migrated project (its owner logs in no more): the
    # agent reads it as its own role, and refuses unless it is that copy.
    frozen_copy: bool = False

    def check(self) -> None:
        if self.target_url is not None and self.target_major is None:
            self.refuse("target_major", "required with target_url")
        if self.frozen_copy and (self.target_url is not None or self.sync):
            self.refuse("frozen_copy", "a kept copy is only dumped to a file")
        if self.sync and (self.target_url is None or self.require_guard):
            self.refuse("sync", "needs target_url, and no write guard")
        for key in ("expected_bytes", "table_count"):
            if getattr(self, key) < 0:
                self.refuse(key, "must not be negative")


@message
class TenantDumped(Result):
    KIND = "tenant.dump"
    path: str
    # Of the file as stored (encrypted): checkable without the key.
    bytes: int
    sha256: str
    # Of the SQL in it.
    sql_bytes: int
    sql_sha256: str
    tables: int
    restored: bool
    ledger_rows: int
    seconds: float
    # With sync: the slot's consistent point, where the stream takes over from the copy.
    sync_lsn: str | None = None


# tenant.copy


@message
class TenantCopyParams(TenantRef):
    """The tenant into a dedicated database by the parallel copy, with no dump file."""
    KIND = "tenant.copy"
    target_url: str
    expected_bytes: int
    # Refuse to copy unless the write guard (tenant.lock) is held on this agent.
    require_guard: bool = False

    def check(self) -> None:
        if self.expected_bytes < 0:
            self.refuse("expected_bytes", "must not be negative")


@message
class TenantCopied(Result):
    KIND = "tenant.copy"
    tables: int
    rows: int
    # Of the rows as they went over the wire.
    bytes: int
    ledger_rows: int
    seconds: float
    # Seconds of each phase: schema, data, post_data, total.
    phases: dict[str, float]


# tenant.verify


@message
class TenantVerifyParams(TenantRef):
    KIND = "tenant.verify"
    target_url: str


@message
class TenantVerified(Result):
    KIND = "tenant.verify"
    # Rows per table, the same on both sides.
    tables: dict[str, int]
    sequences: int
    ledger_rows: int
    ok: bool


# tenant.dump_remove


@message
class TenantDumpRemoveParams(TenantRef):
    KIND = "tenant.dump_remove"
    # Dump files of this tenant (paths in its dump directory on the agent); anything else is refused.
    paths: list[str]


@message
class TenantDumpsRemoved(Result):
    KIND = "tenant.dump_remove"
    removed: list[str]
    # Named files that were already gone.
    missing: list[str]


# tenant.dump_stat


@message
class TenantDumpStatParams(TenantRef):
    KIND = "tenant.dump_stat"
    # Dump files of this tenant (paths in its dump directory on the agent); anything else is refused.
    paths: list[str]


@message
class DumpFileStat(Message):
    path: str
    exists: bool
    # Null when the file is not there.
    bytes: int | None


@message
class TenantDumpStats(Result):
    KIND = "tenant.dump_stat"
    files: list[DumpFileStat]


# tenant.sync_status, tenant.sync_drain, tenant.sync_stop: the online sync a dump with `sync` began

DIRECTIONS = ("forward", "back")


def check_direction(params) -> None:
    if params.direction not in DIRECTIONS:
        params.refuse("direction", f"must be one of {', '.join(DIRECTIONS)}")
    if params.direction == "back" and not params.target_url:
        params.refuse("target_url", "required with direction back: the stack's database is the source")


@message
class TenantSyncStatusParams(TenantRef):
    KIND = "tenant.sync_status"
    # forward: pooled copy to the stack; back: the stack to the kept pooled copy (after cutover).
    direction: str = "forward"
    # When given and the slot exists but nothing applies it here (the agent restarted), the
    # sync resumes from the slot.
    target_url: str | None = None
    max_lag_bytes: int | None = None

    def check(self) -> None:
        check_direction(self)


@message
class TenantSyncStatus(Result):
    KIND = "tenant.sync_status"
    slot: bool
    running: bool
    # Why the sync stopped on its own (its slot is dropped then).
    error: str | None = None
    applied_lsn: str | None = None
    source_lsn: str | None = None
    lag_bytes: int | None = None
    lag_s: float | None = None
    transactions: int = 0
    changes: int = 0
    stopped_at: str | None = None


@message
class TenantSyncDrainParams(TenantRef):
    KIND = "tenant.sync_drain"
    target_url: str
    timeout_s: float
    direction: str = "forward"
    # Forward only: once drained, a slot on the stack starts recording its changes for the way back.
    reverse: bool = False

    def check(self) -> None:
        check_direction(self)
        if self.reverse and self.direction != "forward":
            self.refuse("reverse", "only with direction forward")
        if not 0 < self.timeout_s <= 3600:
            self.refuse("timeout_s", "must be between 0 and 3600")


@message
class TenantSyncDrained(Result):
    KIND = "tenant.sync_drain"
    # With reverse: whether the slot for the way back exists, or why not.
    reverse: bool | None = None
    reverse_error: str | None = None
    # The source's LSN at the pause: the target has every transaction committed before it.
    lsn: str
    applied_lsn: str | None
    waited_s: float
    sequences: int


@message
class TenantSyncStopParams(TenantRef):
    KIND = "tenant.sync_stop"
    direction: str = "forward"
    # Forgets the sync's position there too.
    target_url: str | None = None

    def check(self) -> None:
        check_direction(self)


@message
class TenantSyncStopped(Result):
    KIND = "tenant.sync_stop"
    slot_dropped: bool
    publication_dropped: bool
    error: str | None = None


@message
class TenantSyncCheckParams(TenantRef):
    KIND = "tenant.sync_check"
    # How long the sync may take to reach the checkpoint (the checksums take what they take).
    timeout_s: float
    # forward: the shared cluster against the stack; back (after an online cutover): the stack,
    # at target_url, against the kept pooled copy that follows it.
    direction: str = "forward"
    target_url: str | None = None

    def check(self) -> None:
        if not 0 < self.timeout_s <= 3600:
            self.refuse("timeout_s", "must be between 0 and 3600")
        check_direction(self)


@message
class TenantSyncChecked(Result):
    KIND = "tenant.sync_check"
    # Every table matched, rows and checksum, with the source as of this LSN (forward; back, what
    # differed is listed in problems instead).
    lsn: str
    tables: dict[str, int]
    seconds: float
    problems: list[str] | None = None


@message
class TenantThawParams(TenantRef):
    KIND = "tenant.thaw"


@message
class TenantThawed(Result):
    KIND = "tenant.thaw"
    thawed: bool
    grants: int
