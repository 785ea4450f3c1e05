"""flux-agent: `enroll` once with a join token, then `run` as a service."""

import argparse
import asyncio
import dataclasses
import json
import logging
import re
import sys

import observe

from .. import __version__
from .config import AgentConfig, StateDir
from ..errors import AgentError, Revoked
from .identity import (certificate_expired, certificate_expiry, check_fingerprint, fetch_pinned_ca,
                       new_key_and_csr, parse_address)
from .wire import enroll as enroll_rpc

ROLES = ("db", "docker", "gateway", "backup")
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# systemd's RestartPreventExitStatus: a revoked agent must not be restarted in a loop.
EXIT_REVOKED = 78


def parse_roles(text: str) -> list[str]:
    roles = sorted({r.strip() for r in text.split(",") if r.strip()})
    unknown = [r for r in roles if r not in ROLES]
    if not roles or unknown:
        raise AgentError(f"--roles takes a comma-separated list of {', '.join(ROLES)}; got {text!r}")
    return roles


def enroll(args) -> dict:
    state = StateDir(args.state_dir)
    previous = None
    if state.enrolled():
        previous = state.load()
        # An agent away past its certificate's end enrolls again in place: its spool, settings and
        # routes stay. One whose certificate is current renews it by itself.
        if previous.name != args.name or not certificate_expired(state.read("cert.pem")):
            raise AgentError(f"{state.path} already holds an enrolled agent ({previous.name}) whose certificate "
                             f"is valid until {certificate_expiry(state.read('cert.pem'))}; use another "
                             "--state-dir, or remove it to enroll again (only an agent whose certificate "
                             "expired enrolls again in its own state directory, under its own name)")
    if not _NAME.match(args.name):
        raise AgentError(f"--name must be 1-63 lower-case letters, digits and hyphens; got {args.name!r}")
    roles = parse_roles(args.roles)
    fingerprint = check_fingerprint(args.ca_fingerprint)
    host, port = parse_address(args.controller)
    ca_pem = fetch_pinned_ca(host, port, fingerprint)
    key_pem, csr_pem = new_key_and_csr(args.name)
    enrolled = enroll_rpc(args.controller, ca_pem, args.token, args.name, roles, csr_pem)
    if enrolled.ca_pem.strip() != ca_pem.strip():
        raise AgentError("controller returned a CA other than the one pinned; refusing it")
    state.write("key.pem", key_pem, secret=True)
    state.write("cert.pem", enrolled.certificate_pem)
    state.write("ca.pem", ca_pem)
    fleet_address = f"[{host}]:{enrolled.fleet_port}" if ":" in host else f"{host}:{enrolled.fleet_port}"
    config = AgentConfig(name=args.name, roles=roles, controller=fleet_address, server_name=enrolled.server_name)
    if previous is not None:  # the other controllers it knew of are still there
        config = dataclasses.replace(previous, roles=roles, controller=fleet_address,
                                     server_name=enrolled.server_name)
    state.save(config)
    return {"name": args.name, "roles": roles, "controller": fleet_address, "state_dir": str(state.path),
            "cert_expires_at": certificate_expiry(enrolled.certificate_pem), "enrolled_again": previous is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flux-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    en = sub.add_parser(
        "enroll", help="join a controller with a one-time token",
        description="Makes a key and a CSR, trusts the controller only if its CA matches "
        "--ca-fingerprint, and receives this agent's certificate. `flux agents token` prints "
        "the token, the fingerprint and the enrollment address.")
    en.add_argument("--controller", required=True, metavar="HOST:PORT",
                    help="the controller's enrollment address (default port 7444)")
    en.add_argument("--token", required=True, help="one-time join token (flx_join_...)")
    en.add_argument("--name", required=True, help="this agent's name, unique in the fleet")
    en.add_argument("--roles", required=True, help="comma-separated: db, docker, gateway, backup")
    en.add_argument("--state-dir", required=True, help="where the key, certificate and spool live")
    en.add_argument("--ca-fingerprint", required=True, metavar="sha256:HEX",
                    help="fingerprint of the controller's CA, shown with the join token")
    en.add_argument("--json", action="store_true", help="print the result as one JSON object")
    run = sub.add_parser("run", help="connect to the controller and execute jobs")
    run.add_argument("--state-dir", required=True)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", default="text", choices=observe.LOG_FORMATS,
                     help="text lines, or one JSON object per line carrying the job id (default text)")
    run.add_argument("--metrics-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: a free one, "
                     "logged at start); off by default")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "enroll":
            result = enroll(args)
            if args.json:
                print(json.dumps(result))
            else:
                print(f"Enrolled {result['name']} ({', '.join(result['roles'])}) with the controller "
                      f"at {result['controller']}; certificate valid until {result['cert_expires_at']}.")
            return 0
        observe.configure_logging(args.log_level, args.log_format)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        if args.metrics_listen is not None:
            try:
                logging.getLogger("agent").info("metrics at http://%s/metrics",
                                                observe.serve_metrics(args.metrics_listen))
            except (ValueError, OSError) as exc:
                raise AgentError(str(exc)) from None
        # The handlers and what they use (psycopg, docker, ...): loaded only to run, so that
        # `enroll` starts sooner.
        from .connection import Agent

        asyncio.run(Agent(StateDir(args.state_dir)).run())
        return 0
    except Revoked as exc:
        print(f"flux-agent: {exc.message}; this agent must be enrolled again", file=sys.stderr)
        return EXIT_REVOKED
    except AgentError as exc:
        print(f"flux-agent: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
