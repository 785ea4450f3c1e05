"""The dashboard at `/`: sign-in, projects, project detail and fleet, server-rendered.

Actions call the same `Projects` and `Migrations` operations as the HTTP API. A session is
an HTTP-only, same-site cookie whose hash is stored; every form carries the session's
token and every POST must come from this origin.
"""

import asyncio
import datetime
import hashlib
import html
import json
import secrets
from importlib import resources
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..access import FailureLimiter, require_admin
from ...store import Catalog, Project, User
from ...errors import FluxError, Forbidden
from ...fleet import Fleet
from ...gateways import service_url
from ...migrate import Migrations, Options
from ...projects import DEDICATED, Projects
from ...tokens import is_well_formed_api_token, token_hash

COOKIE = "flux_session"
SESSION_TTL = datetime.timedelta(hours=12)
ACTIONS = {"stop": "Stop", "start": "Start", "repair": "Repair", "migrate": "Migrate to dedicated"}
ROOT = resources.files(__package__)


class SignInRequired(Exception):
    pass


def status_label(project: Project, migrating: str | None) -> tuple[str, str]:
    """(label, tone) of a card: what the agents observe, in the dashboard's words."""
    if migrating:
        return f"Migrating · {migrating}", "busy"
    if project.lifecycle == "provisioning":
        return "Starting", "busy"
    if project.mode != DEDICATED:
        return "Online · Healthy", "ok"
    return {"running": ("Online · Healthy", "ok"), "stopped": ("Offline", "off"),
            "missing": ("Offline", "off")}.get(project.observed_status or "missing", ("Error", "error"))


class Dashboard:
    """What the dashboard's pages act through, and the helpers they share; one per app."""

    def __init__(self, catalog: Catalog, fleet: Fleet, projects: Projects, migrations: Migrations,
                 limiter: FailureLimiter):
        self.catalog, self.fleet, self.projects, self.migrations, self.limiter = (
            catalog, fleet, projects, migrations, limiter)
        self._templates = None

    def render(self, name: str, status: int = 200, **context) -> HTMLResponse:
        if self._templates is None:
            # Loaded with the first page: a controller only agents and the CLI talk to never needs jinja2.
            from jinja2 import Environment, FileSystemLoader, select_autoescape

            self._templates = Environment(loader=FileSystemLoader(str(ROOT / "templates")),
                                          autoescape=select_autoescape(["html"]))
        return HTMLResponse(self._templates.get_template(name).render(**context), status_code=status)

    async def session(self, request: Request) -> tuple[User, str]:
        cookie = request.cookies.get(COOKIE)
        found = await self.catalog.session_user(hashlib.sha256(cookie.encode()).hexdigest()) if cookie else None
        if found is None:
            raise SignInRequired()
        return found

    def same_origin(self, request: Request) -> None:
        origin = request.headers.get("origin") or request.headers.get("referer")
        if origin is None:
            raise Forbidden("cross-site request refused: no Origin")
        if urlsplit(origin).netloc != request.headers.get("host"):
            raise Forbidden("cross-site request refused")

    async def checked(self, request: Request, csrf: str) -> User:
        user, expected = await self.session(request)
        self.same_origin(request)
        if not secrets.compare_digest(csrf or "", expected):
            raise Forbidden("the form's token does not match this session; reload the page")
        return user

    async def card(self, project: Project) -> dict:
        running = await self.catalog.running_migration(project.id)
        label, tone = status_label(project, running.phase if running else None)
        return {"p": project, "label": label, "tone": tone, "url": service_url(project, self.projects.base_domain),
                "engine": "Dedicated" if project.mode == DEDICATED else "Pooled", "migrating": bool(running)}

    async def visible(self, user: User) -> list[Project]:
        owned = await self.catalog.projects_of(user.id)
        return await self.projects.observed([p for p in owned if p.lifecycle != "deleting"])

    async def history(self, project: Project) -> list[dict]:
        """Recent operations, migrations included, newest first."""
        rows = [{"what": o["kind"], "at": o["at"], "outcome": o["outcome"], "detail": o["detail"] or ""}
                for o in await self.catalog.operations_of(project.id)]
        rows += [{"what": f"migrate ({m.kind.replace('_', '-')})", "at": m.started_at,
                  "outcome": m.state.replace("_", " "), "detail": m.phase + (f": {m.error}" if m.error else "")}
                 for m in await self.catalog.migrations_of(project.id)]
        return sorted(rows, key=lambda r: r["at"], reverse=True)[:15]


def dashboard(request: Request) -> Dashboard:
    return request.app.state.dashboard


router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
async def home(request: Request, d: Dashboard = Depends(dashboard)):
    await d.session(request)
    return RedirectResponse("/projects", status_code=303)


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, d: Dashboard = Depends(dashboard)):
    return d.render("login.html", error=None)


