"""The controller's one root error type and its kinds.

Each error carries what a person needs to act on it and whether retrying can help;
the HTTP layer maps `status` to the response code and `message` to `{"error": ...}`.
"""


class FluxError(Exception):
    status = 500
    retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class BadRequest(FluxError):
    status = 400


class Unauthorized(FluxError):
    status = 401

    def __init__(self, message: str = "Unauthorized"):
        super().__init__(message)


class Forbidden(FluxError):
    status = 403


class NotFound(FluxError):
    status = 404


class Conflict(FluxError):
    status = 409


class TooLarge(FluxError):
    """Something to send is over a size limit; sending it again cannot help."""

    status = 413


class NotImplementedHere(FluxError):
    """A route of the hosted service that a self-hosted fleet has no meaning for."""

    status = 501


class Unavailable(FluxError):
    """A dependency (an agent, the catalog) cannot be reached right now."""

    status = 503
    retryable = True


class Timeout(Unavailable):
    """Something did not finish or answer within its time limit."""

    status = 504


class Revoked(Conflict):
    """The agent is revoked: it takes no more jobs."""
