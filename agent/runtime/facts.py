"""Facts about the agent's host. Parsers are pure; `collect` alone runs commands."""

import errno
import os
import re
import shutil
import socket
import subprocess

from .. import __version__

_PG_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)")
_PLAIN_VERSION = re.compile(r"^\s*(\d+(?:\.\d+)+)")

TOOL_COMMANDS = {
    "pg_dump": ["pg_dump", "--version"],
    "psql": ["psql", "--version"],
    "docker": ["docker", "version", "--format", "{{.Server.Version}}"],
}


def parse_pg_tool_version(output: str) -> str | None:
    """`pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)` -> `15.18`."""
    match = _PG_VERSION.search(output)
    return match.group(1) if match else None


def parse_docker_server_version(output: str) -> str | None:
    """The engine's version from `docker version --format {{.Server.Version}}`."""
    match = _PLAIN_VERSION.match(output)
    return match.group(1) if match else None


PARSERS = {
    "pg_dump": parse_pg_tool_version,
    "psql": parse_pg_tool_version,
    "docker": parse_docker_server_version,
}


def tool_versions(timeout: float = 5) -> dict[str, str]:
    """Versions of the tools present; a missing tool or a Docker engine that is down is left out."""
    found = {}
    for tool, command in TOOL_COMMANDS.items():
        if shutil.which(command[0]) is None:
            continue
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if proc.returncode == 0:
            version = PARSERS[tool](proc.stdout)
            if version:
                found[tool] = version
    return found


def free_bytes(path: str | os.PathLike) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def unwritable(path: str | os.PathLike, exc: OSError) -> str:
    """Why a write under `path` failed, with the room left on its disk when the disk is full."""
    if not disk_full(exc):
        return str(exc.strerror or exc)
    try:
        return f"{exc.strerror}, {free_bytes(path)} bytes free"
    except OSError:
        return f"{exc.strerror}, free space unknown"


def hostname() -> str:
    return socket.gethostname()


def agent_version() -> str:
    return __version__
