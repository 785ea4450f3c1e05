"""Where the CLI finds its control plane: ~/.flux/config.json, overridden by environment.

FLUX_API_BASE, FLUX_API_TOKEN and FLUX_CA_FILE win over the file. An API base is normalised to end in
exactly one `/api`; routes are `<base>/cli/v1/...`.
"""

import json
import os
import pathlib
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import CliError

DEFAULT_API_BASE = "http://127.0.0.1:8080/api"


def config_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FLUX_CONFIG_DIR") or pathlib.Path.home() / ".flux")


def config_path() -> pathlib.Path:
    return config_dir() / "config.json"


def normalise_api_base(url: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"API base must be an http(s) URL, got {url!r}", exit_code=2)
    path = parts.path.rstrip("/")
    while path.endswith("/api"):
        path = path[: -len("/api")].rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path}/api"


@dataclass(frozen=True)
class Settings:
    api_base: str
    token: str | None
    # The CA an https API base's certificate is checked against (the fleet CA's ca.pem); None:
    # the system's trusted CAs.
    ca_file: str | None = None


def check_ca_file(path: str) -> str:
    """The absolute path of a readable PEM certificate file."""
    target = pathlib.Path(path).expanduser()
    try:
        text = target.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read the CA file {path}: {getattr(exc, 'strerror', None) or exc}", exit_code=2) from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise CliError(f"{path} holds no PEM certificate (the controller's state directory has the fleet CA's "
                       "ca.pem)", exit_code=2)
    return str(target.resolve())


def load() -> Settings:
    stored = {}
    path = config_path()
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except ValueError:
            raise CliError(f"{path} is not valid JSON; fix it or run `flux login` again") from None
    api_base = os.environ.get("FLUX_API_BASE") or stored.get("api_base") or DEFAULT_API_BASE
    token = os.environ.get("FLUX_API_TOKEN") or stored.get("token")
    ca_file = os.environ.get("FLUX_CA_FILE") or stored.get("ca_file")
    return Settings(normalise_api_base(api_base), token, ca_file)


def save(settings: Settings) -> pathlib.Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"api_base": settings.api_base, "token": settings.token,
                   **({"ca_file": settings.ca_file} if settings.ca_file else {})}, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
