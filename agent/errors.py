"""The agent's one root error type."""

from contract.failures import FailureKind


class AgentError(Exception):
    """`kind` tells the controller what kind of failure this is (contract/failures.py);
    `retryable` says whether the same job, sent again, can succeed."""

    kind = FailureKind.INTERNAL

    def __init__(self, message: str, *, retryable: bool = False, kind: FailureKind | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        if kind is not None:
            self.kind = kind


class Revoked(AgentError):
    """The controller refuses this agent for good; retrying cannot help."""

    kind = FailureKind.REVOKED
