"""Dedicated stacks (docker role): a project's own Postgres and PostgREST containers.

Everything a stack has is named from the project and labelled `flux.managed=true`:
network `flux-<hash>-<slug>-net`, volume `...-db-data`, containers `...-db` and `...-api`.
Provisioning is idempotent and reports each step as ok or changed; observing reads
only what the Docker engine shows.

Names are global on a Docker host, so an object found under one of the project's names is
used, started, stopped or removed only if its `flux.project` label is the project's id;
any other object there fails the step with an error naming it, and is left as it is.
"""

import datetime
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass

import docker
import httpx
import jwt
import psycopg
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from psycopg import sql

from contract.failures import FailureKind
from contract.stacks import MANAGED_API_ENV, StackRef

from .apiroles import API_ROLES_AND_LEDGER
from .plainhttp import NO_TLS
from .ports import free_port
from ..errors import AgentError
from ..runtime.settings import DockerSettings

_SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_HASH = re.compile(r"^[0-9a-f]{7}$")
_SCHEMA = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
DB_PORT, API_PORT = 5432, 3000
READY_TIMEOUT_S = 90
# A stack's Postgres. wal_level=logical: after a cutover, a slot here carries the stack's changes
# back to the kept pooled copy for the rollback window.
DB_COMMAND = ["postgres", "-c", "wal_level=logical"]
# While a migration fills a new stack: rows loaded into a table made or truncated in the loading
# transaction write no WAL (the table's files are synced at commit instead), which makes the copy
# about 1.4 times as fast. The container has no CPU or memory limit meanwhile (the load is one
# burst): at one CPU the copy took 1.3 times as long, and under a memory limit smaller than the
# data the page cache loses the rows before the indexes are built from them (at 1.2 GB and 512
# MiB, building the key took 1.2 s instead of 0.4 s). Nothing can stream or decode from it
# meanwhile: bootstrap (after the copy) makes it again with DB_COMMAND and the usual limits.
# It runs with fsync off too: the load's files then reach the disk as the kernel writes them back
# rather than in one synchronous burst at each table's commit (at 1.2 GB the copy took 2.7 to 5.5
# s with it, 2.7 to 3.0 s without). What was loaded is made durable before the stack is used:
# end_bulk_load stops the database cleanly and syncs the file systems before it starts again with
# fsync on, as PostgreSQL's documentation asks when fsync is turned back on. A crash of the host
# before that loses only a stack no one uses yet (the migration rolls back and removes it).
BULK_LOAD_COMMAND = ["postgres", "-c", "wal_level=minimal", "-c", "max_wal_senders=0", "-c", "fsync=off"]


@dataclass(frozen=True)
class StackSpec:
    project_id: str
    slug: str
    hash: str
    api_schema: str = "api"
    jwt_secret: str = ""
    postgres_password: str = ""
    authenticator_password: str = ""
    api_port: int | None = None
    db_port: int | None = None
    # Set for projects migrated from the pooled engine: their app tokens act as this role,
    # and anonymous requests get nothing they did not have before.
    app_role: str | None = None
    # A new stack a migration is about to fill: its Postgres starts with BULK_LOAD_COMMAND.
    bulk_load: bool = False
    # PostgREST settings the owner chose; None leaves the API container's as they are.
    api_env: dict | None = None

    @classmethod
    def from_params(cls, params: StackRef) -> "StackSpec":
        """The stack of a job's params; secrets stay empty for a job that is sent none."""
        spec = cls(**{k: getattr(params, k) for k in cls.__dataclass_fields__ if hasattr(params, k)})
        if not _SLUG.match(spec.slug) or not _HASH.match(spec.hash):
            raise AgentError(f"invalid slug {spec.slug!r} or hash {spec.hash!r}", kind=FailureKind.INVALID)
        if not _SCHEMA.match(spec.api_schema):
            raise AgentError(f"invalid API schema {spec.api_schema!r}", kind=FailureKind.INVALID)
        return spec

    @property
    def prefix(self) -> str:
        return f"flux-{self.hash}-{self.slug}"

    @property
    def network(self) -> str:
        return f"{self.prefix}-net"

    @property
    def volume(self) -> str:
        return f"{self.prefix}-db-data"

    @property
    def db(self) -> str:
        return f"{self.prefix}-db"

    @property
    def api(self) -> str:
        return f"{self.prefix}-api"

    def labels(self, component: str) -> dict:
        return {"flux.managed": "true", "flux.slug": self.slug, "flux.hash": self.hash,
                "flux.project": self.project_id, "flux.component": component}


