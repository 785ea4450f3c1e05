"""The agent's one root error type."""


class AgentError(Exception):
    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


class Revoked(AgentError):
    """The controller refuses this agent for good; retrying cannot help."""
