"""Every job kind: its parameters, its result, and whether it is safe to send again.

A kind is safe to send again (`idempotent`) when a new job with the same parameters, sent
after one that failed, can only finish what the first started: the controller re-sends
those after a failure the agent marks retryable, and no other.
"""

from dataclasses import dataclass
from typing import Any

from . import backups, diagnostics, gateways, stacks, tenants
from .messages import ContractError, Params, Result


# The version of the first agents: every kind in it runs on them.
FIRST_VERSION = "0.1.0"


def parse_version(text: str) -> tuple[int, ...] | None:
    """(X, Y, Z) of an agent's version, or None when it cannot tell (an agent run from a source
    tree that was never installed reports `0+source`)."""
    parts = (text or "").split(".")
    if not 1 <= len(parts) <= 4 or not all(part.isascii() and part.isdigit() for part in parts):
        return None
    return tuple(int(part) for part in parts)


def runs_on(kind: "JobKind", agent_version: str) -> bool:
    """Whether an agent of `agent_version` runs `kind` (an agent whose version is unknown is trusted)."""
    have, need = parse_version(agent_version), parse_version(kind.since)
    return have is None or have >= need


@dataclass(frozen=True)
class JobKind:
    name: str
    params: type[Params]
    result: type[Result]
    idempotent: bool
    # Whether the catalog keeps the result once its caller has it (not for what only passes
    # through, like a project's log lines).
    keeps_output: bool = True
    # The first flux-agent version that runs it: an older agent is not sent it.
    since: str = FIRST_VERSION

    def parse_params(self, raw: Any) -> Params:
        return self.params.from_wire(raw)

    def parse_result(self, raw: Any) -> Result:
        return self.result.from_wire(raw)


def _kind(params: type[Params], result: type[Result], idempotent: bool, keeps_output: bool = True) -> JobKind:
    if not params.KIND or params.KIND != result.KIND:
        raise TypeError(f"{params.__name__} and {result.__name__} name different kinds")
    return JobKind(params.KIND, params, result, idempotent, keeps_output)


_ALL = [
    _kind(diagnostics.FactsCollectParams, diagnostics.Facts, True),
    _kind(diagnostics.DiagWaitParams, diagnostics.DiagWaited, True),
    _kind(tenants.TenantCreateParams, tenants.TenantCreated, True),
    _kind(tenants.TenantDropParams, tenants.TenantDropped, True),
    _kind(tenants.TenantMigrationsParams, tenants.TenantLedger, True),
    # One transaction against the ledger: files applied by a first attempt are skipped by the next.
    _kind(tenants.TenantPushParams, tenants.TenantPushed, True),
    # Parts build on each other and on the table the gateway holds: controller/gateways.py
    # decides what to send next (the whole table after a conflict).
    _kind(gateways.GatewaySyncParams, gateways.GatewaySynced, False),
    # Reads only; its lines pass through to whoever asked, like a stack's.
    _kind(gateways.GatewayLogsParams, gateways.GatewayLogs, True, keeps_output=False),
    _kind(stacks.StackProvisionParams, stacks.StackProvisioned, True),
    _kind(stacks.StackObserveParams, stacks.StackObserved, True),
    _kind(stacks.StackStartParams, stacks.StackStarted, True),
    _kind(stacks.StackStopParams, stacks.StackStopped, True),
    _kind(stacks.StackRemoveParams, stacks.StackRemoved, True),
    _kind(stacks.StackFindParams, stacks.StackFound, True),
    # Log lines pass through to whoever asked: the catalog does not keep them.
    _kind(stacks.StackLogsParams, stacks.StackLogs, True, keeps_output=False),
    _kind(stacks.StackProbeParams, stacks.StackProbed, True),
    _kind(stacks.StackBootstrapParams, stacks.StackBootstrapped, True),
    _kind(stacks.StackImageInfoParams, stacks.StackImage, True),
    _kind(stacks.StackPushParams, stacks.StackPushed, True),
    _kind(stacks.StackMigrationsParams, stacks.StackLedger, True),
    _kind(tenants.TenantPreflightParams, tenants.Preflight, True),
    # Taking a guard already held changes nothing.
    _kind(tenants.TenantLockParams, tenants.TenantLocked, True),
    _kind(tenants.TenantUnlockParams, tenants.TenantUnlocked, True),
    # The target is emptied before each restore, and the spool file written anew.
    _kind(tenants.TenantDumpParams, tenants.TenantDumped, True),
    _kind(tenants.TenantCopyParams, tenants.TenantCopied, True),
    _kind(tenants.TenantDumpRemoveParams, tenants.TenantDumpsRemoved, True),
    _kind(tenants.TenantDumpStatParams, tenants.TenantDumpStats, True),
    _kind(tenants.TenantVerifyParams, tenants.TenantVerified, True),
    # Reads, and resumes a sync only where its slot says.
    _kind(tenants.TenantSyncStatusParams, tenants.TenantSyncStatus, True),
    # A drain already done answers again; one that lost its guard is refused.
    _kind(tenants.TenantSyncDrainParams, tenants.TenantSyncDrained, True),
    _kind(tenants.TenantSyncStopParams, tenants.TenantSyncStopped, True),
    # Reads only: a new checkpoint each time.
    _kind(tenants.TenantSyncCheckParams, tenants.TenantSyncChecked, True),
    # Grants back what the freeze recorded; granting twice changes nothing.
    _kind(tenants.TenantThawParams, tenants.TenantThawed, True),
    # A transfer carries each attempt's bytes once: the controller opens a new one to try again.
    _kind(backups.TenantBackupParams, backups.TenantBackupMade, False),
    _kind(backups.StackBackupParams, backups.StackBackupMade, False),
    _kind(backups.BackupStoreParams, backups.BackupStored, False),
    _kind(backups.BackupSendParams, backups.BackupSent, False),
    _kind(backups.BackupCheckParams, backups.BackupChecked, True),
    _kind(backups.BackupRemoveParams, backups.BackupRemoved, True),
    _kind(backups.ScratchVerifyParams, backups.ScratchVerified, False),
    _kind(backups.TenantRestoreParams, backups.TenantRestored, False),
    _kind(backups.StackRestoreParams, backups.StackRestored, False),
    _kind(backups.TenantDumpStreamParams, backups.TenantDumpStreamed, False),
    _kind(backups.StackDumpStreamParams, backups.StackDumpStreamed, False),
]

KINDS: dict[str, JobKind] = {kind.name: kind for kind in _ALL}


def job_kind(name: str) -> JobKind:
    """The kind named `name`; a ContractError for one the contract does not have."""
    kind = KINDS.get(name)
    if kind is None:
        raise ContractError(f"job kind {name!r}" if len(name) <= 64 else "job kind", None, "unknown job kind")
    return kind
