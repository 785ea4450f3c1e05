"""Who may call the HTTP API, how much they may send, and what every response tells a browser.

`ApiGuard` runs before any route: it authenticates `/api/cli/v1` requests from their
headers alone (so an anonymous client cannot make the controller read or parse a body),
refuses bodies over the route's limit, slows down sources that keep failing to sign in,
and adds the headers that keep pages with secrets out of frames and caches.
"""

import json
import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import observe

from ..errors import Forbidden, Unavailable
from ..tokens import is_well_formed_api_token, token_hash

ADMIN = "admin"
OPERATOR = "operator"
# Bodies are small except a push, whose files may add up to MAX_PUSH_BYTES of JSON.
DEFAULT_BODY_LIMIT = 64 * 1024
CSP_PAGES = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
             "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
CSP_DATA = "default-src 'none'; frame-ancestors 'none'"


def require_admin(user) -> None:
    if user.cli_role != ADMIN:
        raise Forbidden(f"this needs an admin; {user.name} is an {user.cli_role}")


class FailureLimiter:
    """Counts failed sign-ins per source; a source over `limit` failures in `window` seconds waits.

    Memory is bounded: the oldest sources are forgotten first.
    """

    def __init__(self, limit: int = 10, window: float = 60.0, max_sources: int = 10_000):
        self.limit = limit
        self.window = window
        self.max_sources = max_sources
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, source: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(source, []) if now - t < self.window]
        if times:
            self._failures[source] = times
        else:
            self._failures.pop(source, None)
        return times

    def retry_after(self, source: str) -> int:
        """Seconds the source must wait before trying again; 0 when it may try now."""
        now = time.monotonic()
        times = self._recent(source, now)
        if len(times) < self.limit:
            return 0
        return max(1, int(self.window - (now - times[0])) + 1)

    def failed(self, source: str) -> None:
        now = time.monotonic()
        times = self._recent(source, now)
        times.append(now)
        self._failures[source] = times
        self._failures.move_to_end(source)
        while len(self._failures) > self.max_sources:
            self._failures.popitem(last=False)


@dataclass(frozen=True)
class BodyLimits:
    """Per-route body limits: (method, path pattern) to bytes; the first full match wins."""

    limits: dict[tuple[str, str], int]
    default: int = DEFAULT_BODY_LIMIT

    def limit(self, method: str, path: str) -> int:
        for (m, pattern), value in self.limits.items():
            if m == method and re.fullmatch(pattern, path):
                return value
        return self.default


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _send_json(send, status: int, body: dict, extra: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *extra]})
    await send({"type": "http.response.body", "body": payload})


def _security_headers(path: str, headers: list) -> list:
    static = path.startswith("/static/")
    names = {k.lower() for k, _ in headers}
    add = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin"),
           (b"x-frame-options", b"DENY"),
           (b"content-security-policy", (CSP_DATA if path.startswith("/api/") else CSP_PAGES).encode())]
    if not static:
        add.append((b"cache-control", b"no-store"))
    return list(headers) + [(k, v) for k, v in add if k not in names]


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{8,64}")


def _request_id(scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return value.decode()
    return uuid.uuid4().hex


class ApiGuard:
    """ASGI middleware in front of the whole app (API, dashboard and static files)."""

    def __init__(self, app, catalog, prefix: str, public_paths: set[str], body_limits: BodyLimits,
                 limiter: FailureLimiter):
        self.app = app
        self.catalog = catalog
        self.prefix = prefix
        self.public_paths = public_paths
        self.body_limits = body_limits
        self.limiter = limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        # The log lines of this request carry its id; the response says it (a caller's own id, if sane).
        request_id = _request_id(scope)
        observe.REQUEST_ID.set(request_id)

        async def secured_send(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": _security_headers(path, message.get("headers", []))
                           + [(b"x-request-id", request_id.encode())]}
            await send(message)

        if path.startswith(self.prefix) and path not in self.public_paths:
            try:
                user = await self._authenticate(scope, secured_send)
            except Unavailable as exc:
                await _send_json(secured_send, 503, {"error": exc.message}, [(b"retry-after", b"2")])
                return
            if user is None:
                return
            scope.setdefault("state", {})["user"] = user
        receive = await self._bounded_body(scope, receive, secured_send)
        if receive is not None:
            await self.app(scope, receive, secured_send)

    def source(self, scope) -> str:
        client = scope.get("client")
        return client[0] if client else "unknown"

    async def _authenticate(self, scope, send):
        source = self.source(scope)
        wait = self.limiter.retry_after(source)
        if wait:
            await _send_json(send, 429, {"error": f"too many failed sign-ins from {source}; "
                                                  f"try again in {wait}s"},
                             [(b"retry-after", str(wait).encode())])
            return None
        scheme, _, token = _headers(scope).get("authorization", "").partition(" ")
        token = token.strip()
        user = None
        if scheme.lower() == "bearer" and is_well_formed_api_token(token):
            user = await self.catalog.user_for_token(token_hash(token))
        if user is None:
            self.limiter.failed(source)
            await _send_json(send, 401, {"error": "Unauthorized"}, [(b"www-authenticate", b"Bearer")])
        return user

    async def _bounded_body(self, scope, receive, send):
        """Reads the body up to the route's limit before the app sees it; None when it was refused."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return receive
        limit = self.body_limits.limit(scope["method"], scope["path"])
        declared = _headers(scope).get("content-length", "")
        too_large = {"error": f"request body is over the {limit // 1024} KiB this route accepts"}
        if declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, too_large)
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_json(send, 413, too_large)
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        return replayed
