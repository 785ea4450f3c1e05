"""flux: the command line of the Flux control plane.

Commands are thin: parse, call the controller's HTTP API, render. Every command that
prints data takes --json and then prints the API's response object as it is.
Exit codes: 0 ok, 1 failed, 2 usage.
"""

import json
import logging
import pathlib
import re
import sys
import traceback

import click

from . import __version__, config as config_mod
from .client import ApiClient
from .errors import CliError
from .progress import MigrateProgress, render_dry_run, render_migration_status, size
from .projectref import migration_files, resolve

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TOKEN = re.compile(r"^flx_live_[0-9a-f]{32}_[0-9a-f]{4}$")


def parse_duration(text: str) -> int:
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 1h or 7d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def emit(data, as_json: bool, render) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render(data)


def client() -> ApiClient:
    return ApiClient(config_mod.load()).require_login()


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(v)) for v in col) for col in zip(headers, *rows)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flux-fleet", prog_name="flux")
def cli():
    """Flux fleet: projects on pooled or dedicated Postgres + PostgREST.

    Talks to the controller's HTTP API at FLUX_API_BASE (or the one `flux login`
    stored in ~/.flux/config.json).
    """


@cli.command()
@click.option("--token", help="API token (flx_live_...); asked for when omitted on a terminal")
@click.option("--api-base", help="controller API base, e.g. https://flux.example.com/api")
@click.option("--ca-file", help="CA certificate (PEM) to check an https API base against: the fleet CA's "
              "ca.pem from the controller's state directory, for `flux-controller run --http-tls`")
@click.option("--json", "as_json", is_flag=True, help="print the verification result as JSON")
def login(token, api_base, ca_file, as_json):
    """Verify an API token with the controller and store it in ~/.flux/config.json."""
    current = config_mod.load()
    if not token:
        if not sys.stdin.isatty():
            raise CliError("--token is required when not on a terminal", exit_code=2)
        token = click.prompt("API token", hide_input=True)
    token = token.strip()
    if not _TOKEN.match(token):
        raise CliError("that is not a Flux API token (expected flx_live_<32 hex>_<4 hex>)", exit_code=2)
    settings = config_mod.Settings(
        config_mod.normalise_api_base(api_base) if api_base else current.api_base, token,
        config_mod.check_ca_file(ca_file) if ca_file else current.ca_file)
    verified = ApiClient(settings).get("auth/verify")
    path = config_mod.save(settings)
    emit(verified, as_json, lambda v: click.echo(
        f"Logged in to {settings.api_base} as {v['user']} ({v.get('cliRole', 'user')}); saved to {path}"))


@cli.group()
def agents():
    """Enroll, list, ping and revoke agents."""


@agents.command("token")
@click.option("--roles", required=True, help="comma-separated roles the agent may take: db, docker, gateway")
@click.option("--ttl", default="1h", show_default=True, help="how long the token stays valid (90s, 15m, 1h, 7d)")
@click.option("--name", help="the only agent name the token enrolls; needed to enroll an agent again under its "
              "own name once its certificate expired")
@click.option("--json", "as_json", is_flag=True)
def agents_token(roles, ttl, name, as_json):
    """Create a one-time join token and print the enroll command to run on the new host."""
    body = {"roles": [r.strip() for r in roles.split(",") if r.strip()], "ttl_seconds": parse_duration(ttl),
            **({"name": name} if name else {})}
    result = client().post("agents/tokens", body)

    def render(r):
        click.echo(f"Join token (one use, expires {r['expires_at']}):\n  {r['token']}")
        click.echo(f"CA fingerprint: {r['ca_fingerprint']}")
        if not r.get("name"):
            click.echo("On the new host, as root (NAME: the agent's name, unique in the fleet):")
        else:
            click.echo(f"On the host of agent {r['name']}, as root:")
        click.echo(f"  apt install ./flux-agent_{__version__}_amd64.deb")
        click.echo(f"  runuser -u flux-agent -- flux-agent enroll --controller {r['enroll_address']} "
                   f"--token {r['token']} --name {r.get('name') or 'NAME'} --roles {','.join(r['roles'])} "
                   f"--state-dir /var/lib/flux-agent --ca-fingerprint {r['ca_fingerprint']}")
        drop_ins = [role for role in r["roles"] if role in ("docker", "gateway")]
        if drop_ins:
            click.echo("  mkdir -p /etc/systemd/system/flux-agent.service.d")
            for role in drop_ins:
                click.echo(f"  ln -sf /usr/share/flux-agent/systemd/{role}.conf "
                           "/etc/systemd/system/flux-agent.service.d/")
        click.echo("  # the roles' settings: /var/lib/flux-agent/settings.json (0600, owned by flux-agent)")
        click.echo("  systemctl daemon-reload && systemctl enable --now flux-agent")

    emit(result, as_json, render)


@agents.command("list")
@click.option("--json", "as_json", is_flag=True)
def agents_list(as_json):
    """List agents: roles, connection (and a gateway's health), last contact, tool versions, certificate expiry."""
    result = client().get("agents")

    def render(items):
        if not items:
            click.echo("No agents enrolled. Create a join token with `flux agents token --roles ...`.")
            return
        rows = []
        for a in items:
            tools = a.get("facts", {}).get("tools", {})
            state = "revoked" if a.get("revoked") else ("connected" if a["connected"] else "offline")
            if a.get("gateway") and not a.get("revoked"):
                state += f", {a['gateway']['state']}"
            rows.append([a["name"], ",".join(a["roles"]), state, a.get("last_seen") or "never",
                         " ".join(f"{k}={v}" for k, v in sorted(tools.items())) or "-",
                         (a.get("cert_expires_at") or "")[:10]])
        _table(rows, ["NAME", "ROLES", "STATE", "LAST SEEN", "TOOLS", "CERT EXPIRES"])

    emit(result, as_json, render)