def client() -> docker.DockerClient:
    try:
        engine = docker.from_env(timeout=60)
        engine.ping()
        return engine
    except DockerException as exc:
        raise AgentError(f"cannot reach the Docker engine: {exc}", retryable=True,
                         kind=FailureKind.UNAVAILABLE) from None


def _get(collection, name: str):
    try:
        return collection.get(name)
    except NotFound:
        return None


def _labels(item) -> dict:
    """Labels of a container (under Config), a volume or a network (top level)."""
    attrs = item.attrs or {}
    return (attrs.get("Config") or {}).get("Labels") or attrs.get("Labels") or {}


def _foreign(item, kind: str, name: str, spec: StackSpec) -> str | None:
    """Why `item` is not this project's to touch, or None if it is."""
    owner = _labels(item).get("flux.project")
    if owner == spec.project_id:
        return None
    held = f"flux.project label {owner[:80]!r}" if owner else "no flux.project label"
    return f"{kind} {name} has {held}, not this project's ({spec.project_id})"


def _refuse(reasons: list[str]) -> AgentError:
    return AgentError(f"not touching Docker objects that belong to another project: {'; '.join(reasons)}",
                      kind=FailureKind.FOREIGN)


def _own(collection, kind: str, name: str, spec: StackSpec):
    """The project's object under `name`, None if there is none; fails if another owns the name."""
    item = _get(collection, name)
    if item is not None:
        reason = _foreign(item, kind, name, spec)
        if reason:
            raise _refuse([reason])
    return item


def _published_port(container, port: int) -> int | None:
    container.reload()
    bindings = (container.attrs.get("HostConfig", {}).get("PortBindings") or {}).get(f"{port}/tcp") or []
    return int(bindings[0]["HostPort"]) if bindings and bindings[0].get("HostPort") else None


def _ensure_image(engine, image: str) -> None:
    try:
        engine.images.get(image)
    except ImageNotFound:
        try:
            engine.images.pull(image)
        except DockerException as exc:
            raise AgentError(f"image {image} is not on this host and cannot be pulled: {exc}",
                             kind=FailureKind.UNAVAILABLE) from None


def _ensure_running(container) -> str:
    container.reload()
    if container.status == "running":
        return "ok"
    container.start()
    return "changed"


# Docker runs a container's health check as a new process in it, and each costs the engine tens
# of milliseconds of CPU: at every second or two, 15 stacks kept a 2-core docker host 60% busy.
# Nothing waits on them (a stack is ready once its database answers, wait_for_db); they show a
# stack's state in `docker ps` and to the engine's own tools, for which every 30 s will do.
# Nanoseconds, as the engine's API takes them.
HEALTH_TIMING = {"interval": 30_000_000_000, "timeout": 5_000_000_000, "retries": 3,
                 "start_period": 60_000_000_000}


def _run(engine, settings: DockerSettings, image: str, limited: bool = True, **kwargs):
    _ensure_image(engine, image)
    limits = {"mem_limit": settings.memory_limit, "nano_cpus": int(settings.cpus * 1e9)} if limited else {}
    kwargs["labels"] = {**settings.labels, **kwargs["labels"]}
    return engine.containers.run(image, detach=True, restart_policy={"Name": settings.restart_policy},
                                 **limits, **kwargs)


def _run_db(engine, settings: DockerSettings, spec: StackSpec, port: int, command: list[str]):
    # SIGINT, as the official image has it: a fast shutdown, which does not wait for PostgREST's
    # connections to end (SIGTERM's smart shutdown does, until Docker kills it).
    return _run(engine, settings, settings.postgres_image, limited=command != BULK_LOAD_COMMAND,
                name=spec.db, network=spec.network,
                hostname="db", labels=spec.labels("db"), command=command, stop_signal="SIGINT",
                environment={"POSTGRES_PASSWORD": spec.postgres_password},
                volumes={spec.volume: {"bind": "/var/lib/postgresql/data", "mode": "rw"}},
                ports={f"{DB_PORT}/tcp": (settings.publish_host, port)},
                healthcheck={"test": ["CMD", "pg_isready", "-U", "postgres", "-h", "127.0.0.1"], **HEALTH_TIMING})


