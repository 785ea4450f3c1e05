"""Where the CLI finds its control plane: ~/.flux/config.json, overridden by environment.

FLUX_API_BASE and FLUX_API_TOKEN win over the file. An API base is normalised to end in
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
    return Settings(normalise_api_base(api_base), token)


def save(settings: Settings) -> pathlib.Path:
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"api_base": settings.api_base, "token": settings.token}, handle, indent=2)
        handle.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path