@agents.command("ping")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def agents_ping(name, as_json):
    """Round trip to an agent over its stream."""
    result = client().post(f"agents/{name}/ping")
    emit(result, as_json, lambda r: click.echo(f"{r['name']}: {r['rtt_ms']:.1f} ms"))


@agents.command("revoke")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def agents_revoke(name, as_json):
    """Revoke an agent: its connection closes now and it is refused from then on."""
    result = client().post(f"agents/{name}/revoke")
    emit(result, as_json, lambda r: click.echo(f"Revoked {r['name']}; it must be enrolled again to reconnect."))


@cli.group()
def tokens():
    """List, create and revoke API tokens (yours; every user's with --all, for admins)."""


@tokens.command("list")
@click.option("--all", "all_users", is_flag=True, help="every user's tokens (admins only)")
@click.option("--json", "as_json", is_flag=True)
def tokens_list(all_users, as_json):
    """List API tokens: id, user, fingerprint (not the token), created, last used."""
    result = client().get("tokens", params={"all": "true"} if all_users else None)

    def render(items):
        rows = [[str(t["id"]) + (" *" if t["current"] else ""), t["user"], t["fingerprint"],
                 (t["createdAt"] or "")[:19], (t["lastUsedAt"] or "never")[:19]] for t in items]
        _table(rows, ["ID", "USER", "FINGERPRINT", "CREATED", "LAST USED"])
        click.echo("* the token this command used")

    emit(result, as_json, render)


@tokens.command("create")
@click.option("--json", "as_json", is_flag=True)
def tokens_create(as_json):
    """Create another API token for yourself; it is shown once."""
    result = client().post("tokens")
    emit(result, as_json, lambda r: click.echo(f"API token {r['id']} (shown once, store it now): {r['token']}"))


@tokens.command("revoke")
@click.argument("token_id", type=int)
@click.option("--json", "as_json", is_flag=True)
def tokens_revoke(token_id, as_json):
    """Revoke an API token by its id (see `flux tokens list`); it stops working at once."""
    result = client().request("DELETE", f"tokens/{token_id}")
    emit(result, as_json, lambda r: click.echo(f"Revoked API token {r['id']}."))


@cli.group()
def users():
    """Users of this control plane (admins only): list and add."""


@users.command("list")
@click.option("--json", "as_json", is_flag=True)
def users_list(as_json):
    """List users and their roles (admin or operator)."""
    result = client().get("users")
    emit(result, as_json, lambda items: _table([[u["name"], u["cliRole"], u["plan"]] for u in items],
                                              ["NAME", "ROLE", "PLAN"]))


@users.command("add")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "operator"]), default="operator", show_default=True,
              help="admins manage the fleet and users; operators manage their own projects")
@click.option("--json", "as_json", is_flag=True)
def users_add(name, role, as_json):
    """Add a user and print its first API token (shown once)."""
    result = client().post("users", {"name": name, "role": role})
    emit(result, as_json, lambda r: click.echo(
        f"User {r['user']} ({r['cliRole']}) added. API token (shown once): {r['token']}"))


PROJECT_OPTIONS = [
    click.option("-p", "--project", "slug", help="project slug (or flux.json)"),
    click.option("--hash", "hash_", help="project hash, 7 hex characters (or flux.json)"),
]


def project_options(fn):
    for option in reversed(PROJECT_OPTIONS):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("name")
@click.option("--mode", type=click.Choice(["v2_shared", "v1_dedicated"]), default="v2_shared", show_default=True,
              help="engine: pooled tenant schema or dedicated containers")
@click.option("--host", help="docker agent for a dedicated project (default: the one with the fewest projects)")
@click.option("--json", "as_json", is_flag=True)
def create(name, mode, host, as_json):
    """Create a project. Prints its Service URL and JWT secret (shown once)."""
    body = {"name": name, "mode": mode, **({"host": host} if host else {})}
    if not as_json and mode == "v1_dedicated":
        click.echo("Provisioning Postgres and PostgREST containers (this takes a little while)...", err=True)
    result = client().post("create", body, timeout=600)

    def render(r):
        s = r["summary"]
        click.echo(f"Created {s['slug']} (hash {s['hash']}, {r['mode']}).")
        click.echo(f"Service URL: {s['apiUrl']}")
        click.echo(f"FLUX_GATEWAY_JWT_SECRET={r['projectJwtSecret']}  (shown once; "
                   "`flux project credentials` shows it again)")

    emit(result, as_json, render)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_projects(as_json):
    """List your projects with their engine (MODE), status and API URL.

    A dedicated project's status is what its docker agent last reported (agents report on change
    and every 30 s); `unknown` when that agent is away or cannot reach its Docker engine."""
    result = client().get("list")

    def render(items):
        if not items:
            click.echo("No projects yet. Create one with `flux create NAME`.")
            return
        _table([[p["slug"], p["hash"], p.get("mode", "?"), p.get("lifecycleState", "?"), p["status"], p["apiUrl"]]
                for p in items], ["PROJECT", "HASH", "MODE", "LIFECYCLE", "STATUS", "API URL"])
        for p in items:
            if p.get("pooledCopy"):
                click.echo(f"{p['slug']} ({p['hash']}) keeps its pooled copy, read-only "
                           f"({size(p['pooledCopy']['bytes'] or 0)}): `flux migrate cleanup -p {p['slug']} "
                           f"--hash {p['hash']} --yes` drops it")
        unknown = [p["slug"] for p in items if p["status"] == "unknown"]
        if unknown:
            click.echo(f"Status unknown for {', '.join(unknown[:5])}{' and others' if len(unknown) > 5 else ''}: "
                       "the docker agent is away or cannot reach its Docker engine (`flux agents list`).")

    emit(result, as_json, render)


