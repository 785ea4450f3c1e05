"""Per-role settings of an agent, from `settings.json` in its state directory.

    {"db":      {"shared_cluster_url": "postgresql://...", "authenticator_password": "...",
                 "runtime_connection_limit": 20, "runtime_statement_timeout": "15s",
                 "push_statement_timeout": "60s", "write_guard_lock_timeout": "15s",
                 "drop_lock_timeout": "10s"},
     "docker":  {"postgres_image": "postgres:15", "postgrest_image": "postgrest/postgrest:v12.2.3",
                 "publish_host": "127.0.0.1", "advertise_host": "127.0.0.1", "memory_limit": "512m",
                 "cpus": 1.0, "restart_policy": "unless-stopped", "labels": {"team": "data"}},
     "gateway": {"caddy_admin": "/var/lib/flux-agent/caddy-admin.sock", "listen": "127.0.0.1:8443",
                 "auth_listen": "127.0.0.1:8444", "pool_upstream": "127.0.0.1:3000",
                 "pool_jwt_secret": "...", "manage_caddy": true, "caddy_bin": "caddy",
                 "max_token_lifetime_s": 7776000},
     "backup":  {"dir": "/var/lib/flux-agent/backups"}}

The file holds credentials (0600). The controller never sees these values.

Dump files are removed by the controller, which lists them in its catalog (its
`--dump-retention-days`); `db.dump_retention_days`, which agents once applied themselves, is
ignored with a warning so that older settings files still load.

Caddy's admin API has no authentication, so it listens only on a unix socket (by default
`caddy-admin.sock` in the state directory, whose mode keeps other users out). App tokens
must carry `exp` and live at most `max_token_lifetime_s`; the anon and service-role keys
the controller issues last 90 days, so a smaller value refuses them.
"""

import dataclasses
import json
import logging
import re
import types
import typing
from dataclasses import dataclass

from .config import StateDir
from ..errors import AgentError

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
ROLES = ("db", "docker", "gateway", "backup")
_DURATION = re.compile(r"^\d+(ms|s|min)$")


@dataclass(frozen=True)
class DbSettings:
    shared_cluster_url: str
    authenticator_password: str | None = None
    runtime_connection_limit: int = 20
    runtime_statement_timeout: str = "15s"
    push_statement_timeout: str = "60s"
    # How long a migration's write guard waits for the locks on a tenant's tables (an open write
    # transaction holds them off), and a tenant's drop for its schema's; each attempt fails after it.
    write_guard_lock_timeout: str = "15s"
    drop_lock_timeout: str = "10s"
    # The pooled API (PostgREST) this agent runs and supervises: {"command": [...], "env": {...}};
    # None: it runs on its own.
    pool_api: dict | None = None


@dataclass(frozen=True)
class DockerSettings:
    postgres_image: str = "postgres:15"
    postgrest_image: str = "postgrest/postgrest:v12.2.3"
    # Where the stack's ports are published, and the address others use to reach them.
    publish_host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    memory_limit: str = "512m"
    cpus: float = 1.0
    restart_policy: str = "unless-stopped"
    # The official PostgREST image has no shell to run a health check with.
    api_healthcheck: list | None = None
    # Labels put on every container, volume and network this host makes for a project, beside
    # flux's own (whose `flux.` prefix they may not use): to find them by owner, cost centre, ...
    labels: dict = dataclasses.field(default_factory=dict)


DEFAULT_MAX_TOKEN_LIFETIME_S = 90 * 24 * 3600


@dataclass(frozen=True)
class BackupSettings:
    # Where this backup host keeps backup files (one directory per project). Files are encrypted
    # under keys this host never holds.
    dir: str


@dataclass(frozen=True)
class GatewaySettings:
    listen: str
    auth_listen: str
    pool_upstream: str
    pool_jwt_secret: str
    # Path of the unix socket of Caddy's admin API; None: `caddy-admin.sock` in the state directory.
    caddy_admin: str | None = None
    manage_caddy: bool = True
    caddy_bin: str = "caddy"
    max_token_lifetime_s: int = DEFAULT_MAX_TOKEN_LIFETIME_S
    # Who signs the Service URLs' certificates: Caddy's own CA ("internal", for development), or
    # an ACME CA ("acme": Let's Encrypt unless acme_ca names another directory), each host's
    # certificate got on demand, for hosts a project has only.
    tls_issuer: str = "internal"
    acme_email: str | None = None
    acme_ca: str | None = None


def _check_gateway(gateway: GatewaySettings) -> GatewaySettings:
    admin = gateway.caddy_admin
    if admin is not None and not admin.removeprefix("unix/").startswith("/"):
        raise AgentError(f"{SETTINGS_FILE}: gateway.caddy_admin must be the absolute path of a unix "
                         f"socket (Caddy's admin API has no authentication), got {admin!r}")
    if gateway.tls_issuer not in ("internal", "acme"):
        raise AgentError(f"{SETTINGS_FILE}: gateway.tls_issuer must be internal (Caddy's own CA) or acme "
                         f"(public certificates), got {gateway.tls_issuer!r}")
    if gateway.acme_ca is not None and not gateway.acme_ca.startswith(("https://", "http://")):
        raise AgentError(f"{SETTINGS_FILE}: gateway.acme_ca must be the URL of an ACME directory, got "
                         f"{gateway.acme_ca!r}")
    lifetime = gateway.max_token_lifetime_s
    if not isinstance(lifetime, int) or isinstance(lifetime, bool) or lifetime <= 0:
        raise AgentError(f"{SETTINGS_FILE}: gateway.max_token_lifetime_s must be a positive number of "
                         f"seconds, got {lifetime!r}")
    return gateway


