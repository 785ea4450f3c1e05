"""The dashboard in real headless Chromium (Debian's), driven by Playwright."""

import pathlib
import shutil
import threading

import httpx
import pytest

from tests.support import LocalFleet, app_token

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium")
ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "artifacts"
TODOS = {"001_todos.sql": "create table public.todos (id bigserial primary key, title text not null);"
                          "grant select, insert on public.todos to authenticated;"
                          "grant usage on sequence public.todos_id_seq to authenticated;"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = LocalFleet(tmp_path_factory.mktemp("dashboard") / "dev")
    yield fleet
    fleet.close()


@pytest.fixture(scope="module")
def base(fleet) -> str:
    return fleet.info["api_base"].removesuffix("/api")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def sign_in(browser, base: str, token: str):
    page = browser.new_page()
    page.goto(f"{base}/projects")
    assert page.url.endswith("/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/projects")
    return page


def card(page, project):
    return page.locator(f'.card[data-hash="{project["summary"]["hash"]}"]')


def test_nothing_works_without_a_session(fleet, base):
    with httpx.Client(base_url=base, follow_redirects=False) as http:
        for path in ("/", "/projects", "/fleet", "/projects/0000000"):
            response = http.get(path)
            assert response.status_code == 303 and response.headers["location"] == "/login", path
        assert http.get("/events").status_code == 401
        refused = http.post("/projects/0000000/actions/stop", data={"confirm": "yes", "csrf": "x"},
                            headers={"Origin": base})
        assert refused.status_code == 401
        login = http.post("/login", data={"token": "flx_live_" + "0" * 32 + "_0000"}, headers={"Origin": base})
        assert login.status_code == 401 and "not valid" in login.text
        assert "flux_session" not in login.cookies


def test_a_forged_cross_site_post_is_refused(fleet, base):
    project = fleet.create("Forgery Target", mode="v1_dedicated")
    h = project["summary"]["hash"]
    with httpx.Client(base_url=base, follow_redirects=False) as http:
        signed_in = http.post("/login", data={"token": fleet.token}, headers={"Origin": base})
        assert signed_in.status_code == 303 and http.cookies.get("flux_session")
        set_cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in set_cookie and "samesite=strict" in set_cookie
        page = http.get("/projects")
        csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
        evil = http.post(f"/projects/{h}/actions/stop", data={"confirm": "yes", "csrf": csrf},
                         headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403
        no_token = http.post(f"/projects/{h}/actions/stop", data={"confirm": "yes", "csrf": "guess"},
                             headers={"Origin": base})
        assert no_token.status_code == 403
    status = next(p for p in fleet.api("GET", "list").json() if p["hash"] == h)["status"]
    assert status == "running"


def test_projects_page_actions_and_a_live_migration(fleet, base, browser):
    dedicated = fleet.create("Greenhouse", mode="v1_dedicated")
    pooled = fleet.create("Bloom Atelier")
    assert fleet.push(pooled, TODOS).status_code == 200
    for i in range(3):
        fleet.gateway("POST", fleet.host(pooled), "/todos", app_token(pooled["projectJwtSecret"]), json={"title": f"t{i}"})
    other_token = fleet.add_user("someone-else")
    theirs = fleet.create("Not Yours", token=other_token)

    page = sign_in(browser, base, fleet.token)
    assert page.get_by_role("heading", name="Projects").is_visible()
    assert card(page, theirs).count() == 0
    assert card(page, dedicated).locator(".badge").inner_text() == "Dedicated"
    assert card(page, pooled).locator(".badge").inner_text() == "Pooled"
    assert card(page, pooled).locator(".api-url").inner_text() == pooled["summary"]["apiUrl"]
    assert card(page, dedicated).locator(".status").inner_text() == "Online · Healthy"
    # Pooled-only affordances are absent on dedicated cards, and lifecycle actions on pooled ones.
    assert card(page, dedicated).get_by_role("link", name="Migrate to dedicated").count() == 0
    assert card(page, pooled).get_by_role("link", name="Stop").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "projects.png"), full_page=True)

    card(page, dedicated).get_by_role("link", name="Stop").click()
    page.get_by_role("button", name="Stop").click()
    page.wait_for_url(f"{base}/projects")
    assert card(page, dedicated).locator(".status").inner_text() == "Offline"
    card(page, dedicated).get_by_role("link", name="Start").click()
    page.get_by_role("button", name="Start").click()
    page.wait_for_url(f"{base}/projects")
    assert card(page, dedicated).locator(".status").inner_text() == "Online · Healthy"

    # A migration started elsewhere shows up on the open page, live, then the card turns Dedicated.
    page.wait_for_function("window.fluxEvents && window.fluxEvents.readyState === 1")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", fleet.migrate(pooled)))
    thread.start()
    seen = page.wait_for_function(
        """hash => {
             const phase = document.querySelector(`.card[data-hash="${hash}"] .migration:not([hidden]) .phase`);
             return phase && phase.textContent.includes("Migrating") ? phase.textContent : null;
           }""", arg=pooled["summary"]["hash"], timeout=30_000)
    assert seen.json_value().startswith("Migrating · ")
    thread.join(300)
    assert result["r"].status_code == 200, result["r"].text
    card(page, pooled).locator(".badge", has_text="Dedicated").wait_for(timeout=30_000)
    assert card(page, pooled).locator(".api-url").inner_text() == pooled["summary"]["apiUrl"]
    assert card(page, pooled).get_by_role("link", name="Stop").count() == 1
    page.screenshot(path=str(ARTIFACTS / "projects-after-cutover.png"), full_page=True)


def test_project_detail_shows_credentials_only_on_request_and_the_fleet_page(fleet, base, browser):
    project = fleet.create("Detail Demo", mode="v1_dedicated")
    assert fleet.api("POST", f"projects/{project['summary']['hash']}/lifecycle", {"action": "stop"}).status_code == 200
    page = sign_in(browser, base, fleet.token)
    page.goto(f"{base}/projects/{project['summary']['hash']}")
    assert page.get_by_text(project["summary"]["apiUrl"]).is_visible()
    operations = page.locator("tbody").first.inner_text()
    assert "stop" in operations and "create" in operations and "succeeded" in operations
    assert project["projectJwtSecret"] not in page.content()
    page.get_by_role("button", name="Show credentials").click()
    assert project["projectJwtSecret"] in page.content()
    assert "postgresql://" in page.content()

    page.goto(f"{base}/fleet")
    rows = page.locator("tbody tr")
    assert rows.count() == 4
    text = page.locator("tbody").inner_text()
    for name in ("dev-backup", "dev-db", "dev-docker", "dev-gateway"):
        assert name in text
    assert "connected" in text and "pg_dump" in text
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(f"{base}/login")
    page.goto(f"{base}/fleet")
    assert page.url.endswith("/login")
