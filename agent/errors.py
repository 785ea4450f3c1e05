"""The agent's one root error type."""


class AgentError(Exception):
    """`code` tells the controller what kind of failure this is: invalid, conflict,
    not_found, unavailable, foreign (a Docker object under the project's name belongs to
    another project), or empty."""

    code = ""

    def __init__(self, message: str, *, retryable: bool = False, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        if code is not None:
            self.code = code


class Revoked(AgentError):
    """The controller refuses this agent for good; retrying cannot help."""
