"""Jobs on backups: made next to the data (db agents for a pooled tenant, docker agents for a
dedicated stack), kept on backup agents, checked and restored on docker agents."""

from .messages import Message, Params, Result, message
from .stacks import StackWithSecrets
from .tenants import TenantRef


@message
class TableFacts(Message):
    rows: int
    checksum: str
    bytes: int


@message
class LedgerRow(Message):
    version: str
    filename: str
    checksum: str
    applied_at: str | None


@message
class Manifest(Message):
    """What a restore of the backup must give back (agent/adapters/backups.py)."""

    schema: str
    owner: str
    tables: dict[str, TableFacts]
    sequences: dict[str, int | None]
    ledger: list[LedgerRow]
    roles: list[str]
    server_version: str


@message
class BackupMade(Result):
    # The file as stored (encrypted): what the backup host must hold.
    bytes: int
    sha256: str
    # The pg_dump archive inside it: what a download gives.
    archive_bytes: int
    archive_sha256: str
    manifest: Manifest
    seconds: float


def _check_key(params) -> None:
    if len(params.backup_key) != 44:
        params.refuse("backup_key", "must be the base64 of 32 bytes")


# tenant.backup / stack.backup


@message
class TenantBackupParams(TenantRef):
    KIND = "tenant.backup"
    transfer_id: str
    # The project's backup key (base64 of 32 bytes), sealed in the catalog; held in memory only.
    backup_key: str

    def check(self) -> None:
        _check_key(self)


@message
class TenantBackupMade(BackupMade):
    KIND = "tenant.backup"


@message
class StackBackupParams(StackWithSecrets):
    KIND = "stack.backup"
    transfer_id: str
    backup_key: str

    def check(self) -> None:
        super().check()
        _check_key(self)


@message
class StackBackupMade(BackupMade):
    KIND = "stack.backup"


# backup.store / backup.send / backup.check / backup.remove (backup agents)


@message
class BackupStoreParams(Params):
    KIND = "backup.store"
    project_id: str
    backup_id: str
    transfer_id: str


@message
class BackupStored(Result):
    KIND = "backup.store"
    path: str
    bytes: int
    sha256: str


@message
class BackupSendParams(Params):
    KIND = "backup.send"
    project_id: str
    backup_id: str
    transfer_id: str


@message
class BackupSent(Result):
    KIND = "backup.send"
    bytes: int
    sha256: str


@message
class BackupCheckParams(Params):
    KIND = "backup.check"
    project_id: str
    backup_ids: list[str]


@message
class BackupFile(Message):
    backup_id: str
    exists: bool
    bytes: int
    sha256: str


@message
class BackupChecked(Result):
    KIND = "backup.check"
    files: list[BackupFile]


@message
class BackupRemoveParams(Params):
    KIND = "backup.remove"
    project_id: str
    backup_ids: list[str]


@message
class BackupRemoved(Result):
    KIND = "backup.remove"
    removed: list[str]
    missing: list[str]


# scratch.verify (docker agents)


@message
class ScratchVerifyParams(Params):
    KIND = "scratch.verify"
    backup_id: str
    transfer_id: str
    backup_key: str
    manifest: Manifest

    def check(self) -> None:
        _check_key(self)


@message
class Restored(Result):
    # What differs from the manifest, in words: empty when the restore gave it all back.
    problems: list[str]
    tables: int
    rows: int
    archive_bytes: int
    seconds: float


@message
class ScratchVerified(Restored):
    KIND = "scratch.verify"


# tenant.restore / stack.restore


@message
class TenantRestoreParams(TenantRef):
    KIND = "tenant.restore"
    transfer_id: str
    backup_key: str
    manifest: Manifest

    def check(self) -> None:
        _check_key(self)
        if self.manifest.schema != f"t_{self.short_id}_api":
            self.refuse("manifest", "a pooled tenant is restored from a backup of its own schema only")


@message
class TenantRestored(Restored):
    KIND = "tenant.restore"


@message
class StackRestoreParams(StackWithSecrets):
    KIND = "stack.restore"
    transfer_id: str
    backup_key: str
    manifest: Manifest
    # Old name to new: the backup's schema and roles as this project names them (another project's backup).
    renames: dict[str, str]

    def check(self) -> None:
        super().check()
        _check_key(self)


@message
class StackRestored(Restored):
    KIND = "stack.restore"


# tenant.dump_stream / stack.dump_stream


@message
class DumpFlags(Message):
    schema_only: bool = False
    data_only: bool = False
    clean: bool = False
    # A dedicated database: its API schema only (a pooled tenant's dump is its schema anyway).
    api_schema_only: bool = False

    def check(self) -> None:
        if self.schema_only and self.data_only:
            self.refuse("schema_only", "schema_only and data_only exclude each other")


@message
class DumpStreamed(Result):
    bytes: int
    seconds: float


@message
class TenantDumpStreamParams(TenantRef):
    KIND = "tenant.dump_stream"
    transfer_id: str
    flags: DumpFlags


@message
class TenantDumpStreamed(DumpStreamed):
    KIND = "tenant.dump_stream"


@message
class StackDumpStreamParams(StackWithSecrets):
    KIND = "stack.dump_stream"
    transfer_id: str
    flags: DumpFlags


@message
class StackDumpStreamed(DumpStreamed):
    KIND = "stack.dump_stream"
