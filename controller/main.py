"""flux-controller: `init` prepares a state directory and catalog; `run` serves."""

import argparse
import asyncio
import json
import logging
import re
import sys
from urllib.parse import urlsplit

import observe

from . import __version__, memory, store as catalog_mod
from .store import Catalog
from .config import CONFIG_FILE, DEFAULT_AGENT_CERT_S, DEFAULT_DUMP_RETENTION_DAYS, DEFAULT_SERVER_CERT_S, \
    ConfigError, ControllerConfig, StateDir, check_backup_max_age, check_dump_retention, parse_lifetime
from .errors import FluxError
from .gateways import LEASE_S
from .pki import certificate_authority, create_ca
from .secretbox import new_master_key
from .tokens import new_api_token, token_hash

log = logging.getLogger("controller")


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _check_catalog_url(url: str) -> str:
    if urlsplit(url).scheme not in ("postgres", "postgresql"):
        raise ConfigError(f"--catalog-url must be a postgresql:// URL, got {redact_url(url)!r}")
    return url


async def initialise(state: StateDir, catalog_url: str | None, base_domain: str | None,
                     admin_name: str, extra_names: list[str], dump_retention_days: float | None = None,
                     backup_max_age_hours: float | None = None, agent_cert_lifetime: str | None = None,
                     server_cert_lifetime: str | None = None) -> dict:
    """Brings a state directory and its catalog to the current version; idempotent."""
    changes: list[str] = []
    previous = state.load_config() if state.has(CONFIG_FILE) else None
    if catalog_url is None and previous is None:
        raise ConfigError("--catalog-url is required the first time")
    if dump_retention_days is None:
        dump_retention_days = previous.dump_retention_days if previous else DEFAULT_DUMP_RETENTION_DAYS
    config = ControllerConfig(
        catalog_url=_check_catalog_url(catalog_url) if catalog_url else previous.catalog_url,
        base_domain=base_domain or (previous.base_domain if previous else "localhost"),
        dump_retention_days=check_dump_retention(dump_retention_days),
        backup_max_age_hours=check_backup_max_age(
            backup_max_age_hours if backup_max_age_hours is not None
            else (previous.backup_max_age_hours if previous else None)),
        agent_cert_seconds=parse_lifetime(agent_cert_lifetime, "--agent-cert-lifetime") if agent_cert_lifetime
        else (previous.agent_cert_seconds if previous else DEFAULT_AGENT_CERT_S),
        server_cert_seconds=parse_lifetime(server_cert_lifetime, "--server-cert-lifetime") if server_cert_lifetime
        else (previous.server_cert_seconds if previous else DEFAULT_SERVER_CERT_S),
    )

    conn = await catalog_mod.connect(config.catalog_url)
    try:
        applied, version = await catalog_mod.migrate(conn)
    finally:
        await conn.close()
    if applied:
        changes.append(f"catalog schema migrated to version {version} "
                       f"({', '.join(f'{m.version:04d}_{m.name}' for m in applied)})")
    if config != previous:
        state.save_config(config)
        changes.append(f"configuration written to {state.file(CONFIG_FILE)}")

    if not state.has("ca.pem"):
        ca_cert, ca_key = create_ca()
        state.write("ca.key", ca_key, secret=True)
        state.write("ca.pem", ca_cert)
        changes.append("private CA created")
    ca = certificate_authority(state, config)
    if not state.has("server.pem"):
        issued, key = ca.issue_server(extra_names)
        state.write("server.key", key, secret=True)
        state.write("server.pem", issued.cert_pem)
        changes.append("controller server certificate issued")
    if not state.has("master.key"):
        state.write("master.key", new_master_key(), secret=True)
        changes.append("master key for secrets at rest created")

    token = None
    catalog = Catalog(config.catalog_url, max_size=1)
    await catalog.open()
    try:
        if not await catalog.has_users():
            token = new_api_token()
            await catalog.create_user(admin_name, token_hash(token))
            changes.append(f"admin user {admin_name!r} created")
    finally:
        await catalog.close()

    return {
        "changed": bool(changes),
        "changes": changes,
        "schema_version": version,
        "state_dir": str(state.path),
        "ca_fingerprint": ca.fingerprint,
        "admin_token": token,
    }


def _print_init(result: dict) -> None:
    if not result["changed"]:
        print(f"Nothing to do: {result['state_dir']} is initialised "
              f"(catalog schema version {result['schema_version']}).")
    for change in result["changes"]:
        print(f"changed: {change}")
    print(f"CA fingerprint: {result['ca_fingerprint']}")
    if result["admin_token"]:
        print(f"Admin API token (shown once, store it now): {result['admin_token']}")