def _command(container) -> list[str]:
    return list(container.attrs.get("Config", {}).get("Cmd") or [])


def end_bulk_load(engine, settings: DockerSettings, spec: StackSpec) -> float | None:
    """A stack whose Postgres still runs with BULK_LOAD_COMMAND is made again with DB_COMMAND, on
    the same volume and port, and its API restarted (its pooled connections died with the
    database). Returns the seconds until both answer again, or None when nothing had to change."""
    db = _own(engine.containers, "container", spec.db, spec)
    if db is None:
        raise AgentError(f"{spec.db} does not exist", kind=FailureKind.NOT_FOUND)
    if _command(db) != BULK_LOAD_COMMAND:
        return None
    started = time.monotonic()
    port = _published_port(db, DB_PORT)
    api = _own(engine.containers, "container", spec.api, spec)
    # Nothing routes to a stack a migration is still filling: no request to let finish, so its API
    # is killed and started again meanwhile; it connects to the database when asked.
    failed: list[BaseException] = []

    def restart_api() -> None:
        try:
            api.restart(timeout=0)
        except BaseException as exc:  # noqa: BLE001 - raised below, in the job's thread
            failed.append(exc)

    restart = threading.Thread(target=restart_api, daemon=True) if api else None
    db.stop(timeout=60)
    if restart:
        restart.start()
    db.remove()
    # Every file the load wrote, on the disk before fsync is on again (the volume is on this host's
    # engine, beside this agent).
    os.sync()
    _run_db(engine, settings, spec, port, DB_COMMAND)
    wait_for_db(_db_url(spec, settings, port))
    if restart:
        restart.join(60)
    if failed:
        raise failed[0]
    return round(time.monotonic() - started, 3)


def _db_url(spec: StackSpec, settings: DockerSettings, port: int, user: str = "postgres", password: str | None = None) -> str:
    secret = urllib.parse.quote(password if password is not None else spec.postgres_password, safe="")
    return f"postgresql://{user}:{secret}@{settings.advertise_host}:{port}/postgres"


def wait_for_db(url: str, timeout: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
                return
        except psycopg.OperationalError as exc:
            last = str(exc).strip().splitlines()[0] if str(exc).strip() else "not ready"
            time.sleep(0.2)
    raise AgentError(f"the project's Postgres did not accept connections within {timeout:g}s: {last}",
                     retryable=True, kind=FailureKind.TIMEOUT)


BOOTSTRAP = API_ROLES_AND_LEDGER + """
ALTER ROLE service_role WITH NOLOGIN BYPASSRLS;
GRANT anon, authenticated, service_role TO authenticator;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role;
"""

API_SCHEMA_GRANTS = [
    "CREATE SCHEMA IF NOT EXISTS {s}",
    "GRANT USAGE ON SCHEMA {s} TO {r}",
    "GRANT ALL ON ALL TABLES IN SCHEMA {s} TO {r}",
    "GRANT ALL ON ALL SEQUENCES IN SCHEMA {s} TO {r}",
    "GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {s} TO {r}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT ALL ON TABLES TO {r}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT ALL ON SEQUENCES TO {r}",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT EXECUTE ON FUNCTIONS TO {r}",
]
# anon (requests with the anon key) may see the schema and nothing in it until the project grants
# it something: no default privileges, and functions are not executable by PUBLIC by default.
ANON_DEFAULTS = [
    "GRANT USAGE ON SCHEMA {s} TO anon",
    "ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} REVOKE ALL ON TABLES FROM anon",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} REVOKE ALL ON SEQUENCES FROM anon",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} REVOKE ALL ON FUNCTIONS FROM anon",
]
# Stacks bootstrapped when anon got everything by default lose those grants once, when they are
# next bootstrapped; grants a project gives anon after that are its own and stay.
ANON_CONVERSION = [
    "REVOKE ALL ON ALL TABLES IN SCHEMA {s} FROM anon",
    "REVOKE ALL ON ALL SEQUENCES IN SCHEMA {s} FROM anon",
    "REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {s} FROM anon, PUBLIC",
]
ANON_CONVERTED = "flux: anon holds only what the project grants"


