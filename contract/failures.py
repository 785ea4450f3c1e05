"""What kind of failure a job (or a refused connection) had: the controller answers by kind,
never by the text of a message."""

import enum

# The prefix of every value of the proto enum `FailureKind` (proto/fleet.proto).
_PROTO_PREFIX = "FAILURE_KIND_"


class FailureKind(enum.Enum):
    # The controller refuses this agent for good.
    REVOKED = "revoked"
    NOT_FOUND = "not_found"
    # The request clashes with the state found (a checksum conflict, routes out of order).
    CONFLICT = "conflict"
    # Something did not finish or answer within its time limit.
    TIMEOUT = "timeout"
    # A dependency (the shared cluster, the Docker engine, Caddy) cannot be reached right now.
    UNAVAILABLE = "unavailable"
    # The request itself is wrong: parameters, a migration file, a name.
    INVALID = "invalid"
    # Anything else, including a bug.
    INTERNAL = "internal"
    # Docker objects under a project's names belong to another project; they were left alone.
    FOREIGN = "foreign"

    @property
    def proto_name(self) -> str:
        """The name of this kind's value in the proto enum."""
        return _PROTO_PREFIX + self.name

    @classmethod
    def from_proto_name(cls, name: str) -> "FailureKind":
        """The kind of a proto enum value's name; `internal` for one this side does not know
        (unspecified, or added by a newer peer)."""
        member = cls.__members__.get(name.removeprefix(_PROTO_PREFIX)) if name.startswith(_PROTO_PREFIX) else None
        return member or cls.INTERNAL

    @classmethod
    def parse(cls, value: str | None) -> "FailureKind":
        """The kind stored as `value` (its `.value`); `internal` for none or one not known."""
        try:
            return cls(value)
        except ValueError:
            return cls.INTERNAL