async def add_user(state: StateDir, name: str, role: str, plan: str) -> dict:
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$", name):
        raise ConfigError(f"invalid user name {name!r}")
    catalog = Catalog(state.load_config().catalog_url, max_size=1)
    await catalog.open()
    try:
        token = new_api_token()
        user = await catalog.create_user(name, token_hash(token), role, plan)
    finally:
        await catalog.close()
    return {"user": user.name, "cliRole": user.cli_role, "plan": user.plan, "token": token}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-controller", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flux-controller {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create or upgrade the catalog and state directory",
                          description="Creates or upgrades the catalog schema, the private CA, the "
                          "controller's certificate, the master key and the first admin user. "
                          "Running it again changes nothing and says so.")
    init.add_argument("--catalog-url", help="postgresql:// URL of the catalog database "
                      "(required the first time)")
    init.add_argument("--state-dir", required=True, help="directory for keys and configuration")
    init.add_argument("--base-domain", help="domain of Service URLs (default: localhost)")
    init.add_argument("--admin-name", default="admin", help="name of the first user (default: admin)")
    init.add_argument("--san", action="append", default=[], metavar="NAME",
                      help="extra host name or IP for the controller's certificate (repeatable)")
    init.add_argument("--dump-retention-days", type=float, metavar="DAYS",
                      help=f"days a dump file written by a migrate is kept on its db host before the "
                      f"controller removes it (default {DEFAULT_DUMP_RETENTION_DAYS:g}; kept when omitted); "
                      "a running controller applies a new value once restarted")
    init.add_argument("--backup-max-age-hours", type=float, metavar="HOURS",
                      help="the backup gate (before a real migrate or a delete) also wants the newest "
                      "restore-verified backup younger than this; 0 turns it off (the default: newer than the "
                      "project's last push is enough; kept when omitted)")
    init.add_argument("--agent-cert-lifetime", metavar="DURATION",
                      help="how long agents' certificates are valid, like 365d (the default), 12h or 90s; "
                      "agents renew theirs once two thirds are gone (kept when omitted)")
    init.add_argument("--server-cert-lifetime", metavar="DURATION",
                      help="how long the controller's own certificate is valid (default 825d); it is issued "
                      "again once two thirds are gone (kept when omitted)")
    init.add_argument("--json", action="store_true", help="print the result as one JSON object")

    users = sub.add_parser("users", help="manage users of this control plane")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="add a user and print its first API token (shown once)")
    add.add_argument("name")
    add.add_argument("--state-dir", required=True)
    add.add_argument("--role", choices=["admin", "operator"], default="operator")
    add.add_argument("--plan", choices=["hobby", "pro"], default="pro")
    add.add_argument("--json", action="store_true")

    run = sub.add_parser("run", help="serve the HTTP API and the agents' gRPC services")
    run.add_argument("--state-dir", required=True)
    run.add_argument("--http-listen", default="127.0.0.1:8080", help="HTTP API (default 127.0.0.1:8080)")
    run.add_argument("--grpc-listen", default="0.0.0.0:7443",
                     help="agents' mutual-TLS service (default 0.0.0.0:7443)")
    run.add_argument("--enroll-listen", default="0.0.0.0:7444",
                     help="agents' enrollment service, server TLS only (default 0.0.0.0:7444)")
    run.add_argument("--advertise-host", help="host name agents use to reach this controller, "
                     "shown with join tokens")
    run.add_argument("--heartbeat-seconds", type=int, default=10, help="agent heartbeat interval")
    run.add_argument("--gateway-lease-seconds", type=int, default=LEASE_S,
                     help=f"how long a gateway serves without hearing from this controller (default {LEASE_S}); "
                     "also the longest a route change waits for a gateway that stopped answering")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--http-tls", action="store_true",
                     help="serve the HTTP API over HTTPS with the controller's certificate from the fleet CA "
                     "(issued again with it before it runs out); clients trust the CA: `flux login --ca-file "
                     "ca.pem` with the state directory's ca.pem")
    run.add_argument("--log-format", default="text", choices=observe.LOG_FORMATS,
                     help="text lines, or one JSON object per line carrying the job, migration and "
                     "request ids (default text)")
    run.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: a free one, "
                     "printed on the ready line); off by default")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        state = StateDir(args.state_dir)
        if args.command == "init":
            result = asyncio.run(initialise(state, args.catalog_url, args.base_domain,
                                            args.admin_name, args.san, args.dump_retention_days,
                                            args.backup_max_age_hours, args.agent_cert_lifetime,
                                            args.server_cert_lifetime))
            print(json.dumps(result)) if args.json else _print_init(result)
            return 0
        if args.command == "users":
            result = asyncio.run(add_user(state, args.name, args.role, args.plan))
            print(json.dumps(result) if args.json else
                  f"User {result['user']} ({result['cliRole']}) added. API token (shown once): {result['token']}")
            return 0
        observe.configure_logging(args.log_level, args.log_format)
        if args.metrics_listen is not None:
            try:
                observe.parse_listen(args.metrics_listen)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not 1 <= args.heartbeat_seconds <= 300:
            raise ConfigError("--heartbeat-seconds must be between 1 and 300")
        if not 3 <= args.gateway_lease_seconds <= 3600:
            raise ConfigError("--gateway-lease-seconds must be between 3 and 3600")
        # The API, gRPC and the rest of what serves: loaded only to serve, so that `init` and the
        # other commands start in a fraction of the time.
        from .app import Listen, serve

        # Before gRPC starts its threads: they share a few malloc arenas (memory.py).
        memory.limit_arenas()
        memory.tune_collector()
        asyncio.run(serve(
            state,
            Listen.parse(args.http_listen, "--http-listen"),
            Listen.parse(args.grpc_listen, "--grpc-listen"),
            Listen.parse(args.enroll_listen, "--enroll-listen"),
            heartbeat_seconds=args.heartbeat_seconds,
            gateway_lease_seconds=args.gateway_lease_seconds,
            advertise_host=args.advertise_host,
            metrics_listen=args.metrics_listen,
            http_tls=args.http_tls,
        ))
        return 0
    except FluxError as exc:
        print(f"flux-controller: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