def bootstrap_roles(url: str, spec: StackSpec) -> str:
    """Roles, grants and helpers PostgREST needs; returns ok or changed."""
    with psycopg.connect(url) as conn, conn.transaction():
        before = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname IN"
                              " ('authenticator', 'anon', 'authenticated', 'service_role')").fetchone()[0]
        schema_existed = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                                      (spec.api_schema,)).fetchone() is not None
        conn.execute(BOOTSTRAP)
        conn.execute(sql.SQL("ALTER ROLE authenticator PASSWORD {}").format(sql.Literal(spec.authenticator_password)))
        # A migrated schema keeps the grants it had; only service_role is added.
        grantees = ["service_role"] if spec.app_role else ["authenticated", "service_role"]
        roles = sql.SQL(", ").join(sql.Identifier(r) for r in grantees)
        schema = sql.Identifier(spec.api_schema)
        for statement in API_SCHEMA_GRANTS:
            conn.execute(sql.SQL(statement).format(s=schema, r=roles))
        if not spec.app_role:
            converted = conn.execute("SELECT shobj_description('anon'::regrole, 'pg_authid')").fetchone()[0]
            for statement in ANON_DEFAULTS + ([] if converted == ANON_CONVERTED else ANON_CONVERSION):
                conn.execute(sql.SQL(statement).format(s=schema))
            conn.execute(sql.SQL("COMMENT ON ROLE anon IS {}").format(sql.Literal(ANON_CONVERTED)))
    return "ok" if before == 4 and schema_existed else "changed"


def service_role_token(secret: str, ttl_s: int = 60) -> str:
    now = int(time.time())
    return jwt.encode({"role": "service_role", "iat": now, "exp": now + ttl_s}, secret, algorithm="HS256")


def probe(settings: DockerSettings, spec: StackSpec, api_port: int, timeout: float = READY_TIMEOUT_S) -> dict:
    """A request as service_role, signed with the project's secret: ok, or PostgREST's exact complaint."""
    url = f"http://{settings.advertise_host}:{api_port}/"
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = httpx.get(url, headers={"Authorization": f"Bearer {service_role_token(spec.jwt_secret)}"},
                                 timeout=5, verify=NO_TLS)
            break
        except httpx.TransportError as exc:
            if time.monotonic() > deadline:
                raise AgentError(f"PostgREST at {url} did not answer within {timeout:g}s: {exc}",
                                 retryable=True, kind=FailureKind.TIMEOUT) from None
            time.sleep(0.5)
    if response.status_code == 200:
        return {"status": 200}
    try:
        message = response.json().get("message") or response.text
    except ValueError:
        message = response.text
    raise AgentError(f"PostgREST probe failed ({response.status_code}): {message}")