def _stack_command(name: str, help_text: str, call):
    @cli.command(name, help=help_text)
    @project_options
    @click.option("--json", "as_json", is_flag=True)
    def command(slug, hash_, as_json):
        slug, hash_ = resolve(slug, hash_)
        api = client()
        shown = api.get(f"projects/{hash_}")
        if shown["slug"] != slug:
            raise CliError(f"slug {slug!r} does not match the project with hash {hash_} "
                           f"(its slug is {shown['slug']!r})")
        result = call(api, slug, hash_)
        emit(result, as_json, lambda r: click.echo(f"{slug}: {name} done; status {r.get('status', '?')}."))

    return command


_stack_command("start", "Start a dedicated project's containers and wait until its API answers.",
               lambda api, slug, h: api.post(f"projects/{h}/lifecycle", {"action": "start"}, timeout=600))
_stack_command("stop", "Stop a dedicated project's containers (data is kept).",
               lambda api, slug, h: api.post(f"projects/{h}/lifecycle", {"action": "stop"}, timeout=600))
_stack_command("repair", "Re-converge a dedicated stack: missing parts come back with the same data, "
               "JWT secret and API schema.",
               lambda api, slug, h: api.post(f"projects/{h}/repair", timeout=600))


@cli.command()
@project_options
@click.option("--yes", is_flag=True, help="confirm: the project's data is deleted for good")
@click.option("--skip-backup-check", is_flag=True,
              help="delete without a restore-verified backup newer than the last push")
@click.option("--json", "as_json", is_flag=True)
def delete(slug, hash_, yes, skip_backup_check, as_json):
    """Delete a project: its stack or tenant schema, its route and its catalog row.

    Its backups stay on the backup host (`flux backup restore ID --to-new-project NAME`)."""
    slug, hash_ = resolve(slug, hash_)
    if not yes:
        raise CliError(f"deleting {slug} removes its data for good; pass --yes to confirm", exit_code=2)
    params = {"slug": slug, **({"skipBackupCheck": "true"} if skip_backup_check else {})}
    result = client().request("DELETE", f"projects/{hash_}", params=params, timeout=600)
    emit(result, as_json, lambda r: click.echo(f"Deleted {r['deleted']} ({r['hash']})."
                                               + (f" Left alone: {r['untouched']}" if r.get("untouched") else "")))


@cli.command()
@project_options
@click.option("--service", type=click.Choice(["api", "db"]), default="api", show_default=True,
              help="the project's PostgREST (api) or Postgres (db) container")
@click.option("--tail", type=click.IntRange(1, 2000), default=100, show_default=True,
              help="how many of the last lines to show first")
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines as they come (Ctrl-C ends)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line: {line, at}")
def logs(slug, hash_, service, tail, follow, as_json):
    """Print the lines a dedicated project's api or db container wrote (a pooled project's staged
    stack's too). A pooled project's api lines are the requests the gateways served for it:
    method, path, status, time taken, size and client address."""
    slug, hash_ = resolve(slug, hash_)
    params = {"slug": slug, "hash": hash_, "service": service, "tail": tail, "follow": "1" if follow else "0"}
    try:
        for event in client().events("logs", params):
            if "error" in event:
                raise CliError(f"logs of {slug} stopped: {event['error']}")
            click.echo(json.dumps(event) if as_json else event["line"])
    except KeyboardInterrupt:
        pass


@cli.group()
def project():
    """Credentials and settings of one project."""


@project.command("credentials")
@click.argument("slug_arg", required=False, metavar="[SLUG]")
@project_options
@click.option("--json", "as_json", is_flag=True)
def project_credentials(slug_arg, slug, hash_, as_json):
    """Show the project's JWT secret and Service URL (for your app's env)."""
    slug, hash_ = resolve(slug_arg or slug, hash_)
    api = client()
    shown = api.get(f"projects/{hash_}")
    if shown["slug"] != slug:
        raise CliError(f"slug {slug!r} does not match the project with hash {hash_} (its slug is {shown['slug']!r})")
    result = api.get(f"projects/{hash_}/credentials")

    def render(r):
        click.echo(f"FLUX_URL={r.get('serviceUrl', shown.get('serviceUrl'))}")
        click.echo(f"FLUX_GATEWAY_JWT_SECRET={r['projectJwtSecret']}")
        for key, name in (("postgresConnectionString", "DATABASE_URL"), ("anonKey", "FLUX_ANON_KEY"),
                          ("serviceRoleKey", "FLUX_SERVICE_ROLE_KEY")):
            if r.get(key):
                click.echo(f"{name}={r[key]}")
        if r.get("stagedStack"):
            click.echo(f"# staged dedicated stack on {r['stagedStack']['dockerHost']}, not serving until cutover:")
            click.echo(f"STAGED_DATABASE_URL={r['stagedStack']['postgresConnectionString']}")

    emit(result, as_json, render)


@project.command("activity")
@project_options
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True, help="how many, newest first")
@click.option("--json", "as_json", is_flag=True)
def project_activity(slug, hash_, limit, as_json):
    """What was done to the project (create, push, start, stop, repair, migrations...), newest first."""
    slug, hash_ = resolve(slug, hash_)
    result = client().get(f"projects/{hash_}/activity", params={"limit": limit})
    emit(result, as_json, lambda r: _table([[a["at"][:19].replace("T", " "), a["kind"], a["outcome"],
                                              (a.get("detail") or "")[:70]] for a in r["activity"]],
                                            ["AT (UTC)", "WHAT", "OUTCOME", "DETAIL"]))