@router.post("/login")
async def login(request: Request, token: str = Form(""), d: Dashboard = Depends(dashboard)):
    d.same_origin(request)
    source = request.client.host if request.client else "unknown"
    wait = d.limiter.retry_after(source)
    if wait:
        return d.render("login.html", status=429, error=f"Too many failed sign-ins; try again in {wait}s.")
    token = token.strip()
    user = await d.catalog.user_for_token(token_hash(token)) if is_well_formed_api_token(token) else None
    if user is None:
        d.limiter.failed(source)
        return d.render("login.html", status=401, error="That token is not valid for this control plane.")
    value = secrets.token_urlsafe(32)
    await d.catalog.create_session(hashlib.sha256(value.encode()).hexdigest(), user.id,
                                 secrets.token_urlsafe(24), SESSION_TTL)
    response = RedirectResponse("/projects", status_code=303)
    response.set_cookie(COOKIE, value, max_age=int(SESSION_TTL.total_seconds()), httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return response


@router.post("/logout")
async def logout(request: Request, csrf: str = Form(""), d: Dashboard = Depends(dashboard)):
    await d.checked(request, csrf)
    await d.catalog.delete_session(hashlib.sha256(request.cookies[COOKIE].encode()).hexdigest())
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/projects", response_class=HTMLResponse)
async def projects_page(request: Request, d: Dashboard = Depends(dashboard)):
    user, csrf = await d.session(request)
    cards = [await d.card(p) for p in await d.visible(user)]
    return d.render("projects.html", user=user, csrf=csrf, cards=cards, page="projects")


@router.get("/projects/{hash_}/card", response_class=HTMLResponse)
async def card_fragment(request: Request, hash_: str, d: Dashboard = Depends(dashboard)):
    user, csrf = await d.session(request)
    [project] = await d.projects.observed([await d.projects.get(user, hash_)])
    return d.render("_card.html", c=await d.card(project), csrf=csrf)


@router.get("/projects/{hash_}", response_class=HTMLResponse)
async def project_page(request: Request, hash_: str, d: Dashboard = Depends(dashboard)):
    user, csrf = await d.session(request)
    project = await d.projects.get(user, hash_)
    return d.render("project.html", user=user, csrf=csrf, c=await d.card(project), history=await d.history(project),
                  credentials=None, page="projects")


@router.post("/projects/{hash_}/credentials", response_class=HTMLResponse)
async def show_credentials(request: Request, hash_: str, csrf: str = Form(""), d: Dashboard = Depends(dashboard)):
    user = await d.checked(request, csrf)
    project = await d.projects.get(user, hash_)
    response = d.render("project.html", user=user, csrf=csrf, c=await d.card(project),
                      history=await d.history(project), credentials=d.projects.credentials(project),
                      page="projects")
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get("/projects/{hash_}/confirm/{action}", response_class=HTMLResponse)
async def confirm_page(request: Request, hash_: str, action: str, d: Dashboard = Depends(dashboard)):
    user, csrf = await d.session(request)
    project = await d.projects.get(user, hash_)
    if action not in ACTIONS:
        return d.render("error.html", status=404, user=user, csrf=csrf, message=f"no action {action}")
    return d.render("confirm.html", user=user, csrf=csrf, p=project, action=action, verb=ACTIONS[action],
                  page="projects")


@router.post("/projects/{hash_}/actions/{action}")
async def run_action(request: Request, hash_: str, action: str, csrf: str = Form(""), confirm: str = Form(""),
                     d: Dashboard = Depends(dashboard)):
    user = await d.checked(request, csrf)
    project = await d.projects.get(user, hash_)
    if confirm != "yes" or action not in ACTIONS:
        return RedirectResponse(f"/projects/{hash_}/confirm/{action}", status_code=303)
    try:
        if action in ("stop", "start"):
            await d.projects.lifecycle(project, action)
        elif action == "repair":
            await d.projects.repair(project)
        else:
            await d.migrations.start(project, Options(yes=True))
    except FluxError as exc:
        return d.render("error.html", status=exc.status, user=user, csrf=csrf, message=exc.message)
    return RedirectResponse("/projects", status_code=303)


@router.get("/fleet", response_class=HTMLResponse)
async def fleet_page(request: Request, d: Dashboard = Depends(dashboard)):
    user, csrf = await d.session(request)
    require_admin(user)
    agents = [{"a": a, "connected": d.fleet.connected(a.name)} for a in await d.catalog.list_agents()]
    return d.render("fleet.html", user=user, csrf=csrf, agents=agents, page="fleet")


@router.get("/events")
async def events(request: Request, d: Dashboard = Depends(dashboard)):
    user, _ = await d.session(request)
    mine = {p.id: p.hash for p in await d.catalog.projects_of(user.id)}
    queue: asyncio.Queue = asyncio.Queue()

    def watch(project_id, event):
        if project_id in mine:
            queue.put_nowait({"hash": mine[project_id], **event})

    async def stream():
        d.migrations.watchers.append(watch)
        try:
            yield ": connected\n\n"
            while not await request.is_disconnected():
                try:
                    event = await asyncio.wait_for(queue.get(), 15)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                yield f"data: {json.dumps(event, default=str)}\n\n"
        finally:
            d.migrations.watchers.remove(watch)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def to_sign_in(request: Request, _: SignInRequired):
    if request.method == "GET" and not request.url.path.startswith("/events"):
        return RedirectResponse("/login", status_code=303)
    return HTMLResponse("<h1>Sign in required</h1>", status_code=401)


async def forbidden(request: Request, exc: Forbidden):
    if request.url.path.startswith("/api/"):
        return Response(json.dumps({"error": exc.message}), status_code=403, media_type="application/json")
    return HTMLResponse(f"<h1>Forbidden</h1><p>{html.escape(exc.message)}</p>", status_code=403)


def mount(app, catalog: Catalog, fleet: Fleet, projects: Projects, migrations: Migrations,
          limiter: FailureLimiter) -> None:
    app.state.dashboard = Dashboard(catalog, fleet, projects, migrations, limiter)
    app.mount("/static", StaticFiles(directory=str(ROOT / "static")), name="static")
    app.add_exception_handler(SignInRequired, to_sign_in)
    app.add_exception_handler(Forbidden, forbidden)
    app.include_router(router)