def provision(spec: StackSpec, settings: DockerSettings, progress=None) -> dict:
    engine = client()
    steps: dict[str, str] = {}
    say = progress or (lambda *a: None)
    try:
        say("network", 0, 6, "steps", spec.network)
        if _own(engine.networks, "network", spec.network, spec) is None:
            engine.networks.create(spec.network, driver="bridge",
                                   labels={**settings.labels, **spec.labels("network")})
            steps["network"] = "changed"
        else:
            steps["network"] = "ok"

        say("volume", 1, 6, "steps", spec.volume)
        if _own(engine.volumes, "volume", spec.volume, spec) is None:
            engine.volumes.create(spec.volume, labels={**settings.labels, **spec.labels("volume")})
            steps["volume"] = "changed"
        else:
            steps["volume"] = "ok"

        say("database", 2, 6, "steps", spec.db)
        db = _own(engine.containers, "container", spec.db, spec)
        if db is None:
            db_port = spec.db_port or free_port(settings.publish_host)
            db = _run_db(engine, settings, spec, db_port, BULK_LOAD_COMMAND if spec.bulk_load else DB_COMMAND)
            steps["db container"] = "changed"
        else:
            steps["db container"] = _ensure_running(db)
        db_port = _published_port(db, DB_PORT)
        admin_url = _db_url(spec, settings, db_port)
        wait_for_db(admin_url)

        say("bootstrap", 3, 6, "steps", "roles and grants")
        steps["role bootstrap"] = bootstrap_roles(admin_url, spec)

        say("api", 4, 6, "steps", spec.api)
        api = _own(engine.containers, "container", spec.api, spec)
        kept_port = None
        custom = _chosen_env(api) if api is not None else {}
        chosen = spec.api_env if spec.api_env is not None else custom
        if api is not None and (_env(api).get("PGRST_JWT_SECRET") != spec.jwt_secret
                                or (spec.api_env is not None and _labels(api).get(API_ENV_LABEL, _digest({}))
                                    != _digest(spec.api_env))):
            # A rotated secret (a staged stack cut over with --new-jwt-secret, or a rotation rolled
            # back) or settings the owner changed: PostgREST reads them at start, so the container
            # is made again on the same port.
            kept_port = _published_port(api, API_PORT)
            api.remove(force=True)
            api = None
        if api is None:
            api_port = spec.api_port or kept_port or free_port(settings.publish_host)
            password = urllib.parse.quote(spec.authenticator_password, safe="")
            environment = {
                "PGRST_DB_URI": f"postgres://authenticator:{password}@{spec.db}:{DB_PORT}/postgres",
                "PGRST_DB_SCHEMAS": spec.api_schema,
                "PGRST_DB_ANON_ROLE": "anon",
                "PGRST_JWT_SECRET": spec.jwt_secret,
                "PGRST_SERVER_HOST": "0.0.0.0",
                "PGRST_SERVER_PORT": str(API_PORT),
                **chosen,
            }
            extra = {"healthcheck": {"test": settings.api_healthcheck, **HEALTH_TIMING}} if settings.api_healthcheck else {}
            api = _run(engine, settings, settings.postgrest_image, name=spec.api, network=spec.network,
                       labels={**spec.labels("api"), API_ENV_LABEL: _digest(chosen)}, environment=environment,
                       ports={f"{API_PORT}/tcp": (settings.publish_host, api_port)}, **extra)
            steps["api container"] = "changed"
        else:
            steps["api container"] = _ensure_running(api)
        api_port = _published_port(api, API_PORT)

        say("probe", 5, 6, "steps", "service_role request")
        probe(settings, spec, api_port)
        steps["probe"] = "ok"
        say("done", 6, 6, "steps", "")
    except APIError as exc:
        said = str(exc.explanation or exc)
        if "address pool" in said:
            # About 30 with the engine's defaults: each project's network takes one.
            said += ("; every dedicated project has a network of its own: give the engine more address pools "
                     "(default-address-pools in /etc/docker/daemon.json) or remove networks no longer used")
        raise AgentError(f"Docker refused a step for {spec.prefix}: {said}") from None
    return {"steps": steps, "changed": any(v == "changed" for v in steps.values()),
            "api_upstream": f"{settings.advertise_host}:{api_port}", "api_port": api_port,
            "db_host": settings.advertise_host, "db_port": db_port}


def _env(container) -> dict[str, str]:
    return dict(item.split("=", 1) for item in container.attrs.get("Config", {}).get("Env") or [] if "=" in item)


def _chosen_env(container) -> dict[str, str]:
    """The PostgREST settings of an API container that Flux does not set itself (the image's own
    defaults among them: what changed is told by API_ENV_LABEL, not by these)."""
    return {k: v for k, v in _env(container).items() if k.startswith("PGRST_") and k not in MANAGED_API_ENV}


# The API container's label holding a digest of the settings its owner chose when it was made.
API_ENV_LABEL = "flux.api-env"


def _digest(env: dict) -> str:
    return hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]


def _containers(engine, spec: StackSpec) -> dict:
    found = engine.containers.list(all=True, filters={"label": ["flux.managed=true", f"flux.hash={spec.hash}",
                                                                f"flux.slug={spec.slug}"]})
    return {c.name: c for c in found}


def observe(spec: StackSpec) -> dict:
    """Running, Stopped, Partial, Missing or Drift, from the containers the engine shows."""
    engine = client()
    present = _containers(engine, spec)
    for name in (spec.db, spec.api):
        holder = None if name in present else _get(engine.containers, name)
        if holder is not None:
            present[name] = holder
    states = {name: present[name].status if name in present else "missing" for name in (spec.db, spec.api)}
    foreign = [c.name for c in present.values() if c.labels.get("flux.project") != spec.project_id]
    unexpected = [name for name in present if name not in (spec.db, spec.api)]
    state = "Drift" if foreign or unexpected else _state(list(states.values()))
    return {"state": state, "containers": states, "foreign": foreign + unexpected}