def _show_or_change(hash_: str, part: str, field: str, changes: tuple[str, ...], removed: tuple[str, ...],
                    params: dict | None = None) -> dict:
    """GET projects/HASH/PART, or PATCH it with {FIELD: {key: value, removed key: null}} from
    KEY=VALUE arguments and --unset keys."""
    api = client()
    if not (changes or removed):
        return api.get(f"projects/{hash_}/{part}", params=params)
    change: dict = {}
    for item in changes:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{item!r}: give each as KEY=VALUE", exit_code=2)
        change[key] = value
    change.update({key: None for key in removed})
    return api.request("PATCH", f"projects/{hash_}/{part}", params=params, json_body={field: change}, timeout=600)


@project.command("metadata")
@click.argument("changes", nargs=-1, metavar="[KEY=VALUE]...")
@project_options
@click.option("--unset", "removed", multiple=True, metavar="KEY", help="remove this key (repeatable)")
@click.option("--json", "as_json", is_flag=True)
def project_metadata(changes, slug, hash_, removed, as_json):
    """Show what is recorded about the project, or set KEY=VALUE pairs and --unset keys."""
    slug, hash_ = resolve(slug, hash_)
    result = _show_or_change(hash_, "metadata", "metadata", changes, removed)

    def render(r):
        for key, value in sorted(r["metadata"].items()):
            click.echo(f"{key}={value}")
        if not r["metadata"]:
            click.echo(f"No metadata recorded for {slug}.")

    emit(result, as_json, render)


@project.command("api-env")
@click.argument("changes", nargs=-1, metavar="[PGRST_KEY=VALUE]...")
@project_options
@click.option("--unset", "removed", multiple=True, metavar="PGRST_KEY", help="remove this setting (repeatable)")
@click.option("--json", "as_json", is_flag=True)
def project_api_env(changes, slug, hash_, removed, as_json):
    """Show a dedicated project's PostgREST settings (secrets hidden), or set PGRST_KEY=VALUE pairs and
    --unset keys: the API is made again with them, and put back as it was if it does not come up."""
    slug, hash_ = resolve(slug, hash_)
    result = _show_or_change(hash_, "api-env", "env", changes, removed, params={"slug": slug})

    def render(r):
        for key, value in sorted(r["env"].items()):
            click.echo(f"{key}={value}" + ("" if key in r["chosen"] else "    # set by Flux"))

    emit(result, as_json, render)


@project.command("maintenance")
@click.argument("state", type=click.Choice(["on", "off"]))
@project_options
@click.option("--json", "as_json", is_flag=True)
def project_maintenance(state, slug, hash_, as_json):
    """Turn the gateway's write lock on or off (reads pass, writes get 503); returns once every gateway enforces it."""
    slug, hash_ = resolve(slug, hash_)
    result = client().post(f"projects/{hash_}/maintenance", {"enabled": state == "on"})
    emit(result, as_json, lambda r: click.echo(
        f"Maintenance {'on' if r['maintenance'] else 'off'} for {slug}; acknowledged by {', '.join(r['gateways'])}."))


@cli.command()
@click.argument("path", required=False)
@project_options
@click.option("--dry-run", is_flag=True, help="list what would apply, change nothing")
@click.option("--json", "as_json", is_flag=True)
def push(path, slug, hash_, dry_run, as_json):
    """Apply SQL migrations not yet applied, in file-name order, in one transaction.

    PATH is a .sql file or a directory of them; without it, the first of migrations/,
    flux/migrations/, sql/ and schema.sql that exists. An applied file that was
    edited since is a conflict: nothing is applied.
    """
    slug, hash_ = resolve(slug, hash_)
    source, files = migration_files(path)
    body = {"slug": slug, "hash": hash_, "dryRun": dry_run,
            "files": [{"filename": f.name, "sql": f.read_text()} for f in files]}
    result = client().post("push", body, timeout=600)

    def render(r):
        verb = "Would apply" if dry_run else "Applied"
        if r["applied"]:
            click.echo(f"{verb} {len(r['applied'])} file(s) from {source}:")
            for name in r["applied"]:
                click.echo(f"  {name}")
        else:
            click.echo(f"Nothing to apply: all {len(files)} file(s) in {source} are applied already.")
        if r.get("skippedFiles"):
            click.echo(f"Already applied: {len(r['skippedFiles'])}")

    emit(result, as_json, render)


@cli.group(invoke_without_command=True)
@project_options
@click.option("--to", "target", help="target engine: v1_dedicated (required to start a migration)")
@click.option("--dry-run", is_flag=True, help="print the plan and a preflight; change nothing")
@click.option("--dump-only", is_flag=True, help="only write a consistent dump on the db host (path, size, SHA-256)")
@click.option("--staged", is_flag=True, help="provision and fill the dedicated stack; keep the catalog v2_shared")
@click.option("--yes", is_flag=True, help="go ahead (required for anything but --dry-run)")
@click.option("--new-jwt-secret", is_flag=True, help="rotate the project's JWT secret at cutover")
@click.option("--no-lock-writes", is_flag=True, help="do not hold writes during the move (writes may be lost)")
@click.option("--drop-source-after", is_flag=True,
              help="after a verified full cutover, remove the tenant from the shared cluster")
@click.option("--online/--offline", default=None,
              help="sync by logical replication and pause writes only for the cutover (the default where the "
                   "shared cluster and the tenant allow it), or copy with writes held throughout")
@click.option("--skip-backup-check", is_flag=True,
              help="go ahead without a restore-verified backup newer than the last push (not advised)")
