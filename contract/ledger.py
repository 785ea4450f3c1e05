"""Messages of the migration ledger, the same on both engines: files to push, what a push did,
and the rows of `flux.flux_migrations`."""

from .messages import Message, Result, message, wire_field


@message
class MigrationFile(Message):
    filename: str
    sql: str
    # The agent takes the file name's prefix up to the first `_` when none is given.
    version: str | None = None
    # SHA-256 of `sql`; the agent refuses a file whose content does not match it.
    checksum: str | None = None


@message
class LedgerEntry(Message):
    version: str
    filename: str
    checksum: str
    applied_at: str = wire_field("appliedAt")


@message
class Ledger(Result):
    applied: list[LedgerEntry]


@message
class Pushed(Result):
    """Files applied now and files the ledger already had; a dry run applies nothing."""

    applied: list[str]
    skipped: list[str]
    tables_moved: int = wire_field("tablesMoved")
    sequences_moved: int = wire_field("sequencesMoved")
    views_moved: int = wire_field("viewsMoved")
    dry_run: bool = wire_field("dryRun")