def _state(containers: list[str]) -> str:
    """A stack's state from its containers' ("missing" for one that is not there)."""
    if all(s == "missing" for s in containers):
        return "Missing"
    if all(s == "running" for s in containers):
        return "Running"
    if all(s in ("exited", "created") for s in containers):
        return "Stopped"
    return "Partial"


def report() -> dict[str, str]:
    """Every stack in the engine from one listing: project id (its flux.project label) to Running,
    Stopped, Partial, or Drift when a container of another owner holds one of its names."""
    engine = client()
    try:
        # Every container named like a stack's (a name filter matches a substring), ours or not.
        listed = engine.api.containers(all=True, filters={"name": "flux-"})
    except DockerException as exc:
        raise AgentError(f"cannot reach the Docker engine: {exc}", retryable=True,
                         kind=FailureKind.UNAVAILABLE) from None
    finally:
        engine.close()
    owners = {}
    stacks: dict[str, dict[str, str]] = {}
    prefixes: dict[str, str] = {}
    for container in listed:
        labels = container.get("Labels") or {}
        project, component = labels.get("flux.project"), labels.get("flux.component")
        for name in container.get("Names") or []:
            owners[name.lstrip("/")] = project
        if labels.get("flux.managed") == "true" and project and component in ("db", "api"):
            stacks.setdefault(project, {"db": "missing", "api": "missing"})[component] = container.get("State", "")
            prefixes[project] = f"flux-{labels.get('flux.hash')}-{labels.get('flux.slug')}"
    seen = {}
    for project, states in stacks.items():
        held = [c for c, s in states.items() if s == "missing"
                and owners.get(f"{prefixes[project]}-{c}", project) != project]
        seen[project] = "Drift" if held else _state(list(states.values()))
    return seen


def stop(spec: StackSpec) -> dict:
    engine = client()
    changed = []
    containers = [(name, _own(engine.containers, "container", name, spec)) for name in (spec.api, spec.db)]
    for name, container in containers:
        if container is not None and container.status != "exited":
            container.stop(timeout=15)
            changed.append(name)
    return {"stopped": changed}


def start(spec: StackSpec, settings: DockerSettings) -> dict:
    engine = client()
    db, api = (_own(engine.containers, "container", n, spec) for n in (spec.db, spec.api))
    missing = [n for n, c in ((spec.db, db), (spec.api, api)) if c is None]
    if missing:
        raise AgentError(f"cannot start {spec.prefix}: {', '.join(missing)} missing; run repair",
                         kind=FailureKind.CONFLICT)
    _ensure_running(db)
    wait_for_db(_db_url(spec, settings, _published_port(db, DB_PORT)))
    _ensure_running(api)
    api_port = _published_port(api, API_PORT)
    probe(settings, spec, api_port)
    return {"api_upstream": f"{settings.advertise_host}:{api_port}"}


def remove(spec: StackSpec) -> dict:
    """Removes the project's own objects; fails afterwards, naming them, if others hold its names."""
    engine = client()
    removed, refused = [], []
    for kind, collection, name in (("container", engine.containers, spec.api),
                                   ("container", engine.containers, spec.db),
                                   ("volume", engine.volumes, spec.volume),
                                   ("network", engine.networks, spec.network)):
        item = _get(collection, name)
        if item is None:
            continue
        reason = _foreign(item, kind, name, spec)
        if reason:
            refused.append(reason)
            continue
        try:
            item.remove(force=True) if kind == "container" else item.remove()
        except APIError as exc:
            raise AgentError(f"Docker refused to remove {kind} {name}: {exc.explanation or exc}") from None
        removed.append(name)
    if refused:
        raise _refuse(refused)
    return {"removed": removed}


# A log line longer than this is cut (a job's result must stay well under a message's limit).
MAX_LOG_LINE = 4096