@click.option("--json", "as_json", is_flag=True, help="one JSON event per line, ending with the result object")
@click.pass_context
def migrate(ctx, slug, hash_, target, dry_run, dump_only, staged, yes, new_jwt_secret, no_lock_writes,
            drop_source_after, online, skip_backup_check, as_json):
    """Move a v2_shared project to its own dedicated stack (v1_dedicated), losing nothing.

    Safe order: --dry-run, then optionally --dump-only --yes, then --staged --yes or the full
    migrate with --yes. Online (wal_level=logical on the shared cluster), the stack is filled
    from a replication slot's snapshot and kept in sync, and writes pause (gateway maintenance
    and a database guard) only for the cutover; offline, they are held while the data moves.
    A failure before cutover rolls back by itself and the pooled copy keeps serving.
    A failure after cutover ends as failed_after_cutover: the project serves from its dedicated
    stack, the pooled copy takes no writes, and `flux migrate resume ID` finishes the rest.
    """
    if ctx.invoked_subcommand is not None:
        return
    if not target:
        raise click.UsageError("--to is required: the target engine, v1_dedicated")
    slug, hash_ = resolve(slug, hash_)
    if no_lock_writes and not dry_run and not as_json:
        click.secho("warning: --no-lock-writes: writes during the move are not held and may be lost", fg="yellow",
                    err=True)
    body = {"slug": slug, "hash": hash_, "to": target, "dryRun": dry_run, "yes": yes, "staged": staged,
            "dumpOnly": dump_only, "preserveJwtSecret": not new_jwt_secret, "newJwtSecret": new_jwt_secret,
            "lockWrites": not no_lock_writes, "noLockWrites": no_lock_writes,
            "dropSourceAfter": drop_source_after, "skipBackupCheck": skip_backup_check,
            **({} if online is None else {"online": online})}
    api = client()
    if dry_run:
        result = api.post("migrate", body, timeout=300)
        emit(result, as_json, render_dry_run)
        if not result["ok"]:
            sys.exit(1)
        return
    _follow_migration(api, "migrate", body, as_json)


@migrate.command("resume")
@click.argument("migration_id")
@click.option("--json", "as_json", is_flag=True, help="one JSON event per line, ending with the result object")
def migrate_resume(migration_id, as_json):
    """Finish a migration that failed after cutover (its result names the ID).

    Only the steps left run, forward: unlocking (the pooled copy turns read-only) and, with
    --drop-source-after, the source drop. Nothing is rolled back after cutover.
    """
    _follow_migration(client(), f"migrations/{migration_id}/resume", {}, as_json)


@migrate.command("discard")
@project_options
@click.option("--yes", is_flag=True, help="confirm: the staged stack's containers and data are deleted for good")
@click.option("--json", "as_json", is_flag=True)
def migrate_discard(slug, hash_, yes, as_json):
    """Remove the dedicated stack a --staged migration filled; the pooled project serves on."""
    result = _delete_for_good(slug, hash_, yes, "staged-stack", "discard deletes the staged stack and its data")
    emit(result, as_json, lambda r: click.echo(f"Discarded the staged stack of {r['slug']} on {r['discarded']}."
                                               + (f" Left alone: {r['untouched']}" if r.get("untouched") else "")))


@migrate.command("rollback")
@project_options
@click.option("--yes", is_flag=True, help="confirm: writes pause for about a second while the project moves back")
@click.option("--json", "as_json", is_flag=True)
def migrate_rollback(slug, hash_, yes, as_json):
    """Move a project an online migrate made v1_dedicated back to v2_shared, losing nothing.

    Within the rollback window the kept pooled copy follows every change the dedicated stack
    commits; rollback pauses writes, applies the last of them and the sequences, makes the pooled
    copy writable, switches routes back and resumes writes. The stack is kept (discard removes it).
    """
    slug, hash_ = resolve(slug, hash_)
    if not yes:
        raise click.UsageError("rollback moves the project back to v2_shared; pass --yes to go ahead")
    result = client().post(f"projects/{hash_}/migration/rollback", {"slug": slug}, timeout=300)
    emit(result, as_json, lambda r: click.echo(f"{r['message']} Writes paused {r['pauseSeconds']:.2f}s."))


@migrate.command("finalize")
@project_options
@click.option("--drop-source", is_flag=True, help="drop the pooled copy too (deleted for good)")
@click.option("--yes", is_flag=True, help="confirm: the project can no longer be rolled back")
@click.option("--json", "as_json", is_flag=True)
def migrate_finalize(slug, hash_, drop_source, yes, as_json):
    """End the rollback window of an online migrate now: the pooled copy stops following the
    dedicated stack and stays read-only (or, with --drop-source, is dropped)."""
    slug, hash_ = resolve(slug, hash_)
    if not yes:
        raise click.UsageError("finalize ends the rollback window for good; pass --yes to go ahead")
    result = client().post(f"projects/{hash_}/migration/finalize", {"slug": slug, "dropSource": drop_source},
                           timeout=300)
    emit(result, as_json, lambda r: click.echo(r["message"]))


@migrate.command("cleanup")
@project_options
@click.option("--yes", is_flag=True, help="confirm: the pooled copy's data is deleted for good")
@click.option("--json", "as_json", is_flag=True)
def migrate_cleanup(slug, hash_, yes, as_json):
    """Drop the read-only pooled copy a migrated project kept after cutover."""
    result = _delete_for_good(slug, hash_, yes, "pooled-copy", "cleanup deletes the pooled copy")
    emit(result, as_json, lambda r: click.echo(f"Dropped the pooled copy of {r['slug']} ({r['dropped']}, "
                                               f"{size(r['bytes'] or 0)})."))


def _delete_for_good(slug, hash_, yes, part: str, what: str) -> dict:
    """DELETE of a part of a project (`projects/HASH/PART`), only with --yes."""
    slug, hash_ = resolve(slug, hash_)
    if not yes:
        raise click.UsageError(f"{what} for good: add --yes")
    return client().request("DELETE", f"projects/{hash_}/{part}", params={"slug": slug})


