"""The controller's state directory: what `init` writes and `run` reads.

    controller.json   catalog URL, base domain, dump retention, certificate lifetimes (0600: the URL
                      may hold a password)
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
DAY_S = 86400
# Certificates' lifetimes: agents renew theirs, and the controller its own, once two thirds are gone.
DEFAULT_AGENT_CERT_S = 365 * DAY_S
DEFAULT_SERVER_CERT_S = 825 * DAY_S
MIN_CERT_S = 30
MAX_CERT_S = 3650 * DAY_S
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY_S}


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
    # How long the certificates this controller issues are valid, in seconds.
    agent_cert_seconds: int = DEFAULT_AGENT_CERT_S
    server_cert_seconds: int = DEFAULT_SERVER_CERT_S


def parse_lifetime(text: str, option: str) -> int:
    """Seconds from `90s`, `15m`, `12h` or `365d`."""
    value, unit = text[:-1], text[-1:]
    if unit not in _UNITS or not value.isdigit():
        raise ConfigError(f"{option} must be a number with s, m, h or d (like 365d), got {text!r}")
    return check_lifetime(int(value) * _UNITS[unit], option)


def check_lifetime(seconds, what: str) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not MIN_CERT_S <= seconds <= MAX_CERT_S:
        raise ConfigError(f"{what} must be between {MIN_CERT_S} seconds and {MAX_CERT_S // DAY_S} days, "
                          f"got {seconds!r}")
    return seconds


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
            backup_max_age_hours=check_backup_max_age(raw.get("backup_max_age_hours")),
            agent_cert_seconds=check_lifetime(raw.get("agent_cert_seconds", DEFAULT_AGENT_CERT_S),
                                              f"agent_cert_seconds in {self.file(CONFIG_FILE)}"),
            server_cert_seconds=check_lifetime(raw.get("server_cert_seconds", DEFAULT_SERVER_CERT_S),
                                               f"server_cert_seconds in {self.file(CONFIG_FILE)}"))

    def save_config(self, config: ControllerConfig) -> None:
        body = {"catalog_url": config.catalog_url, "base_domain": config.base_domain,
                "dump_retention_days": config.dump_retention_days,
                "backup_max_age_hours": config.backup_max_age_hours,
                "agent_cert_seconds": config.agent_cert_seconds, "server_cert_seconds": config.server_cert_seconds}
        self.write(CONFIG_FILE, (json.dumps(body, indent=2) + "\n").encode(), secret=True)
