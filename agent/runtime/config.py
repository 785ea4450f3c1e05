"""The agent's state directory.

    agent.json        name, roles, controller address and TLS name
    key.pem           the agent's private key (0600)
    cert.pem, ca.pem  its certificate and the fleet CA it trusts
    spool/            job records, kept until the controller acknowledges them
"""

import json
import os
import pathlib
from dataclasses import asdict, dataclass, field

from ..errors import AgentError

CONFIG_FILE = "agent.json"


@dataclass(frozen=True)
class AgentConfig:
    name: str
    roles: list[str]
    controller: str
    server_name: str
    # Every controller's address as the last one connected to told it (the leader first tried).
    controllers: list[str] = field(default_factory=list)


class StateDir:
    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path).expanduser().resolve()
        self.spool = self.path / "spool"

    def file(self, name: str) -> pathlib.Path:
        return self.path / name

    def enrolled(self) -> bool:
        return self.file(CONFIG_FILE).exists() and self.file("cert.pem").exists()

    def read(self, name: str) -> bytes:
        try:
            return self.file(name).read_bytes()
        except FileNotFoundError:
            raise AgentError(
                f"{self.file(name)} is missing; enroll first with `flux-agent enroll --state-dir {self.path} ...`"
            ) from None

    def write(self, name: str, data: bytes, *, secret: bool = False) -> None:
        write_atomic(self.file(name), data, secret=secret)

    def load(self) -> AgentConfig:
        raw = json.loads(self.read(CONFIG_FILE))
        return AgentConfig(**{k: raw[k] for k in ("name", "roles", "controller", "server_name")},
                           controllers=list(raw.get("controllers", [])))

    def save(self, config: AgentConfig) -> None:
        self.write(CONFIG_FILE, (json.dumps(asdict(config), indent=2) + "\n").encode())


def write_atomic(target: pathlib.Path, data: bytes, *, secret: bool = False) -> None:
    """Writes a file so that a crash leaves either the old or the new content."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: what was written of it holds room the disk lacks
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