@migrate.command("status")
@click.argument("migration_id", required=False)
@project_options
@click.option("--follow", is_flag=True, help="stay attached to a running migration: live progress until it ends")
@click.option("--json", "as_json", is_flag=True)
def migrate_status(migration_id, slug, hash_, follow, as_json):
    """Show a migration's plan: each step done, running, failed or left.

    Without an ID, the project's newest migration (-p/--hash, or flux.json). With --follow,
    re-attaches to a running migration's progress (after a dropped connection, say) and ends
    with its result.
    """
    api = client()
    if migration_id is None:
        slug, hash_ = resolve(slug, hash_)
        migration_id = api.get(f"projects/{hash_}/migration")["migrationId"]
    if follow:
        _follow_migration(api, f"migrations/{migration_id}/events", None, as_json)
        return
    result = api.get(f"migrations/{migration_id}")
    emit(result, as_json, render_migration_status)


def _follow_migration(api, path: str, body: dict | None, as_json: bool) -> None:
    show = MigrateProgress()
    result = None
    for event in api.stream(path, body):
        if as_json:
            click.echo(json.dumps({k: v for k, v in event.items() if k != "event"} if event.get("event") == "result"
                                  else event))
        else:
            show(event)
        if event.get("event") == "result":
            result = event
    if result is None:
        raise CliError("the control plane ended the stream without a result")
    if not result["ok"] and result.get("state") == "failed_after_cutover":
        raise CliError(f"migration failed after cutover in phase {result.get('phase')}: {result.get('error')}")
    if not result["ok"]:
        raise CliError(f"migration failed in phase {result.get('phase')}: {result.get('error')} "
                       "(rolled back: the pooled project keeps serving)")
    if not as_json:
        click.echo(result["message"])
        if result.get("dump"):
            d = result["dump"]
            click.echo(f"  dump on {d['host']}: {d['path']} ({size(d['bytes'])}, sha256 {d['sha256']})")
        if result.get("serviceUrl"):
            click.echo(f"  Service URL: {result['serviceUrl']}")


@cli.group()
def dumps():
    """Dump files a migrate wrote on the db host (encrypted; removed after the retention)."""


@dumps.command("list")
@project_options
@click.option("--all", "removed_too", is_flag=True, help="also the files already removed, with when and why")
@click.option("--json", "as_json", is_flag=True)
def dumps_list(slug, hash_, removed_too, as_json):
    """List a project's dump files: host, path, size, SHA-256 of the file as stored, created, state.

    The state is the db host's view now: kept, missing (gone from the host), changed (not the
    size recorded), unknown (the host cannot be asked) or removed.
    """
    slug, hash_ = resolve(slug, hash_)
    result = client().get(f"projects/{hash_}/dumps", params={"slug": slug, "all": str(removed_too).lower()})

    def render(r):
        items = r["dumps"]
        if not items:
            click.echo(f"No dump files for {slug}." + ("" if removed_too else " (--all shows removed ones)"))
        else:
            _table([[d["host"], d["path"], size(d["bytes"]), d["sha256"], (d["createdAt"] or "")[:19],
                     d["state"] + (f" ({d['removedWhy']})" if d.get("removedWhy") else "")]
                    for d in items], ["HOST", "PATH", "SIZE", "SHA256", "CREATED", "STATE"])
        click.echo(f"Dump files are removed {r['retentionDays']:g} days after they were written.")
        for problem in r.get("problems", []):
            click.secho(f"warning: {problem}", fg="yellow", err=True)

    emit(result, as_json, render)


@cli.command()
@project_options
@click.option("--schema-only", is_flag=True, help="definitions only, no rows")
@click.option("--data-only", is_flag=True, help="rows only, no definitions")
@click.option("--clean", is_flag=True, help="begin with DROP ... IF EXISTS for each object")
@click.option("--public-only", is_flag=True, help="a dedicated project: its API schema only, not the whole database")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="file to write (default: standard output)")
def dump(slug, hash_, schema_only, data_only, clean, public_only, output):
    """Print the project's data as pg_dump's plain SQL, as it is now (psql reads it).

    A pooled project's dump is its tenant schema; a dedicated one's is its whole database. The
    dump is checked to be complete: one cut short is an error (and with -o, no file is left).
    """
    import os

    if schema_only and data_only:
        raise click.UsageError("--schema-only and --data-only exclude each other")
    slug, hash_ = resolve(slug, hash_)
    params = {"slug": slug, **{key: "1" for key, on in (("schemaOnly", schema_only), ("dataOnly", data_only),
                                                         ("clean", clean), ("publicOnly", public_only)) if on}}
    target = open(f"{output}.partial", "wb") if output else sys.stdout.buffer
    tail = b""
    try:
        for _, data in client().download(f"projects/{hash_}/dump", params):
            target.write(data)
            tail = (tail + data)[-200:]
        if b"PostgreSQL database dump complete" not in tail:
            raise CliError("the dump was cut short (no \"dump complete\" line at its end)")
    except BaseException:
        if output:
            target.close()
            os.unlink(f"{output}.partial")
        raise
    if output:
        target.close()
        os.replace(f"{output}.partial", output)
        click.echo(f"wrote {output}", err=True)
    else:
        target.flush()


@cli.group()
def backup():
    """Backups: pg_dump archives kept encrypted on a backup host, proven by a restore.

    A real migrate and a delete need the project's newest backup to be restore-verified and
    newer than its last push: `flux backup create --verify` makes one.
    """


def _backup_rows(items: list[dict]) -> list[list[str]]:
    return [[b["id"], (b["createdAt"] or "")[:19], b["status"], size(b["sizeBytes"]) if b["sizeBytes"] else "-",
             b["rows"] if b["rows"] is not None else "-", b["artifactValidationStatus"] or "-",
             b["restoreVerificationStatus"] or "-", b["backupHost"]] for b in items]