def _accepts(annotation, value) -> bool:
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind in (str, bool, list, dict) and isinstance(value, kind):
            return True
    return False


def _describe(annotation) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", list: "a list",
             dict: "an object", type(None): "null"}
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    return " or ".join(names[kind] for kind in allowed)


def _build(cls, raw, role: str):
    if not isinstance(raw, dict):
        raise AgentError(f"{SETTINGS_FILE}: {role} must be an object of settings, like {{\"{role}\": {{...}}}}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise AgentError(f"{SETTINGS_FILE}: unknown {role} setting(s) {', '.join(unknown)}; the {role} settings "
                         f"are {', '.join(hints)}")
    missing = [name for name, field in cls.__dataclass_fields__.items()
               if name not in raw and field.default is dataclasses.MISSING
               and field.default_factory is dataclasses.MISSING]
    if missing:
        raise AgentError(f"{SETTINGS_FILE}: {role} settings lack {', '.join(f'{role}.{m}' for m in missing)}, "
                         "which have no default")
    for name, value in raw.items():
        if not _accepts(hints[name], value):
            # The value is not shown: it may be a password.
            raise AgentError(f"{SETTINGS_FILE}: {role}.{name} must be {_describe(hints[name])}, "
                             f"not {type(value).__name__ if value is not None else 'null'}")
    return cls(**raw)


def _check_pool_api(pool_api: dict) -> None:
    unknown = sorted(set(pool_api) - {"command", "env"})
    if unknown:
        raise AgentError(f"{SETTINGS_FILE}: unknown db.pool_api setting(s) {', '.join(unknown)}; they are "
                         "command and env")
    command = pool_api.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(c, str) and c for c in command):
        raise AgentError(f"{SETTINGS_FILE}: db.pool_api.command must be a list of strings, the program first "
                         '(like ["/usr/bin/postgrest", "/etc/postgrest.conf"])')
    env = pool_api.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise AgentError(f"{SETTINGS_FILE}: db.pool_api.env must be an object of strings (its values are not shown)")


def _check_labels(labels: dict) -> None:
    for key, value in labels.items():
        if key.startswith("flux."):
            raise AgentError(f"{SETTINGS_FILE}: docker.labels may not set {key!r}: labels starting with "
                             "flux. are flux's own")
        if not key or not isinstance(value, str):
            raise AgentError(f"{SETTINGS_FILE}: docker.labels must name each label and give it a string, like "
                             f'{{"team": "data"}}; {key!r} does not')


def _check_address(value: str, where: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentError(f"{SETTINGS_FILE}: {where} must be HOST:PORT, like 127.0.0.1:8443, got {value!r}")


def load(state: StateDir) -> dict:
    path = state.file(SETTINGS_FILE)
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise AgentError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AgentError(f"{path} must hold one JSON object, with a key per role (db, docker, gateway, backup)")
    unknown = sorted(set(raw) - set(ROLES))
    if unknown:
        raise AgentError(f"{SETTINGS_FILE}: unknown role(s) {', '.join(map(repr, unknown))}; the roles are "
                         f"{', '.join(ROLES)}")
    settings = {}
    if "db" in raw:
        if not isinstance(raw["db"], dict):
            raise AgentError(f"{SETTINGS_FILE}: db must be an object of settings, like {{\"db\": {{...}}}}")
        db_raw = dict(raw["db"])
        if db_raw.pop("dump_retention_days", None) is not None:
            log.warning("%s: db.dump_retention_days is no longer used: the controller removes dump files "
                        "(flux-controller init --dump-retention-days)", SETTINGS_FILE)
        db = _build(DbSettings, db_raw, "db")
        if db.pool_api is not None:
            _check_pool_api(db.pool_api)
        if not db.shared_cluster_url.startswith(("postgresql://", "postgres://")):
            raise AgentError(f"{SETTINGS_FILE}: db.shared_cluster_url must be a postgresql:// URL of the shared "
                             "cluster's database, for a role that is a superuser")
        for key in ("runtime_statement_timeout", "push_statement_timeout", "write_guard_lock_timeout",
                    "drop_lock_timeout"):
            if not _DURATION.match(getattr(db, key)):
                raise AgentError(f"{SETTINGS_FILE}: db.{key} must look like 15s, 500ms or 2min")
        settings["db"] = db
    if "gateway" in raw:
        gateway = _check_gateway(_build(GatewaySettings, raw["gateway"], "gateway"))
        for key in ("listen", "auth_listen", "pool_upstream"):
            _check_address(getattr(gateway, key), f"gateway.{key}")
        settings["gateway"] = gateway
    if "docker" in raw:
        docker = _build(DockerSettings, raw["docker"], "docker")
        _check_labels(docker.labels)
        settings["docker"] = docker
    if "backup" in raw:
        backup = _build(BackupSettings, raw["backup"], "backup")
        if not isinstance(backup.dir, str) or not backup.dir.startswith("/"):
            raise AgentError(f"{SETTINGS_FILE}: backup.dir must be an absolute path (where backup files are kept)")
        settings["backup"] = backup
    return settings
