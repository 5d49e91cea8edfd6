"""The web console in a real browser: the distribution's headless Chromium, driven by
Selenium through its chromedriver, against a real `gpugate serve` (local Ray, SQLite).

One gateway and one browser for the module, and the tests run in order, as the people
who use the console would: the admin signs in and reads the overview; a deployer's
version waits for approval, which its author cannot give and an approver gives from the
page; a rollout moves on the page without a reload and is aborted from it; finance
downloads the CSV the CLI prints; a role that may not act, a forged form, an expired
session, a tenant's key and a signed-out browser are each refused. Every page must load
without a Content-Security-Policy violation or a script error.

Screenshots of the pages (1280 px, and a few at a phone's 390 px) go to
``$GPUGATE_SCREENSHOTS``, else to a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e.conftest import (
    Gateway,
    Traffic,
    admin,
    admin_token,
    configured_gateway,
    make_user,
    register_digits,
    send,
    train_digits,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WIDE, PHONE = (1280, 900), (390, 844)
# Requests each tenant of the module's own sends before the first page is read.
REQUESTS = {"acme": 24, "globex": 12}
PRICES = "costs:\n  currency: USD\n  prices:\n    - {device: cpu, per_hour: 2.10}\n"
# A rollout whose weight moves every 2 s while traffic flows, and that never finishes
# before the test has seen it move and aborted it (nine steps before 100%).
ROLLOUT = (
    *("--steps", "10,20,30,40,50,60,70,80,90", "--interval", "2s"),
    *("--min-requests", "5", "--max-p99-ratio", "10", "--failure-threshold", "10"),
)


def _require_browser() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if not missing:
        return
    why = (
        f"{' and '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)"
    )
    if os.environ.get("GPUGATE_REQUIRE_BROWSER"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module", autouse=True)
def _browser_installed() -> None:
    """Before the gateway starts: skipping costs nothing then."""
    _require_browser()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The module's gateway, on SQLite, with a price: costs in money, not only hours."""
    with configured_gateway(tmp_path_factory, "console-state", PRICES) as gw:
        yield gw


# -- the browser ---------------------------------------------------------------------


def _is_expected(entry: dict[str, Any]) -> bool:
    """A refusal the test provokes is logged as a failed load of a 4xx; nothing else is."""
    return bool(re.search(r"Failed to load resource: .*status of 4\d\d", entry["message"]))


class Browser:
    """One Chromium window on the gateway's console, with what the tests do in it."""

    def __init__(self, driver: webdriver.Chrome, gw: Gateway, shots: Path, downloads: Path):
        self.driver, self.gw, self.shots, self.downloads = driver, gw, shots, downloads
        self.root = f"http://{gw.http_url}/console"

    # navigation

    def open(self, path: str, **params: str) -> None:
        self.driver.get(self.root + path + (f"?{urlencode(params)}" if params else ""))

    @property
    def path(self) -> str:
        return urlsplit(self.driver.current_url).path

    @property
    def query(self) -> str:
        return urlsplit(self.driver.current_url).query

    def wait(self, what: str, check: Callable[[], Any], timeout_s: float = 10) -> Any:
        """Poll ``check`` in the page until it is truthy (stale elements count as not yet)."""

        def probe(_: Any) -> Any:
            try:
                return check()
            except StaleElementReferenceException:
                return None

        return WebDriverWait(self.driver, timeout_s, poll_frequency=0.1).until(probe, what)

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str) -> list[WebElement]:
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return str(self.find(css).text)

    def submit(self, button: WebElement) -> None:
        """Click a form's button and wait for the next page."""
        html = self.find("html")
        button.click()
        self.wait("the next page", lambda: _stale(html))

    # sessions

    def sign_in(self, token: str) -> None:
        """Through the sign-in form, in a browser without a session."""
        self.driver.delete_all_cookies()
        self.open("/login")
        self.find("#token").send_keys(token)
        self.submit(self.find("main form button[type=submit]"))

    def sign_out(self) -> None:
        self.submit(self.find("form.who button"))

    def csrf(self) -> str:
        """The session's CSRF token, from the page's sign-out form."""
        return str(self.find("form.who input[name=csrf]").get_attribute("value"))

    def post_form(self, path: str, fields: dict[str, str]) -> None:
        """Submit a form the page does not offer (WebDriver's script is not the page's,
        so the CSP does not stop it; ``form-action 'self'`` lets it post here)."""
        html = self.find("html")
        self.driver.execute_script(
            """
            const [action, fields] = arguments;
            const form = document.createElement("form");
            form.method = "post";
            form.action = action;
            for (const [name, value] of Object.entries(fields)) {
              const input = document.createElement("input");
              input.type = "hidden";
              input.name = name;
              input.value = value;
              form.appendChild(input);
            }
            document.body.appendChild(form);
            form.submit();
            """,
            self.root + path,
            fields,
        )
        self.wait("the answer to the form", lambda: _stale(html))

    # evidence

    def shot(self, name: str, *, phone: bool = False) -> Path:
        size = PHONE if phone else WIDE
        self.driver.set_window_size(*size)
        path = self.shots / f"{name}{'-phone' if phone else ''}.png"
        try:
            assert self.driver.save_screenshot(str(path)), path
        finally:
            self.driver.set_window_size(*WIDE)
        return path

    def fetch_fragment(self, path: str) -> tuple[int, str]:
        """(status, text) of a live part of a page, fetched the way console.js does."""
        status, text = self.driver.execute_async_script(
            """
            const [url, done] = arguments;
            fetch(url, {headers: {"X-Console-Fragment": "1"}, cache: "no-store"})
              .then(r => r.text().then(t => done([r.status, t])));
            """,
            self.root + path,
        )
        return int(status), str(text)

    def problems(self) -> list[str]:
        """Console messages since the last call that are CSP violations or errors."""
        return [
            f"{e['level']} {e['message']}"
            for e in self.driver.get_log("browser")
            if "Content Security Policy" in e["message"]
            or (e["level"] == "SEVERE" and not _is_expected(e))
        ]