_BACKUP_HEADERS = ["ID", "CREATED", "STATUS", "SIZE", "ROWS", "ARTIFACT", "RESTORE", "HOST"]


def _render_backup(b: dict) -> None:
    _table(_backup_rows([b]), _BACKUP_HEADERS)
    if b.get("restoreVerificationError"):
        click.secho(f"verification failed: {b['restoreVerificationError']}", fg="red", err=True)
    elif b.get("error"):
        click.secho(f"failed: {b['error']}", fg="red", err=True)


@backup.command("create")
@project_options
@click.option("--verify", is_flag=True, help="then restore it into a scratch database and compare (what the gate needs)")
@click.option("--json", "as_json", is_flag=True)
def backup_create(slug, hash_, verify, as_json):
    """Make a backup now: pg_dump next to the data, stored encrypted on a backup host."""
    slug, hash_ = resolve(slug, hash_)
    if not as_json:
        click.echo(f"Backing up {slug}" + (" and verifying the backup..." if verify else "..."), err=True)
    result = client().post(f"projects/{hash_}/backups", {"verify": verify}, params={"slug": slug}, timeout=6 * 3600)
    emit(result, as_json, lambda r: _render_backup(r["backup"]))
    b = result["backup"]
    if b["status"] != "complete" or (verify and b["restoreVerificationStatus"] != "restore_verified"):
        sys.exit(1)


@backup.command("list")
@project_options
@click.option("--json", "as_json", is_flag=True)
def backup_list(slug, hash_, as_json):
    """List the project's backups, newest first, and its schedule."""
    slug, hash_ = resolve(slug, hash_)
    result = client().get(f"projects/{hash_}/backups", params={"slug": slug})

    def render(r):
        if not r["backups"]:
            click.echo(f"No backups of {slug}; `flux backup create --verify` makes one.")
        else:
            _table(_backup_rows(r["backups"]), _BACKUP_HEADERS)
        sched = r.get("schedule")
        if sched:
            click.echo(f"Schedule: every {sched['everySeconds']}s, keeping {sched['keepDaily']} daily and "
                       f"{sched['keepWeekly']} weekly; next at {sched['nextAt'][:19]}"
                       + (f" (last run failed: {sched['lastError']})" if sched.get("lastError") else ""))

    emit(result, as_json, render)


@backup.command("verify")
@click.argument("backup_id", default="latest")
@project_options
@click.option("--json", "as_json", is_flag=True)
def backup_verify(backup_id, slug, hash_, as_json):
    """Check a backup (default: the newest): its file against the catalog, then a restore into a
    scratch database compared with its manifest. The scratch database is removed after."""
    slug, hash_ = resolve(slug, hash_)
    result = client().post(f"projects/{hash_}/backups/{backup_id}/verify", params={"slug": slug}, timeout=6 * 3600)
    emit(result, as_json, lambda r: _render_backup(r["backup"]))
    if not result["ok"]:
        sys.exit(1)


@backup.command("download")
@click.argument("backup_id", default="latest")
@project_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True,
              help="file to write the pg_dump archive to (custom format: pg_restore reads it)")
def backup_download(backup_id, slug, hash_, output):
    """Download a backup (default: the newest) as its pg_dump archive, checked against its sha256."""
    import hashlib
    import os

    slug, hash_ = resolve(slug, hash_)
    partial = f"{output}.partial"
    digest = hashlib.sha256()
    expected = None
    try:
        with open(partial, "wb") as out:
            for headers, data in client().download(f"projects/{hash_}/backups/{backup_id}/download", {"slug": slug}):
                expected = headers.get("x-flux-sha256")
                out.write(data)
                digest.update(data)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    if expected is None or digest.hexdigest() != expected:
        os.unlink(partial)
        raise CliError(f"the download does not match its sha256 ({digest.hexdigest()}, expected {expected}); "
                       "nothing was written")
    os.replace(partial, output)
    click.echo(f"{output}: sha256 {expected} (restore with pg_restore)")


@backup.command("restore")
@click.argument("backup_id")
@click.option("--to-new-project", "new_name", metavar="NAME",
              help="restore into a new dedicated project NAME instead of the backup's own project")
@click.option("--yes", is_flag=True, help="confirm: restoring into the project replaces its data with the backup's")
@click.option("--json", "as_json", is_flag=True)
def backup_restore(backup_id, new_name, yes, as_json):
    """Restore a restore-verified backup into its project (under maintenance, in one transaction),
    or into a new dedicated project; the result is compared with the backup's manifest."""
    if new_name is None and not yes:
        raise CliError("restoring into the project replaces its data with the backup's; pass --yes to confirm "
                       "(or --to-new-project NAME)", exit_code=2)
    result = client().post(f"backups/{backup_id}/restore", {"toNewProject": new_name} if new_name else {},
                           timeout=6 * 3600)

    def render(r):
        where = f"new project {r['project']} ({r['hash']})" if r.get("created") else f"{r['project']} ({r['hash']})"
        click.echo(f"Restored backup {r['backupId']} into {where}: {r['tables']} tables, {r['rows']} rows.")
        for problem in r["problems"]:
            click.secho(f"differs from the backup: {problem}", fg="red", err=True)

    emit(result, as_json, render)
    if not result["ok"]:
        sys.exit(1)


@backup.command("schedule")
@project_options
@click.option("--every", help="how often, like 24h or 6h (at least 1m)")
@click.option("--keep-daily", type=click.IntRange(0, 1000), default=7, show_default=True,
              help="keep the newest backup of each of this many days")
