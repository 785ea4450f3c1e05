"""The controller's state directory: what `init` writes and `run` reads.

    controller.json   catalog URL, base domain, dump retention (0600: the URL may hold a password)
    ca.pem, ca.key    the fleet CA
    server.pem/.key   the controller's TLS certificate for agents
    master.key        the key that seals secrets at rest
"""

import json
import os
import pathlib
from dataclasses import dataclass

from .errors import FluxError

CONFIG_FILE = "controller.json"
DEFAULT_DUMP_RETENTION_DAYS = 7.0
MAX_DUMP_RETENTION_DAYS = 3650.0


class ConfigError(FluxError):
    pass


@dataclass(frozen=True)
class ControllerConfig:
    catalog_url: str
    base_domain: str
    # Dump files a migrate writes are removed this many days after they were written.
    dump_retention_days: float = DEFAULT_DUMP_RETENTION_DAYS
    # The backup gate (a real migrate, a delete) also wants the newest verified backup younger
    # than this; None: newer than the project's last push is enough.
    backup_max_age_hours: float | None = None


def check_dump_retention(days) -> float:
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 < days <= MAX_DUMP_RETENTION_DAYS:
        raise ConfigError(f"dump retention must be a number of days above 0 and at most "
                          f"{MAX_DUMP_RETENTION_DAYS:g}, got {days!r}")
    return float(days)


def check_backup_max_age(hours) -> float | None:
    if hours is None or hours == 0:
        return None
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 < hours <= 24 * 3650:
        raise ConfigError(f"the backup gate's maximum age must be a number of hours above 0 (0 turns it off), "
                          f"got {hours!r}")
    return float(hours)


class StateDir:
    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path).expanduser().resolve()

    def file(self, name: str) -> pathlib.Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return self.file(name).exists()

    def read(self, name: str) -> bytes:
        try:
            return self.file(name).read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                f"{self.file(name)} is missing; run `flux-controller init --state-dir {self.path}` first"
            ) from None

    def write(self, name: str, data: bytes, *, secret: bool = False) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = self.file(name)
        tmp = target.with_suffix(target.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)

    def load_config(self) -> ControllerConfig:
        raw = json.loads(self.read(CONFIG_FILE))
        return ControllerConfig(
            catalog_url=raw["catalog_url"], base_domain=raw["base_domain"],
            dump_retention_days=check_dump_retention(raw.get("dump_retention_days", DEFAULT_DUMP_RETENTION_DAYS)),
            backup_max_age_hours=check_backup_max_age(raw.get("backup_max_age_hours")))

    def save_config(self, config: ControllerConfig) -> None:
        body = {"catalog_url": config.catalog_url, "base_domain": config.base_domain,
                "dump_retention_days": config.dump_retention_days,
                "backup_max_age_hours": config.backup_max_age_hours}
        self.write(CONFIG_FILE, (json.dumps(body, indent=2) + "\n").encode(), secret=True)
