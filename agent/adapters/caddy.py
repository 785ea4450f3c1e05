"""The gateway role: Caddy at the edge, this agent answering its forward_auth requests.

For each request Caddy asks `GET /verify` here with the original Host, method and
Authorization. The answer is 404 (unknown host), 401 (missing or bad token: every
request to every project carries one, the anon key included), 503
(a write while the project is migrating) or 200 with the headers Caddy copies onto
the proxied request: a short-lived pool token for the tenant's runtime role and the
pinned profile. Routes come from the controller (`gateway.sync`, a whole table or a
delta against the version held here, in one or more parts applied together), are saved
to disk, and are served from there when the controller is down, for as long as the
gateway's lease lasts: it asks the controller to renew the lease a few times per lease,
and answers every request with 503 once it has run out (the controller may have marked
this gateway unhealthy and moved on without it; see controller/gateways.py).
"""

import asyncio
import datetime
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import httpx
import jwt

from contract.failures import FailureKind

from ..runtime import metrics
from ..runtime.config import write_atomic
from ..errors import AgentError
from ..runtime.settings import GatewaySettings
from . import forwardauth

log = logging.getLogger(__name__)

ACCESS_LOG_NAME = "flux"
ACCESS_LOGGER = f"http.log.access.{ACCESS_LOG_NAME}"
ACCESS_LOG_ROLL_MB = 64
# How often the gateway counts the requests its access log gained, and the most it reads at a time.
COUNT_EVERY_S = 1.0
ACCESS_LOG_READ_BYTES = 4 * 1024 * 1024
# How far back in the access log a request for a project's lines looks.
ACCESS_LOG_SCAN_BYTES = 8 << 20
MAX_LINE_CHARS = 4096
# Verified tokens the gateway remembers (each until it expires).
VERIFIED_TOKENS_KEPT = 10_000
# How often the gateway checks that its Caddy answers.
CADDY_CHECK_S = 1.0
# How long a Caddy that still runs may go without answering its admin API before the gateway takes
# it for hung and replaces it: a Caddy that exited is started again at the next check, but one
# that is only slow (a host short of CPU, a long pause) keeps the requests it is serving.
CADDY_HUNG_AFTER_S = 10.0
# How long a Caddy this gateway stops has to exit after SIGTERM before it gets SIGKILL.
CADDY_STOP_S = 10.0
# The longest a thread of this agent holds the interpreter while the event loop, which answers
# every request's forward_auth, waits for it (Python's default is 5 ms): counting a second's
# access log in a thread takes 20 ms of it at 1,000 requests/s, and each request that came in
# meanwhile waited up to the whole interval.
SWITCH_INTERVAL_S = 0.0005


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat(timespec="microseconds")


def _epoch(stamp: str) -> float:
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        raise AgentError(f"since must be a time this gateway gave, got {stamp[:40]!r}",
                         kind=FailureKind.INVALID) from None

STATE_FILE = "gateway-state.json"
DEFAULT_SNI = "gateway.flux.internal"
POOL_TOKEN_TTL_S = 60
# A route's upstream naming the pooled PostgREST, whose address only the gateway knows.
POOL_UPSTREAM = "pool"
MIGRATING = {"error": "project is migrating; try again later"}
NO_LEASE = {"error": "this gateway's lease on its routes has run out; try again later"}
RETRY_AFTER_S = "5"
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# Headers a client could send to steer the upstream; Caddy removes them before proxying.
# `Connection` goes too: the proxy strips every header it names, the pinned profile included.
SPOOFABLE = ["X-Flux-*", "X-Forwarded-User", "X-Real-Ip", "X-Postgrest-*", "Connection"]
ADMIN_SOCKET = "caddy-admin.sock"


@dataclass(frozen=True)
class Route:
    project_id: str
    hosts: list[str]
    mode: str
    schema: str
    jwt_secret: str
    upstream: str
    maintenance: bool = False
    app_role: str | None = None

    @property
    def pooled(self) -> bool:
        return self.mode == "v2_shared"


def _route(raw: dict) -> Route:
    try:
        return Route(**{k: raw[k] for k in Route.__dataclass_fields__ if k in raw})
    except TypeError as exc:
        raise AgentError(f"malformed route: {exc}") from None


@dataclass
class Staging:
    """A route table being received in parts."""

    version: int
    routes: dict[str, Route]
    next_part: int = 0