def _stale(element: WebElement) -> bool:
    """Whether ``element``'s page has gone (chromedriver may say so in either way while
    the next page replaces it)."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("GPUGATE_SCREENSHOTS")
    folder = Path(where) if where else tmp_path_factory.mktemp("console-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(
    gateway: Gateway, shots: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Browser]:
    downloads = tmp_path_factory.mktemp("console-downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WIDE[0]},{WIDE[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    # The driver's path given: Selenium Manager is not consulted and downloads nothing.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield Browser(driver, gateway, shots, downloads)
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def _no_console_errors(browser: Browser) -> Iterator[None]:
    browser.problems()  # what came before is the previous test's
    yield
    assert browser.problems() == []


# -- the people and their data --------------------------------------------------------


@dataclass
class World:
    admin: str
    dora: str  # deployer
    abe: str  # approver
    fin: str  # finance
    keys: dict[str, str]  # tenant -> API key
    version: str  # registered by dora, waiting for approval
    since: datetime  # before the first request


def _ledger_requests(gw: Gateway, token: str) -> dict[str, int]:
    today = datetime.now(UTC).date().isoformat()
    query = urlencode({"from": today, "to": today, "group_by": "tenant"})
    status, report = admin(gw, "GET", f"/costs?{query}", token)
    assert status == 200, report
    return {r["tenant"]: int(r["requests"]) for r in report["rows"]}


@pytest.fixture(scope="module")
def world(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> World:
    """Users of each role, two tenants with traffic in the ledger, and a version the
    deployer registered."""
    since = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    root = admin_token(gateway)
    users = {
        name: make_user(gateway, name, role)
        for name, role in (("dora", "deployer"), ("abe", "approver"), ("fin", "finance"))
    }
    keys = {}
    for tenant in REQUESTS:
        made = gateway.admin_cli("tenants", "create", tenant, "--models", "digits", "--json")
        assert made.returncode == 0, made.stderr
        keys[tenant] = json.loads(made.stdout)["api_key"]
    rng = random.Random(5)
    for tenant, n in REQUESTS.items():
        answers = [send(gateway, False, None, rng, key=keys[tenant]) for _ in range(n)]
        assert [a.status for a in answers] == [200] * n, answers[:2]

    artifact = tmp_path_factory.mktemp("console-artifacts") / "v2.safetensors"
    accuracy = train_digits(artifact, seed=1)
    made = register_digits(
        gateway, users["dora"], artifact, "--parent", "1", "--metric", f"accuracy={accuracy}"
    )
    assert made.returncode == 0, made.stderr
    registered = json.loads(made.stdout)
    assert (registered["author"], registered["stage"]) == ("dora", "registered")

    wait_for(
        "the tenants' requests in the ledger",
        lambda: all(_ledger_requests(gateway, root).get(t) == n for t, n in REQUESTS.items()),
        timeout_s=60,
    )
    return World(
        root, users["dora"], users["abe"], users["fin"], keys, registered["version"], since
    )


# -- tests -----------------------------------------------------------------------------


def test_a_csp_violation_is_caught(browser: Browser) -> None:
    """The check every test ends with sees a violation, and the policy stops the script."""
    browser.open("/login")
    browser.driver.execute_script(
        "const s = document.createElement('script');"
        "s.textContent = 'window.__inline = 1';"
        "document.head.appendChild(s);"
    )
    seen = browser.wait("the violation in the log", browser.problems, 5)
    assert any("Content Security Policy" in p for p in seen), seen
    assert browser.driver.execute_script("return window.__inline") is None


def test_sign_in_lands_on_the_overview_with_the_apis_figures(
    browser: Browser, world: World
) -> None:
    browser.open("/")
    assert browser.path == "/console/login"
    browser.shot("sign-in")
    browser.sign_in(world.admin)
    assert browser.path == "/console/"
    assert browser.text("#who").startswith("admin")

    status, api = admin(browser.gw, "GET", "/overview?days=30", world.admin)
    assert status == 200, api
    adoption, risk = api["adoption"], api["risk"]
    figures = {
        "fig-requests": f"{adoption['totals']['requests']:,}",
        "fig-active-tenants": str(adoption["tenants"]["active"]),
        "fig-production": str(adoption["production"]["models"]),
        "fig-promotions": str(sum(w["promotions"] for w in adoption["per_week"])),
        "fig-rollbacks": str(sum(w["rollbacks"] for w in adoption["per_week"])),
        "fig-approvals": str(risk["approvals_waiting"]["count"]),
        "fig-refusals": str(risk["guardrail_refusals"]["count"]),
        "fig-failed-rollouts": str(risk["failed_rollouts"]["count"]),
        "fig-budgets": str(risk["budgets"]["count"]),
        "fig-audit": "intact" if risk["audit"]["ok"] else "broken",
    }
    assert {k: browser.text(f"#{k}") for k in figures} == figures
    # Idle device time grows while the replicas are up: the figure may have moved on.
    hours = float(browser.text("#fig-device-hours"))
    assert hours == pytest.approx(adoption["totals"]["device_hours"], abs=0.0005)
    # What the module made is what the page shows.
    assert adoption["totals"]["requests"] >= sum(REQUESTS.values())
    assert (figures["fig-approvals"], figures["fig-production"]) == ("1", "1")
    assert int(figures["fig-active-tenants"]) >= len(REQUESTS)
    assert figures["fig-audit"] == "intact"
    assert f"digits:{world.version} by dora" in browser.text("main")
    browser.shot("overview")
    browser.shot("overview", phone=True)

    browser.open("/models")
    assert f"digits:{world.version}" in browser.text("main")
    browser.shot("models")


def test_the_author_cannot_approve_and_an_approver_approves_from_the_page(
    browser: Browser, world: World
) -> None:
    card = f"/models/digits/versions/{world.version}"
    browser.sign_in(world.dora)
    browser.open("/approvals")
    assert f"digits:{world.version}" in browser.text("main")
    assert browser.all("button[value=approve]") == []
    assert "another approver decides" in browser.text("#own-version")
    browser.post_form(card + "/approve", {"csrf": browser.csrf(), "reason": "mine"})
    assert browser.text("h1") == "Not allowed"
    assert "user 'dora' (role deployer) may not models.approve" in browser.text("#refusal")
    assert _stage(browser.gw, world, world.version) == "registered"

    browser.sign_in(world.abe)
    browser.open("/approvals")
    browser.shot("approvals")
    browser.shot("approvals", phone=True)
    reason = "offline eval reviewed; 2 % better"
    browser.find(f"textarea[id='reason-digits-{world.version}']").send_keys(reason)
    browser.submit(browser.find("button[value=approve]"))
    assert browser.path == "/console/approvals"
    assert browser.text(".notice") == f"Approved digits:{world.version}."
    assert browser.text("#queue-empty") == "No version is waiting."

    browser.open(card)
    assert browser.text("#stage") == "approved"
    decisions = browser.driver.find_element(
        By.XPATH, "//h2[.='Approvals']/following-sibling::ul[1]"
    ).text
    assert "abe approved" in decisions and f"“{reason}”" in decisions
    assert _stage(browser.gw, world, world.version) == "approved"
    browser.shot("version")


def _stage(gw: Gateway, world: World, version: str) -> str:
    status, card = admin(gw, "GET", f"/models/digits/versions/{version}", world.admin)
    assert status == 200, card
    return str(card["stage"])


def test_the_rollout_page_follows_the_rollout_without_a_reload(
    browser: Browser, world: World
) -> None:
    gw = browser.gw
    started = gw.admin_cli("rollout", "start", "digits", world.version, *ROLLOUT, token=world.dora)
    assert started.returncode == 0, started.stderr
    browser.sign_in(world.dora)
    browser.open("/rollouts")
    assert browser.text("main table tbody tr td:nth-child(2)") == "running"
    browser.open("/rollouts/digits")
    assert browser.text("#ro-state") == "running"
    step, weight = browser.text("#ro-step"), browser.text("#ro-weight")
    assert (step, weight) == ("1", "10%")
    browser.driver.execute_script("window.__marker = 1")
    with Traffic(gw, threads=3):
        browser.wait(
            "the weight to move on the page",
            lambda: browser.text("#ro-weight") != weight,
            timeout_s=180,
        )
    moved = (browser.text("#ro-step"), browser.text("#ro-weight"))
    assert int(moved[0]) > 1 and int(moved[1].rstrip("%")) > 10, moved
    assert browser.driver.execute_script("return window.__marker") == 1  # no reload
    assert browser.find("#live").get_attribute("data-updated")
    status, api = admin(gw, "GET", "/models/digits/rollout", world.dora)
    assert status == 200 and api["step"] >= int(moved[0]), api
    browser.shot("rollout")
    browser.shot("rollout", phone=True)

    # A refusal of a live part is a message for the box, not a whole page inside it.
    status, text = browser.fetch_fragment("/rollouts/nope/live")
    assert status == 404
    assert re.fullmatch(r'<p class="error" role="alert">[^<]*no rollout[^<]*</p>', text), text


def test_abort_from_the_page(browser: Browser, world: World) -> None:
    browser.sign_in(world.dora)
    browser.open("/rollouts/digits")
    assert browser.text("#ro-state") == "running"
    reason = "seen enough in the console"
    browser.find("#reason").send_keys(reason)
    browser.submit(browser.find("#do-abort"))
    assert browser.path == "/console/rollouts/digits"
    assert browser.text(".notice") == "Rollout of digits: abort done."
    assert browser.text("#ro-state") == "aborted"
    assert browser.all("#do-abort") == []
    assert reason in browser.text("#live")
    status, api = admin(browser.gw, "GET", "/models/digits/rollout", world.dora)
    assert status == 200 and api["state"] == "aborted", api
    assert (api["history"][-1]["action"], api["history"][-1]["reason"]) == ("abort", reason)
    assert api["history"][-1]["actor"] == "dora"


def _wait_for_download(browser: Browser) -> Path:
    def done() -> Path | None:
        # Chromium writes to a hidden temporary file, then to NAME.crdownload, then NAME.
        files = list(browser.downloads.iterdir())
        if len(files) != 1 or files[0].name.startswith(".") or files[0].suffix == ".crdownload":
            return None
        return files[0]

    found: Path = wait_for("the CSV download", done, timeout_s=30, every_s=0.1)
    return found


def test_costs_page_and_its_csv_are_the_clis(browser: Browser, world: World) -> None:
    browser.sign_in(world.fin)
    browser.open("/costs")
    today = datetime.now(UTC).date().isoformat()
    # A date input's typing depends on the browser's locale; its value does not.
    for field in ("#from", "#to"):
        browser.driver.execute_script(
            "arguments[0].value = arguments[1]", browser.find(field), today
        )
    browser.submit(browser.find("form.filters button[type=submit]"))
    assert browser.query == urlencode({"from": today, "to": today})
    tenants = {row.text.split()[0] for row in browser.all("#cost-rows tbody tr")}
    assert set(REQUESTS) <= tenants, tenants
    assert float(browser.text("#total-hours")) > 0
    assert float(browser.text("#total-cost").removesuffix(" USD")) > 0
    browser.shot("costs")

    # Byte for byte needs a window that no longer moves: idle time grows until now.
    until = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    window = {"from": world.since.isoformat(), "to": until.isoformat()}
    browser.open("/costs", **window)
    grouping = "tenant,model,version"
    Select(browser.find("#group_by")).select_by_value(grouping)
    for stale in browser.downloads.iterdir():
        stale.unlink()
    browser.find("#download-csv").click()
    downloaded = _wait_for_download(browser)
    assert downloaded.name == f"gpugate-costs-{world.since.date()}-{until.date()}.csv"
    report = browser.gw.admin_cli(
        "costs",
        "report",
        "--format",
        "csv",
        "--from",
        window["from"],
        "--to",
        window["to"],
        "--group-by",
        grouping,
        token=world.fin,
    )
    assert report.returncode == 0, report.stderr
    assert downloaded.read_bytes() == report.stdout.encode()
    lines = report.stdout.splitlines()
    assert lines[0].startswith("tenant,model,version,") and lines[-1].startswith("TOTAL,")
    assert {line.split(",")[0] for line in lines[1:-1]} >= set(REQUESTS)


def test_a_role_that_may_not_act_gets_the_apis_refusal(browser: Browser, world: World) -> None:
    browser.sign_in(world.fin)
    browser.open("/rollouts/digits")
    assert browser.all("#do-abort, #do-pause, #reason") == []
    browser.post_form("/rollouts/digits/pause", {"csrf": browser.csrf(), "reason": "no"})
    assert browser.path == "/console/rollouts/digits/pause"
    assert browser.text("h1") == "Not allowed"
    assert "user 'fin' (role finance) may not models.promote" in browser.text("#refusal")
    browser.shot("refusal")
    browser.shot("refusal", phone=True)


def test_a_forged_form_an_expired_session_and_a_tenant_key_are_refused(
    browser: Browser, world: World
) -> None:
    gw = browser.gw
    browser.sign_in(world.dora)
    browser.open("/rollouts/digits")
    browser.post_form("/rollouts/digits/pause", {"csrf": "forged", "reason": "x"})
    assert "CSRF token is missing or not this session's" in browser.text("#refusal")
    browser.open("/")
    browser.post_form("/logout", {"csrf": "forged"})
    assert "CSRF token is not this session's" in browser.text("body")
    browser.open("/")
    assert browser.text("#who").startswith("dora")  # still signed in

    browser.sign_in(world.abe)
    cookie = browser.driver.get_cookie("gpugate_session")
    assert cookie is not None
    # The session's row is keyed by the sha256 of the cookie's secret.
    with sqlite3.connect(gw.state_dir / "gpugate.db") as db:
        ended = db.execute(
            "UPDATE console_sessions SET expires_at = '2000-01-01 00:00:00.000000' "
            "WHERE id_hash = ?",
            (hashlib.sha256(cookie["value"].encode()).hexdigest(),),
        ).rowcount
    assert ended == 1
    browser.open("/models")
    assert browser.path == "/console/login"
    assert "expired=1" in browser.query
    assert browser.text("[role=alert]") == "Your session has expired: sign in again."
    assert browser.driver.get_cookie("gpugate_session") is None

    browser.sign_in(world.keys["acme"])
    assert browser.path == "/console/login"
    assert "a tenant's API key cannot sign in" in browser.text("[role=alert]")
    assert browser.driver.get_cookie("gpugate_session") is None


def test_sign_out_ends_the_session(browser: Browser, world: World) -> None:
    browser.sign_in(world.admin)
    for area, name in (("/tenants", "tenants"), ("/audit", "audit")):
        browser.open(area)
        if browser.all("main#main h1"):  # pages still being written: shot once they exist
            browser.shot(name)
    cookie = browser.driver.get_cookie("gpugate_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    browser.open("/")
    browser.sign_out()
    assert browser.path == "/console/login"
    assert browser.text("[role=status]") == "Signed out."
    assert browser.driver.get_cookie("gpugate_session") is None
    pages = ("/", "/models", "/approvals", "/rollouts/digits", "/costs")
    for page in pages:
        browser.open(page)
        assert (browser.path, browser.query) == (
            "/console/login",
            urlencode({"next": f"/console{page}"}),
        ), page
    # The server ended the session: the old cookie, put back, opens nothing.
    browser.driver.add_cookie({k: cookie[k] for k in ("name", "value", "path")})
    browser.open("/")
    assert browser.path == "/console/login"
    # And the live part of a page is told to stop asking.
    assert browser.fetch_fragment("/rollouts/digits/live") == (
        401,
        '<p class="error" role="alert">sign in first</p>',
    )