@click.option("--keep-weekly", type=click.IntRange(0, 1000), default=4, show_default=True,
              help="keep the newest backup of each of this many weeks")
@click.option("--off", is_flag=True, help="stop the schedule (backups made so far are kept)")
@click.option("--json", "as_json", is_flag=True)
def backup_schedule(slug, hash_, every, keep_daily, keep_weekly, off, as_json):
    """Have the controller back the project up (and verify it) on a schedule, with retention."""
    if bool(every) == off:
        raise click.UsageError("give --every DURATION, or --off")
    slug, hash_ = resolve(slug, hash_)
    body = {"everySeconds": None if off else parse_duration(every), "keepDaily": keep_daily,
            "keepWeekly": keep_weekly}
    result = client().request("PUT", f"projects/{hash_}/backup-schedule", json_body=body, params={"slug": slug})

    def render(r):
        if r["schedule"] is None:
            click.echo(f"No backup schedule for {slug}.")
        else:
            sched = r["schedule"]
            click.echo(f"{slug} is backed up every {sched['everySeconds']}s (keeping {sched['keepDaily']} daily, "
                       f"{sched['keepWeekly']} weekly); next at {sched['nextAt'][:19]}.")

    emit(result, as_json, render)


@cli.group()
def dev():
    """A local fleet on this machine, for development and demos."""


DEV_DIR_HELP = "where the fleet keeps its state and logs (default ~/.flux/dev)"


def _dev_dir(directory: str | None) -> pathlib.Path:
    return pathlib.Path(directory) if directory else config_mod.config_dir() / "dev"


def _devtools():
    """The local fleet's module: part of a source checkout, not of the installed packages."""
    try:
        from devtools import fleet
    except ImportError:
        raise CliError("`flux dev` needs Flux's development tools, which the flux-cli package does not ship; "
                       "run it from a source checkout (bash packaging/dev-setup.sh)") from None
    return fleet


@dev.command("up")
@click.option("--dir", "directory", help=DEV_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object describing the fleet")
@click.option("--login/--no-login", default=True, show_default=True,
              help="store the fleet's API base and token in ~/.flux/config.json")
@click.option("--hosts", is_flag=True,
              help="run the controller, db, docker, gateway and backup hosts each in a network namespace "
                   "of its own, on a bridge made for the fleet (root only; the docker host gets its own "
                   "Docker engine); a fleet made so keeps its hosts")
def dev_up(directory, as_json, login, hosts):
    """Start (or reuse) the catalog and shared clusters, the controller, one agent per role and the
    pooled API stand-in on this machine."""
    devfleet = _devtools()
    fleet = devfleet.DevFleet(_dev_dir(directory), say=devfleet.Progress(quiet=as_json), hosts=hosts)
    result = fleet.up()
    if login:
        config_mod.save(config_mod.Settings(result["api_base"], result["token"]))

    def render(r):
        click.echo(f"Local fleet is up ({'reused: ' + ', '.join(r['reused']) if r['reused'] else 'started'}).")
        for key in ("api_base", "gateway_url", "base_domain", "gateway_ca", "http", "grpc", "enroll", "catalog",
                    "shared_cluster", "pooled_postgrest", "dir", "logs"):
            click.echo(f"  {key:16} {r[key]}")
        click.echo(f"  {'agents':16} {', '.join(r['agents'])}")
        for name, address in r["metrics"].items():
            click.echo(f"  {'metrics ' + name:16} {address}")
        for host in r.get("hosts", []):
            click.echo(f"  {'host ' + host['name']:16} {host['address']} (netns {host['netns']}: "
                       f"{', '.join(host['runs'])})")
        click.echo(f"  {'token':16} {r['token']}")

    emit(result, as_json, render)


@dev.command("demo")
@click.option("--dir", "directory", help=DEV_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object with what the demo did")
def dev_demo(directory, as_json):
    """Bring up the local fleet, create Bloom Atelier on v2_shared with sample rows, and migrate it
    to v1_dedicated (dry run, staged, full) with progress shown; then list projects and read the
    same rows through the same Service URL."""
    devfleet = _devtools()
    from devtools.demo import Demo, print_list

    say = devfleet.Progress(quiet=as_json)
    info = devfleet.DevFleet(_dev_dir(directory), say=say).up()
    config_mod.save(config_mod.Settings(info["api_base"], info["token"]))
    show = MigrateProgress()

    def follow(events):
        result = {}
        for event in events:
            if not as_json:
                show(event)
            if event.get("event") == "result":
                result = event
        return result

    result = Demo(info, say).run(follow)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo("flux list:")
    print_list(result["list"])
    click.echo(f"Rows before and after, through {result['project']['serviceUrl']}: {json.dumps(result['after'])}")


@dev.command("down")
@click.option("--dir", "directory", help=DEV_DIR_HELP)
@click.option("--json", "as_json", is_flag=True)
def dev_down(directory, as_json):
    """Stop everything `flux dev up` started; data is kept for the next `up`. A fleet on separate
    hosts loses its namespaces, bridge and firewall rule too (`up` makes them again)."""
    devfleet = _devtools()
    stopped = devfleet.DevFleet(_dev_dir(directory), say=devfleet.Progress(quiet=as_json)).down()
    emit({"stopped": stopped}, as_json,
         lambda r: click.echo("Stopped: " + ", ".join(r["stopped"]) if r["stopped"] else "Nothing was running."))


def log_path() -> pathlib.Path:
    return config_mod.config_dir() / "flux.log"


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except CliError as exc:
        click.secho(f"error: {exc.message}", fg="red", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.secho("aborted", fg="red", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception:
        path = log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(traceback.format_exc())
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        click.secho(f"unexpected error; details were written to {path}", fg="red", err=True)
        sys.exit(1)