def logs(spec: StackSpec, service: str, tail: int, since: str | None) -> dict:
    """The last `tail` lines of the stack's api or db container, or at most `tail` of those after
    `since` (an engine timestamp of a line seen before, or an `until` this returned); each with
    the engine's timestamp. `until` is where the next call takes up."""
    engine = client()
    name = spec.api if service == "api" else spec.db
    container = _own(engine.containers, "container", name, spec)
    if container is None:
        raise AgentError(f"{name} does not exist", kind=FailureKind.NOT_FOUND)
    # Read before the lines: a line logged while they are read is after it, and comes next time.
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    kwargs = {"timestamps": True, "tail": tail}
    after = _stamp(since) if since else None
    if after:
        kwargs.update(since=after[0], tail="all")  # whole seconds: the lines seen before are dropped below
    raw = container.logs(stdout=True, stderr=True, **kwargs).decode(errors="replace")
    lines, until = [], _stamp(now)
    for text in raw.split("\n"):
        at, _, line = text.partition(" ")
        try:
            stamp = _stamp(at)
        except AgentError:
            continue  # no line of the engine's (an empty end)
        if (after and stamp <= after) or stamp > until:
            continue  # seen before, or one the next call returns
        lines.append({"at": at, "line": line.rstrip("\r")[:MAX_LOG_LINE]})
    lines = lines[:tail] if after else lines[-tail:]
    container.reload()
    return {"lines": lines, "running": container.status == "running",
            "until": lines[-1]["at"] if after and len(lines) == tail else now}


def _stamp(stamp: str) -> tuple[int, int]:
    """(seconds since the epoch, nanoseconds) of an engine timestamp, 2026-11-27T03:12:44.1234Z
    (RFC 3339 with up to nine digits of fraction, trailing zeros dropped)."""
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    try:
        seconds = datetime.datetime.fromisoformat(whole).replace(tzinfo=datetime.timezone.utc).timestamp()
        return int(seconds), int((fraction + "000000000")[:9])
    except ValueError:
        raise AgentError(f"{stamp[:40]!r} is no engine timestamp", kind=FailureKind.INVALID) from None


def find(hash_: str) -> dict:
    """The engine's containers, volumes and networks labelled with `hash_`, by the project their
    `flux.project` label names."""
    engine = client()
    found: dict[str, dict] = {}
    selector = {"label": ["flux.managed=true", f"flux.hash={hash_}"]}
    for kind, items in (("container", engine.containers.list(all=True, filters=selector)),
                        ("volume", engine.volumes.list(filters=selector)),
                        ("network", engine.networks.list(filters=selector))):
        for item in items:
            labels = _labels(item)
            owner = labels.get("flux.project") or ""
            entry = found.setdefault(owner, {"project_id": owner, "slug": labels.get("flux.slug") or "",
                                             "objects": []})
            entry["objects"].append(f"{kind} {item.name}")
    return {"stacks": list(found.values())}


def probe_only(spec: StackSpec, settings: DockerSettings) -> dict:
    engine = client()
    api = _own(engine.containers, "container", spec.api, spec)
    if api is None:
        raise AgentError(f"{spec.api} does not exist", kind=FailureKind.NOT_FOUND)
    return probe(settings, spec, _published_port(api, API_PORT), timeout=15)


def admin_url(spec: StackSpec, settings: DockerSettings) -> str:
    engine = client()
    db = _own(engine.containers, "container", spec.db, spec)
    if db is None:
        raise AgentError(f"{spec.db} does not exist", kind=FailureKind.NOT_FOUND)
    return _db_url(spec, settings, _published_port(db, DB_PORT))


def bootstrap(spec: StackSpec, settings: DockerSettings) -> dict:
    """Role bootstrap again, e.g. after a restore brought new tables; a stack a migration filled in
    bulk-load mode first goes back to its usual Postgres settings (end_bulk_load)."""
    try:
        restarted = end_bulk_load(client(), settings, spec)
    except APIError as exc:
        raise AgentError(f"Docker refused to restart {spec.db} with its usual settings: "
                         f"{exc.explanation or exc}") from None
    return {"role bootstrap": bootstrap_roles(admin_url(spec, settings), spec), "restarted_s": restarted}


def postgres_major(settings: DockerSettings) -> int:
    """The Postgres major of the configured image, from its PG_MAJOR or its PATH."""
    engine = client()
    _ensure_image(engine, settings.postgres_image)
    env = engine.images.get(settings.postgres_image).attrs.get("Config", {}).get("Env") or []
    for entry in env:
        key, _, value = entry.partition("=")
        if key == "PG_MAJOR" and value.split(".")[0].isdigit():
            return int(value.split(".")[0])
        match = re.search(r"/usr/lib/postgresql/(\d+)/bin", value) if key == "PATH" else None
        if match:
            return int(match.group(1))
    raise AgentError(f"cannot tell the Postgres major version of {settings.postgres_image}")