class AccessLogReader:
    """Follows Caddy's JSON access log: each call gives the requests logged since the last one, as
    (host, status, seconds). It starts at the end of the file; a file rolled over or truncated is
    read from its start."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._inode, self._offset = self._where()
        self._partial = b""

    def _where(self) -> tuple[int | None, int]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None, 0
        return stat.st_ino, stat.st_size

    def new_entries(self) -> list[tuple[str, str, float]]:
        inode, size = self._where()
        if inode is None:
            return []
        if inode != self._inode or size < self._offset:
            self._inode, self._offset, self._partial = inode, 0, b""
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read(ACCESS_LOG_READ_BYTES)
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        found = []
        for raw in lines:
            try:
                entry = json.loads(raw)
                host = str(entry["request"].get("host", "")).split(":")[0].lower()
                found.append((host, str(int(entry["status"])), float(entry.get("duration") or 0)))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        if len(self._partial) > ACCESS_LOG_READ_BYTES:
            self._partial = b""  # no line is this long: not a line of Caddy's
        return found


class RouteTable:
    def __init__(self, routes: list[Route], version: int):
        self.version = version
        self.routes = routes
        self.by_host = {h.lower(): r for r in routes for h in r.hosts}


class Gateway:
    def __init__(self, state_dir: pathlib.Path, settings: GatewaySettings):
        self.state_dir = state_dir
        self.settings = settings
        self.table = RouteTable([], 0)
        self._minted_tokens: dict[tuple, tuple[float, str]] = {}
        self.caddy: subprocess.Popen | None = None
        # The pid of a Caddy this gateway started in an earlier run and adopted in this one: stopped
        # with the agent, like one it starts (kept running, `flux dev down` left it behind).
        self._adopted_pid: int | None = None
        self._supervisor: asyncio.Task | None = None
        self._counter: asyncio.Task | None = None
        # Tokens checked already, with their expiry and claims, least recently used first.
        self._verified_tokens: OrderedDict[tuple, tuple[float, dict]] = OrderedDict()
        self.caddy_restarts = 0
        # Monotonic time of the first check, in a row, that the running Caddy did not answer.
        self._unanswered_since: float | None = None
        self.auth_server: asyncio.AbstractServer | None = None
        self._staging: Staging | None = None
        # Monotonic time until which this gateway may serve, and the length of its last grant.
        self.lease_until = 0.0
        self.lease_seconds = 0
        # The controller's last answer was a refusal (this gateway was behind, or a restarted
        # controller had not sent it its routes yet): it asks again every second, not a third of a lease later.
        self.lease_refused = False
        self.admin_socket = (settings.caddy_admin or str(state_dir / ADMIN_SOCKET)).removeprefix("unix/")
        self._admin_client: httpx.AsyncClient | None = None
        self._switch_interval: float | None = None  # the interpreter's before start, put back on stop

    # state

    def load_saved(self) -> None:
        path = self.state_dir / STATE_FILE
        if path.exists():
            raw = json.loads(path.read_text())
            self.table = RouteTable([_route(r) for r in raw["routes"]], raw["version"])
            log.info("gateway: serving %d saved route(s), version %d", len(self.table.routes), self.table.version)

    def _save(self) -> None:
        body = {"version": self.table.version, "routes": [asdict(r) for r in self.table.routes]}
        write_atomic(self.state_dir / STATE_FILE, json.dumps(body).encode(), secret=True)

    async def sync(self, version: int, base_version: int | None, part: int, parts: int,
                   upsert: list[dict], remove: list[str]) -> dict:
        """Applies one part of a route change; the last part replaces the table Caddy and the answers use.

        `base_version` None starts from an empty table; otherwise from the table held here, which
        must be that version (else a `conflict`, and the controller sends the whole table).
        """
        if version <= self.table.version and (self._staging is None or self._staging.version != version):
            return {"applied_version": self.table.version, "routes": len(self.table.routes), "stale": True}
        if part == 0:
            if base_version is not None and base_version != self.table.version:
                raise AgentError(f"this gateway holds routes version {self.table.version}, not {base_version}",
                                 kind=FailureKind.CONFLICT)
            start = {} if base_version is None else {r.project_id: r for r in self.table.routes}
            self._staging = Staging(version, start)
        staging = self._staging
        if staging is None or staging.version != version or staging.next_part != part:
            self._staging = None
            raise AgentError(f"routes version {version} part {part} arrived out of order", kind=FailureKind.CONFLICT)
        for raw in upsert:
            route = _route(raw)
            staging.routes[route.project_id] = route
        for project_id in remove:
            staging.routes.pop(project_id, None)
        staging.next_part += 1
        if staging.next_part < parts:
            return {"version": version, "received_parts": staging.next_part, "parts": parts}
        self._staging = None
        new = RouteTable(list(staging.routes.values()), version)
        reload_caddy = self._caddy_shape(new) != self._caddy_shape(self.table) or not await self._caddy_has_our_config()
        self.table = new
        self._minted_tokens.clear()
        self._save()
        if reload_caddy:
            await self.load_caddy_config()
        return {"applied_version": version, "routes": len(new.routes), "caddy_reloaded": reload_caddy}

    # the lease

    def lease(self, asked_at: float, seconds: int) -> None:
        """A grant for the request sent at `asked_at` (monotonic). A refusal leaves the lease to run out."""
        if seconds <= 0:
            if not self.lease_refused:
                log.warning("gateway: the controller did not renew this gateway's lease; asking every second")
            self.lease_refused = True
            return
        self.lease_refused = False
        if self.lease_until <= time.monotonic():
            log.info("gateway: lease granted for %ds; serving", seconds)
        self.lease_seconds = seconds
        self.lease_until = max(self.lease_until, asked_at + seconds)

    def serving(self) -> bool:
        return time.monotonic() < self.lease_until

    def renew_interval(self) -> float:
        if not self.serving() or not self.lease_seconds or self.lease_refused:
            return 1.0
        return max(1.0, self.lease_seconds / 3)

    # Caddy

    @staticmethod
    def _caddy_shape(table: RouteTable) -> list:
        return sorted((tuple(sorted(r.hosts)), r.upstream) for r in table.routes)

    def caddy_config(self) -> dict:
        s = self.settings
        # One Caddy route per upstream, not per project: every pooled project shares one.
        hosts_by_upstream: dict[str, list[str]] = {}
        for route in self.table.routes:
            hosts_by_upstream.setdefault(route.upstream, []).extend(route.hosts)
        routes = [self._caddy_route(sorted(hosts), upstream) for upstream, hosts in sorted(hosts_by_upstream.items())]
        routes.append({"handle": [{"handler": "static_response", "status_code": 404,
                                   "headers": {"Content-Type": ["application/json"]},
                                   "body": json.dumps({"error": "no project at this host"})}]})
        return {
            "admin": {"listen": f"unix/{self.admin_socket}"},
            "logging": {"logs": {
                "default": {"level": "ERROR", "exclude": [ACCESS_LOGGER]},
                # One JSON line per request, for `gateway.logs`; Caddy redacts credentials in it.
                "access": {"level": "INFO", "include": [ACCESS_LOGGER], "encoder": {"format": "json"},
                           "writer": {"output": "file", "filename": str(self.access_log),
                                      "roll_size_mb": ACCESS_LOG_ROLL_MB, "roll_keep": 1}},
            }},
            "apps": {
                "http": {"servers": {"flux": {
                    "listen": [s.listen],
                    "routes": routes,
                    "logs": {"default_logger_name": ACCESS_LOG_NAME},
                    "automatic_https": {"disable_redirects": True},
                    # An upstream that does not answer (a stopped stack) still gets a JSON error.
                    "errors": {"routes": [{"handle": [{
                        "handler": "static_response", "status_code": "{http.error.status_code}",
                        "headers": {"Content-Type": ["application/json"]},
                        "body": json.dumps({"error": "project API unavailable ({http.error.status_code})"}),
                    }]}]},
                    # Clients that send no SNI (addressing the gateway by IP) get the gateway's
                    # own certificate and are routed by their Host header.
                    "tls_connection_policies": [{"default_sni": DEFAULT_SNI}],
                }}},
                "tls": self._tls_app(),
                "pki": {"certificate_authorities": {"local": {"install_trust": False}}},
            },
        }

    def _tls_app(self) -> dict:
        internal = {"module": "internal"}
        if self.settings.tls_issuer != "acme":
            return {"automation": {"policies": [{"issuers": [internal]}]},
                    "certificates": {"automate": [DEFAULT_SNI]}}
        acme = {"module": "acme"}
        if self.settings.acme_email:
            acme["email"] = self.settings.acme_email
        if self.settings.acme_ca:
            acme["ca"] = self.settings.acme_ca
        # The gateway's own name keeps its internal certificate; a project's host gets a public one
        # on its first request, once the agent says the host is a project's (GET /ask).
        return {"automation": {"policies": [{"subjects": [DEFAULT_SNI], "issuers": [internal]},
                                            {"issuers": [acme], "on_demand": True}],
                               "on_demand": {"ask": f"http://{self.settings.auth_listen}{forwardauth.ASK_PATH}"}},
                "certificates": {"automate": [DEFAULT_SNI]}}

    def may_have_certificate(self, domain: str) -> bool:
        """Whether Caddy may get a certificate for `domain`: a host of a route this gateway serves."""
        return domain.lower() in self.table.by_host

    def _caddy_route(self, hosts: list[str], upstream: str) -> dict:
        profile = {"Accept-Profile": ["{http.reverse_proxy.header.X-Flux-Profile}"],
                   "Content-Profile": ["{http.reverse_proxy.header.X-Flux-Profile}"]}
        auth = {
            "handler": "reverse_proxy",
            "upstreams": [{"dial": self.settings.auth_listen}],
            "rewrite": {"method": "GET", "uri": "/verify"},
            "headers": {"request": {"set": {"X-Forwarded-Method": ["{http.request.method}"],
                                            "X-Forwarded-Uri": ["{http.request.uri}"]}}},
            # 200: proxy with the token the gateway returns; any other answer goes back to the client.
            "handle_response": [
                {"match": {"status_code": [200]},
                 "routes": [{"handle": [{"handler": "headers", "request": {
                     "set": {"Authorization": ["{http.reverse_proxy.header.X-Flux-Authorization}"], **profile},
                     "delete": SPOOFABLE}}]}]},
            ],
        }
        dial = self.settings.pool_upstream if upstream == POOL_UPSTREAM else upstream
        # Set once more by the proxy itself, after it has removed hop-by-hop headers.
        upstream = {"handler": "reverse_proxy", "upstreams": [{"dial": dial}],
                    "headers": {"request": {"set": profile}}}
        return {"match": [{"host": hosts}],
                "handle": [{"handler": "subroute", "routes": [{"handle": [auth, upstream]}]}],
                "terminal": True}

    def _admin(self) -> httpx.AsyncClient:
        """The client of Caddy's admin API on its unix socket (which accepts only an empty Host),
        made once: making one costs tens of milliseconds of the event loop that answers every
        request's forward_auth (it loads a CA bundle this plain HTTP never uses)."""
        if self._admin_client is None:
            self._admin_client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=self.admin_socket, verify=False),
                base_url="http://caddy-admin", headers={"Host": ""}, timeout=2)
        return self._admin_client

    async def _caddy_listen(self) -> list | None:
        """What Caddy's admin API says the gateway's server listens on; None when it does not answer.
        Asked every second, so a small answer (the whole configuration holds every route)."""
        try:
            response = await self._admin().get("/config/apps/http/servers/flux/listen")
        except httpx.HTTPError:
            return None
        try:
            return response.json() if response.status_code == 200 else []
        except ValueError:
            return []

    async def _caddy_up(self) -> bool:
        return await self._caddy_listen() is not None

    async def _caddy_has_our_config(self) -> bool:
        return await self._caddy_listen() == [self.settings.listen]

    async def load_caddy_config(self) -> None:
        try:
            response = await self._admin().post("/load", json=self.caddy_config(), timeout=30)
        except httpx.HTTPError as exc:
            raise AgentError(f"Caddy admin API at {self.admin_socket} unreachable: {exc}",
                             retryable=True, kind=FailureKind.UNAVAILABLE) from None
        if response.status_code != 200:
            raise AgentError(f"Caddy refused the configuration: {response.text.strip()[:500]}")

    async def ensure_caddy(self) -> None:
        """Adopts the Caddy answering on the admin address, or starts one."""
        if await self._caddy_up():
            self._adopted_pid = self._own_caddy_pid() if self.settings.manage_caddy else None
            log.info("gateway: adopting the Caddy at %s%s", self.admin_socket,
                     f" (pid {self._adopted_pid}, started by this gateway before)" if self._adopted_pid else "")
        elif not self.settings.manage_caddy:
            raise AgentError(f"no Caddy answers at {self.admin_socket} and manage_caddy is off",
                             retryable=True)
        else:
            # A Caddy of this gateway's that still runs but does not answer (hung, or stopped) holds
            # the edge's port: a new one could not listen until it is gone.
            hung = self._running_caddy_pid()
            if hung is not None:
                log.warning("gateway: Caddy (pid %d) runs but does not answer; stopping it", hung)
                await self._end_caddy(hung)
            binary = shutil.which(self.settings.caddy_bin)
            if binary is None:
                raise AgentError(f"Caddy binary {self.settings.caddy_bin!r} not found; install caddy")
            config = self.state_dir / "caddy.json"
            write_atomic(config, json.dumps(self.caddy_config()).encode(), secret=True)
            env = {**os.environ, "XDG_DATA_HOME": str(self.state_dir / "caddy-data"),
                   "XDG_CONFIG_HOME": str(self.state_dir / "caddy-config")}
            log_file = open(self.state_dir / "caddy.log", "ab")
            self._adopted_pid = None
            self.caddy = subprocess.Popen([binary, "run", "--config", str(config)], env=env,
                                          stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            (self.state_dir / "caddy.pid").write_text(str(self.caddy.pid))
            deadline = time.monotonic() + 20
            while not await self._caddy_up():
                if self.caddy.poll() is not None or time.monotonic() > deadline:
                    raise AgentError(f"Caddy did not start; see {self.state_dir / 'caddy.log'}")
                await asyncio.sleep(0.1)
            log.info("gateway: started Caddy (pid %d), edge on %s", self.caddy.pid, self.settings.listen)
        await self.load_caddy_config()

    def _running_caddy_pid(self) -> int | None:
        """The Caddy of this gateway's that still runs (the one it started, or one `caddy.pid` names)."""
        return self.caddy.pid if self.caddy is not None and self.caddy.poll() is None else self._own_caddy_pid()

    def _own_caddy_pid(self) -> int | None:
        """The Caddy this gateway started (`caddy.pid`), if that process still runs its configuration:
        a pid reused by another process, or a Caddy of the operator's, is never taken for it."""
        try:
            pid = int((self.state_dir / "caddy.pid").read_text())
            command = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        config = str(self.state_dir / "caddy.json").encode()
        return pid if command[1:4] == [b"run", b"--config", config] else None

    async def _end_caddy(self, pid: int) -> None:
        """Stops this gateway's Caddy `pid` (the one it started, or one `caddy.pid` names): SIGTERM,
        then SIGKILL if it has not exited within CADDY_STOP_S (a stopped process ends only so). It
        waits without holding the event loop, which answers every request's forward_auth."""
        started = self.caddy if self.caddy is not None and self.caddy.pid == pid else None
        if started is not None:
            self.caddy = None
        if self._adopted_pid == pid:
            self._adopted_pid = None

        def running() -> bool:
            return started.poll() is None if started is not None else self._own_caddy_pid() == pid

        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not running():
                return
            try:
                os.kill(pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once it runs
            except ProcessLookupError:
                return
            deadline = time.monotonic() + CADDY_STOP_S
            while running() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if running():
            log.error("gateway: Caddy (pid %d) did not exit after SIGKILL", pid)

    # the requests served

    @property
    def access_log(self) -> pathlib.Path:
        return self.state_dir / "access.log"

    def access_lines(self, hosts: list[str], tail: int, since: str | None) -> dict:
        """The requests Caddy logged for `hosts`: the last `tail` of the newest ACCESS_LOG_SCAN_BYTES
        of its access log, or those after `since`, oldest first."""
        wanted = {h.lower() for h in hosts}
        after = _epoch(since) if since else None
        now = time.time()
        found = []
        try:
            with open(self.access_log, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                start = max(0, handle.tell() - ACCESS_LOG_SCAN_BYTES)
                handle.seek(start)
                data = handle.read()
        except FileNotFoundError:
            data = b""
        lines = data.split(b"\n")
        if start:
            lines = lines[1:]  # the first one is cut
        for raw in lines:
            try:
                entry = json.loads(raw)
                request = entry["request"]
                host = str(request.get("host", "")).split(":")[0].lower()
                # To the microsecond, as the cursor says it: a line at the cursor is never sent again.
                at = _epoch(_iso(float(entry["ts"])))
            except (ValueError, KeyError, TypeError, AttributeError, OverflowError, OSError):
                continue
            if host not in wanted or (after is not None and at <= after):
                continue
            found.append((at, f"{request.get('method', '?')} {request.get('uri', '?')} {entry.get('status', '?')} "
                              f"{float(entry.get('duration') or 0) * 1000:.1f}ms {entry.get('size', 0)}B "
                              f"{request.get('remote_ip', '')}"[:MAX_LINE_CHARS]))
        found = found[-tail:] if after is None else found[:tail]
        if found:
            until = _iso(found[-1][0] if after is not None else max(now, found[-1][0]))
        else:
            # Nothing new: the next call asks again from the same point, so a line written late is not skipped.
            until = since if after is not None else _iso(now)
        return {"lines": [{"at": _iso(at), "line": line} for at, line in found], "until": until}

    # forward_auth

    def verify(self, host: str, method: str, authorization: str) -> tuple[int, dict, dict | None]:
        """(status, headers, JSON body) for one request Caddy asks about."""
        if not self.serving():
            return 503, {"Retry-After": RETRY_AFTER_S}, NO_LEASE
        route = self.table.by_host.get(host.split(":")[0].lower())
        if route is None:
            return 404, {}, {"error": "no project at this host"}
        if route.maintenance and method.upper() in WRITE_METHODS:
            return 503, {"Retry-After": RETRY_AFTER_S}, MIGRATING
        profile = {"X-Flux-Profile": route.schema}
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        # Every request to every project carries a token (the anon key is one): no anonymous door.
        if scheme.lower() != "bearer" or not token:
            return 401, {"WWW-Authenticate": "Bearer"}, {"error": "missing bearer token"}
        try:
            claims = self._verified(route, token)
        except jwt.PyJWTError as exc:
            return 401, {"WWW-Authenticate": "Bearer"}, {"error": f"invalid token: {exc}"}
        if route.pooled:
            minted = self._minted(route, claims, self.settings.pool_jwt_secret)
        elif route.app_role and ("sub" in claims or "role" not in claims):
            # A migrated project: every token its pooled past accepted (a `sub`, whatever its role
            # claim says) keeps the rights it had there, those of the tenant's runtime role.
            minted = self._minted(route, claims, route.jwt_secret)
        else:
            minted = token
        return 200, {"X-Flux-Authorization": f"Bearer {minted}", **profile}, None

    def _verified(self, route: Route, token: str) -> dict:
        """The token's claims once checked; a token checked before answers from the cache until it
        expires, so a request costs no signature check after the first. Keyed by the route's secret
        too: a rotated secret never accepts a token signed with the one before."""
        key = (route.project_id, route.jwt_secret, token)
        cached = self._verified_tokens.get(key)
        if cached is not None:
            if cached[0] > time.time():
                self._verified_tokens.move_to_end(key)
                return cached[1]
            del self._verified_tokens[key]
        claims = jwt.decode(token, route.jwt_secret, algorithms=["HS256"],
                            options={"require": ["exp", "sub"] if route.pooled else ["exp"]})
        self._check_lifetime(claims)
        exp = claims["exp"]
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            self._verified_tokens[key] = (float(exp), claims)
            if len(self._verified_tokens) > VERIFIED_TOKENS_KEPT:
                self._verified_tokens.popitem(last=False)
        return claims

    def _check_lifetime(self, claims: dict) -> None:
        """Refuses tokens meant to live longer than the gateway allows: a leaked one must run out."""
        limit = self.settings.max_token_lifetime_s
        exp = claims["exp"]
        iat = claims.get("iat")
        if isinstance(iat, (int, float)) and not isinstance(iat, bool) and exp - iat > limit:
            raise jwt.InvalidTokenError(f"token lifetime exceeds the gateway's maximum of {limit}s")
        if exp - time.time() > limit:
            raise jwt.InvalidTokenError(f"token expires more than {limit}s from now")

    def _minted(self, route: Route, claims: dict, secret: str) -> str:
        """A short-lived token for the route's app role, carrying the app token's other claims."""
        key = (route.project_id, json.dumps(claims, sort_keys=True, default=str))
        now = time.time()
        cached = self._minted_tokens.get(key)
        if cached and cached[0] - now > POOL_TOKEN_TTL_S / 2:
            return cached[1]
        exp = int(now) + POOL_TOKEN_TTL_S
        minted = {**{k: v for k, v in claims.items() if k not in ("role", "exp", "aud")},
                  "role": route.app_role, "exp": exp, "iat": int(now)}
        token = jwt.encode(minted, secret, algorithm="HS256")
        if len(self._minted_tokens) > 10_000:
            self._minted_tokens.clear()
        self._minted_tokens[key] = (exp, token)
        return token

    async def start(self) -> None:
        self.load_saved()
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_S))
        host, _, port = self.settings.auth_listen.rpartition(":")
        try:
            self.auth_server = await forwardauth.serve(self.verify, host, int(port), ask=self.may_have_certificate)
        except OSError as exc:
            raise AgentError(f"cannot serve forward_auth on {self.settings.auth_listen}: {exc.strerror}") from None
        await self.ensure_caddy()
        self._supervisor = asyncio.create_task(self._supervise())
        self._counter = asyncio.create_task(self._count_requests())

    async def _count_requests(self) -> None:
        """Counts, every COUNT_EVERY_S, the requests Caddy logged since (by project, status and
        duration) into the agent's metrics: the access log is their one source for pooled and
        dedicated projects alike. Lines from before the agent started are not counted again."""
        reader = AccessLogReader(self.access_log)

        def count() -> None:
            for host, status, seconds in reader.new_entries():
                route = self.table.by_host.get(host)
                project = route.project_id if route is not None else "none"
                metrics.GATEWAY_REQUESTS.labels(project, status).inc()
                metrics.GATEWAY_REQUEST_SECONDS.labels(project).observe(seconds)

        while True:
            try:
                # All of it off the event loop, which answers every request's forward_auth: a
                # second's thousand lines are 20 ms of work, and with SWITCH_INTERVAL_S the loop
                # asks for its turn after half a millisecond, not five.
                await asyncio.to_thread(count)
            except Exception:  # noqa: BLE001 - counting never stops the gateway; the next tick tries again
                log.exception("gateway: counting the access log's requests failed")
            await asyncio.sleep(COUNT_EVERY_S)

    async def _supervise(self) -> None:
        """Checks every CADDY_CHECK_S that Caddy answers with this gateway's configuration; a Caddy
        that died is started again (an adopted one too, when this agent manages Caddy), one that
        still runs but has not answered for CADDY_HUNG_AFTER_S is stopped and replaced, one that
        lost its configuration gets it back. Each is logged as a warning."""
        while True:
            await asyncio.sleep(CADDY_CHECK_S)
            try:
                asked = time.monotonic()
                listen = await self._caddy_listen()  # one question answers both checks
                if listen is not None and self._unanswered_since is not None:
                    log.warning("gateway: Caddy answers again, after %.1f s", asked - self._unanswered_since)
                    self._unanswered_since = None
                if listen is None and self._running_caddy_pid() is not None:
                    if self._unanswered_since is None:
                        self._unanswered_since = asked
                        log.warning("gateway: Caddy runs but does not answer its admin API; replaced if it "
                                    "still does not in %.0f s", CADDY_HUNG_AFTER_S)
                    if asked - self._unanswered_since < CADDY_HUNG_AFTER_S:
                        continue
                if listen is None:
                    self._unanswered_since = None
                    code = self.caddy.poll() if self.caddy is not None else None
                    self.caddy_restarts += 1
                    metrics.CADDY_RESTARTS.inc()
                    log.warning("gateway: Caddy stopped answering%s; starting it again (restart %d)",
                                f" (it exited with code {code})" if code is not None else "", self.caddy_restarts)
                    await self.ensure_caddy()
                elif listen != [self.settings.listen]:
                    log.warning("gateway: Caddy lost this gateway's configuration; loading it again")
                    await self.load_caddy_config()
            except AgentError as exc:
                log.error("gateway: Caddy cannot be brought back yet: %s", exc.message)
            except Exception:  # noqa: BLE001 - the next check tries again
                log.exception("gateway: checking Caddy failed")

    async def stop(self) -> None:
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None
        for task in (self._supervisor, self._counter):
            if task is not None:
                task.cancel()
        if self.auth_server is not None:
            self.auth_server.close()
            try:  # Caddy's keep-alive connections need not end for the agent to stop
                await asyncio.wait_for(self.auth_server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
        if self._admin_client is not None:
            await self._admin_client.aclose()
            self._admin_client = None
        if self.caddy is not None and self.caddy.poll() is None:
            await self._end_caddy(self.caddy.pid)
        elif self._adopted_pid is not None and self._own_caddy_pid() == self._adopted_pid:
            await self._end_caddy(self._adopted_pid)
