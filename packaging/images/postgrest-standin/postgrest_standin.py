"""A PostgREST stand-in, for machines where the real PostgREST cannot be installed.

NOT PostgREST. It covers only what Flux relies on, with PostgREST's configuration
variables and response shapes: HS256 JWTs checked with PGRST_JWT_SECRET, the `role`
claim (else PGRST_DB_ANON_ROLE) set with SET LOCAL ROLE and the impersonated role's
statement_timeout applied, `request.jwt.claims`, the PGRST_DB_PRE_REQUEST hook,
schema profiles (Accept-Profile / Content-Profile, from PGRST_DB_SCHEMAS or, with
PGRST_DB_CONFIG=true, from the authenticator's `pgrst.db_schemas` setting, reloaded
on `NOTIFY pgrst`), simple filtered reads and writes on tables and views,
PostgREST-shaped errors, and /ready and /live on PGRST_ADMIN_SERVER_PORT.

Only the standard library and psycopg (3.1+), so it runs as a process and in an
image built from Debian packages alike.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

import psycopg
from psycopg import sql

IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
OPS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<=",
       "like": "LIKE", "ilike": "ILIKE"}
RESERVED_PARAMS = {"select", "order", "limit", "offset", "columns", "on_conflict"}
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details=None, hint=None):
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.hint = status, code, message, details, hint

    def body(self) -> dict:
        return {"code": self.code, "details": self.details, "hint": self.hint, "message": self.message}


# configuration

class Config:
    def __init__(self, env):
        self.db_uri = env.get("PGRST_DB_URI", "postgresql://")
        self.static_schemas = [s.strip() for s in env.get("PGRST_DB_SCHEMAS", "public").split(",") if s.strip()]
        self.db_config = env.get("PGRST_DB_CONFIG", "false").lower() == "true"
        self.anon_role = env.get("PGRST_DB_ANON_ROLE") or None
        self.jwt_secret = env.get("PGRST_JWT_SECRET", "").encode()
        self.pre_request = env.get("PGRST_DB_PRE_REQUEST") or None
        self.host = env.get("PGRST_SERVER_HOST", "127.0.0.1")
        self.port = int(env.get("PGRST_SERVER_PORT", "3000"))
        self.admin_port = int(env["PGRST_ADMIN_SERVER_PORT"]) if env.get("PGRST_ADMIN_SERVER_PORT") else None
        self.pool_size = int(env.get("PGRST_DB_POOL", "10"))


# JWT (HS256 only)

def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify_jwt(token: str, secret: bytes) -> dict:
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header = json.loads(_b64decode(header_b64))
        claims = json.loads(_b64decode(payload_b64))
        signature = _b64decode(signature_b64)
    except (ValueError, TypeError):
        raise ApiError(401, "PGRST301", "JWT could not be decoded") from None
    if header.get("alg") != "HS256" or not secret:
        raise ApiError(401, "PGRST301", "JWT algorithm or key is not supported")
    expected = hmac.new(secret, f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise ApiError(401, "PGRST301", "JWSError JWSInvalidSignature")
    if not isinstance(claims, dict):
        raise ApiError(401, "PGRST301", "JWT claims must be an object")
    exp = claims.get("exp")
    if exp is not None and (not isinstance(exp, (int, float)) or exp < time.time()):
        raise ApiError(401, "PGRST303", "JWT expired")
    return claims


# SQL errors to HTTP statuses, as PostgREST maps them

def status_for(sqlstate: str, authenticated: bool) -> int:
    exact = {"23503": 409, "23505": 409, "25006": 405, "P0001": 400, "42883": 404, "42P01": 404,
             "42501": 403 if authenticated else 401}
    if sqlstate in exact:
        return exact[sqlstate]
    prefix = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500,
              "39": 500, "3B": 500, "40": 500, "53": 503, "54": 413, "55": 500, "57": 500, "58": 500,
              "F0": 500, "HV": 500, "P0": 500, "XX": 500, "42": 400}
    return prefix.get(sqlstate[:2], 400)


# query building

def checked(name: str, what: str = "column") -> str:
    if not IDENT.match(name):
        raise ApiError(400, "PGRST100", f"invalid {what} name {name!r}")
    return name


def ident(name: str, what: str = "column") -> sql.Identifier:
    return sql.Identifier(checked(name, what))


def parse_filters(params: list[tuple[str, str]]) -> tuple[sql.Composable, list]:
    clauses, values = [], []
    for key, raw in params:
        if key in RESERVED_PARAMS:
            continue
        column = ident(key)
        negate = raw.startswith("not.")
        if negate:
            raw = raw[4:]
        op, _, value = raw.partition(".")
        if op in OPS:
            clause = sql.SQL("{} {} %s").format(column, sql.SQL(OPS[op]))
            if op in ("like", "ilike"):
                value = value.replace("*", "%")
            values.append(value)
        elif op == "is":
            keyword = {"null": "NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}.get(value.lower())
            if keyword is None:
                raise ApiError(400, "PGRST100", f"invalid value for is: {value!r}")
            clause = sql.SQL("{} IS {}").format(column, sql.SQL(keyword))
        elif op == "in":
            if not (value.startswith("(") and value.endswith(")")):
                raise ApiError(400, "PGRST100", f"in needs a list like (1,2,3), got {value!r}")
            items = [v.strip().strip('"') for v in value[1:-1].split(",") if v.strip()]
            if not items:
                clause = sql.SQL("FALSE")
            else:
                clause = sql.SQL("{} IN ({})").format(column, sql.SQL(", ").join(sql.Placeholder() * len(items)))
                values.extend(items)
        else:
            raise ApiError(400, "PGRST100", f"unknown operator {op!r} in filter {key}={raw}")
        clauses.append(sql.SQL("NOT ({})").format(clause) if negate else clause)
    if not clauses:
        return sql.SQL(""), values
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses), values


def parse_select(params: dict) -> sql.Composable:
    select = params.get("select", "*").strip()
    if select in ("", "*"):
        return sql.SQL("*")
    return sql.SQL(", ").join(ident(c.strip()) for c in select.split(","))


def parse_order(params: dict) -> sql.Composable:
    if "order" not in params:
        return sql.SQL("")
    terms = []
    for term in params["order"].split(","):
        parts = term.strip().split(".")
        pieces = [ident(parts[0])]
        for modifier in parts[1:]:
            words = {"asc": "ASC", "desc": "DESC", "nullsfirst": "NULLS FIRST", "nullslast": "NULLS LAST"}
            if modifier not in words:
                raise ApiError(400, "PGRST100", f"invalid order modifier {modifier!r}")
            pieces.append(sql.SQL(words[modifier]))
        terms.append(sql.SQL(" ").join(pieces))
    return sql.SQL(" ORDER BY ") + sql.SQL(", ").join(terms)


def parse_paging(params: dict) -> sql.Composable:
    out = sql.SQL("")
    for key in ("limit", "offset"):
        if key in params:
            if not params[key].isdigit():
                raise ApiError(400, "PGRST100", f"{key} must be a non-negative integer")
            out += sql.SQL(f" {key.upper()} ") + sql.Literal(int(params[key]))
    return out


# the server

class Pool:
    """A small connection pool: one connection per worker thread at a time."""

    def __init__(self, uri: str, size: int):
        self.uri, self.size = uri, size
        self.free: list[psycopg.Connection] = []
        self.lock = threading.Condition()
        self.count = 0

    def get(self) -> psycopg.Connection:
        with self.lock:
            while True:
                while self.free:
                    conn = self.free.pop()
                    if not conn.closed:
                        return conn
                    self.count -= 1
                if self.count < self.size:
                    self.count += 1
                    break
                self.lock.wait(5)
        try:
            return psycopg.connect(self.uri, autocommit=False, connect_timeout=5)
        except Exception:
            with self.lock:
                self.count -= 1
                self.lock.notify()
            raise

    def put(self, conn: psycopg.Connection) -> None:
        with self.lock:
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.close()
                self.count -= 1
            else:
                self.free.append(conn)
            self.lock.notify()


class StandIn:
    def __init__(self, config: Config):
        self.config = config
        self.pool = Pool(config.db_uri, config.pool_size)
        self.schemas = list(config.static_schemas)
        self.role_timeouts: dict[str, str | None] = {}

    def load_schemas(self) -> None:
        if not self.config.db_config:
            return
        conn = self.pool.get()
        try:
            row = conn.execute(
                "SELECT split_part(s, '=', 2) FROM pg_db_role_setting r, unnest(r.setconfig) s"
                " WHERE r.setrole = (SELECT oid FROM pg_roles WHERE rolname = current_user)"
                " AND s LIKE 'pgrst.db_schemas=%' ORDER BY r.setdatabase DESC LIMIT 1").fetchone()
            conn.rollback()
        finally:
            self.pool.put(conn)
        listed = [s.strip() for s in (row[0] if row else "").split(",") if s.strip()]
        self.schemas = listed or list(self.config.static_schemas)
        self.role_timeouts.clear()

    def listen_for_reload(self) -> None:
        while True:
            try:
                with psycopg.connect(self.config.db_uri, autocommit=True) as conn:
                    conn.execute("LISTEN pgrst")
                    for _ in conn.notifies():
                        self.load_schemas()
            except psycopg.Error:
                time.sleep(1)

    def role_timeout(self, conn, role: str) -> str | None:
        if role not in self.role_timeouts:
            row = conn.execute(
                "SELECT split_part(s, '=', 2) FROM pg_db_role_setting r, unnest(r.setconfig) s"
                " WHERE r.setrole = (SELECT oid FROM pg_roles WHERE rolname = %s)"
                " AND s LIKE 'statement_timeout=%%' LIMIT 1", (role,)).fetchone()
            conn.rollback()
            self.role_timeouts[role] = row[0] if row else None
        return self.role_timeouts[role]

    def authenticate(self, headers) -> tuple[dict, str, bool]:
        auth = headers.get("Authorization", "")
        if auth.lower().startswith("bearer "):
            claims = verify_jwt(auth[7:].strip(), self.config.jwt_secret)
            role = claims.get("role") or self.config.anon_role
            if not role:
                raise ApiError(401, "PGRST302", "Anonymous access is disabled")
            return claims, role, True
        if not self.config.anon_role:
            raise ApiError(401, "PGRST302", "Anonymous access is disabled")
        return {"role": self.config.anon_role}, self.config.anon_role, False

    def profile(self, method: str, headers) -> str:
        wanted = headers.get("Accept-Profile" if method in ("GET", "HEAD") else "Content-Profile")
        if not wanted:
            if not self.schemas:
                raise ApiError(406, "PGRST106", "No schema is exposed")
            return self.schemas[0]
        if wanted not in self.schemas:
            raise ApiError(406, "PGRST106", f"The schema must be one of the following: {', '.join(self.schemas)}")
        return wanted

    def handle(self, method: str, path: str, query: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        claims, role, authenticated = self.authenticate(headers)
        schema = self.profile(method, headers)
        parts = [unquote(p) for p in path.strip("/").split("/") if p]
        if len(parts) > 1:
            raise ApiError(404, "PGRST125", f"Invalid path {path}")
        # The root lists the schema's tables, as the role sees them (PostgREST serves OpenAPI there).
        table = sql.Identifier(schema, checked(parts[0], "table")) if parts else None
        params_list = parse_qsl(query, keep_blank_values=True)
        params = dict(params_list)
        prefer = headers.get("Prefer", "")
        conn = self.pool.get()
        try:
            try:
                timeout = self.role_timeout(conn, role)
                # One round trip per request: the set-up statements, the hook and the query are
                # pipelined; `role` set through set_config is SET LOCAL ROLE.
                with conn.pipeline(), conn.transaction():
                    conn.execute(
                        "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true),"
                        " set_config('request.method', %s, true), set_config('request.path', %s, true),"
                        " set_config('search_path', %s, true), set_config('request.headers', %s, true)"
                        + (", set_config('statement_timeout', %s, true)" if timeout else ""),
                        (role, json.dumps(claims), method, path, sql.Identifier(schema).as_string(conn),
                         json.dumps({k.lower(): v for k, v in headers.items()}))
                        + ((timeout,) if timeout else ()))
                    if self.config.pre_request:
                        fn = sql.SQL(".").join(ident(p, "function") for p in self.config.pre_request.split("."))
                        conn.execute(sql.SQL("SELECT {}()").format(fn))
                    status, payload = self.run_query(conn, method, table, params_list, params, body, prefer)
            except psycopg.Error as exc:
                diag = exc.diag
                code = diag.sqlstate or "XX000"
                raise ApiError(status_for(code, authenticated), code, diag.message_primary or str(exc),
                               diag.message_detail, diag.message_hint) from None
        finally:
            self.pool.put(conn)
        out_headers = {"Content-Profile": schema}
        return status, out_headers, payload

    def run_query(self, conn, method, table, params_list, params, body, prefer):
        if table is None:
            if method not in ("GET", "HEAD"):
                raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")
            tables = conn.execute(
                "SELECT coalesce(json_agg(table_name ORDER BY table_name), '[]'::json)"
                " FROM information_schema.tables WHERE table_schema = current_schema()").fetchone()[0]
            return 200, json.dumps({"swagger": "2.0", "info": {"title": "postgrest-standin"},
                                    "paths": {f"/{t}": {} for t in tables}}).encode()
        where, values = parse_filters(params_list)
        returning = "return=representation" in prefer
        if method in ("GET", "HEAD"):
            query = sql.SQL("SELECT coalesce(json_agg(t), '[]'::json) FROM (SELECT {} FROM {}{}{}{}) t").format(
                parse_select(params), table, where, parse_order(params), parse_paging(params))
            return 200, json.dumps(conn.execute(query, values).fetchone()[0]).encode()
        if method == "DELETE":
            query = sql.SQL("WITH d AS (DELETE FROM {}{} RETURNING *) SELECT coalesce(json_agg(d), '[]'::json) FROM d"
                            ).format(table, where)
            rows = conn.execute(query, values).fetchone()[0]
            return (200, json.dumps(rows).encode()) if returning else (204, b"")
        try:
            payload = json.loads(body or b"null")
        except ValueError:
            raise ApiError(400, "PGRST102", "Empty or invalid json") from None
        if method == "POST":
            rows = payload if isinstance(payload, list) else [payload]
            if not rows or not all(isinstance(r, dict) for r in rows):
                raise ApiError(400, "PGRST102", "Empty or invalid json")
            columns = sql.SQL(", ").join(ident(c) for c in dict.fromkeys(k for r in rows for k in r))
            query = sql.SQL(
                "WITH i AS (INSERT INTO {t} ({c}) SELECT {c} FROM json_populate_recordset(NULL::{t}, %s::json)"
                " RETURNING *) SELECT coalesce(json_agg(i), '[]'::json) FROM i").format(t=table, c=columns)
            inserted = conn.execute(query, [json.dumps(rows)]).fetchone()[0]
            return (201, json.dumps(inserted).encode()) if returning else (201, b"")
        if method == "PATCH":
            if not isinstance(payload, dict) or not payload:
                raise ApiError(400, "PGRST102", "Empty or invalid json")
            assignments = sql.SQL(", ").join(
                sql.SQL("{c} = (json_populate_record(NULL::{t}, %s::json)).{c}").format(c=ident(c), t=table)
                for c in payload)
            query = sql.SQL("WITH u AS (UPDATE {} SET {}{} RETURNING *) SELECT coalesce(json_agg(u), '[]'::json) FROM u"
                            ).format(table, assignments, where)
            rows = conn.execute(query, [json.dumps(payload)] * len(payload) + values).fetchone()[0]
            return (200, json.dumps(rows).encode()) if returning else (204, b"")
        raise ApiError(405, "PGRST117", f"Unsupported HTTP method: {method}")

    def ready(self) -> bool:
        try:
            conn = self.pool.get()
        except psycopg.Error:
            return False
        try:
            conn.execute("SELECT 1")
            conn.rollback()
            return True
        except psycopg.Error:
            return False
        finally:
            self.pool.put(conn)


def make_handler(app: StandIn, admin: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; without this, Nagle's algorithm and
        # delayed ACKs hold each response back by ~40 ms.
        disable_nagle_algorithm = True
        server_version = "postgrest-standin"
        sys_version = ""

        def log_message(self, *args):
            pass

        def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _dispatch(self) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            if admin:
                if split.path == "/live":
                    return self._send(200, b"")
                if split.path == "/ready":
                    return self._send(200 if app.ready() else 503, b"")
                return self._send(404, b"")
            try:
                status, headers, payload = app.handle(self.command, split.path, split.query, self.headers, body)
                self._send(status, payload, headers)
            except ApiError as exc:
                extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
                self._send(exc.status, json.dumps(exc.body()).encode(), extra)
            except psycopg.OperationalError as exc:
                self._send(503, json.dumps({"code": "PGRST000", "details": str(exc).strip(), "hint": None,
                                            "message": "Database connection error"}).encode())

        do_GET = do_HEAD = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch

    return Handler


def serve(config: Config) -> None:
    app = StandIn(config)
    print("*** postgrest-standin: this is a STAND-IN for PostgREST, covering only what Flux uses; "
          "production uses the official PostgREST ***", file=sys.stderr, flush=True)
    try:
        app.load_schemas()
    except psycopg.Error as exc:
        print(f"postgrest-standin: database not reachable yet: {exc}", file=sys.stderr, flush=True)
    if config.db_config:
        threading.Thread(target=app.listen_for_reload, daemon=True).start()
    servers = [ThreadingHTTPServer((config.host, config.port), make_handler(app, admin=False))]
    if config.admin_port:
        servers.append(ThreadingHTTPServer((config.host, config.admin_port), make_handler(app, admin=True)))
    for server in servers:
        server.daemon_threads = True
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"postgrest-standin: listening on {config.host}:{servers[0].server_address[1]}"
          f" (schemas: {', '.join(app.schemas) or '-'})", file=sys.stderr, flush=True)
    # As PostgREST does: SIGTERM (docker stop) ends it at once. Without a handler, a process that
    # is PID 1 in its container ignores it, and every stop waited for Docker's SIGKILL.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    servers[0].serve_forever()


if __name__ == "__main__":
    serve(Config(os.environ))
