"""The web console (``/ui``) as a person uses it: Debian's chromium, headless, driven by Playwright,
against a real daemon and VM. Screenshots of every page are kept (the directory is printed)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import Daemon, wait_agent

CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="the playwright module is missing (pip install playwright)")
expect = playwright_api.expect

pytestmark = pytest.mark.vm
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(os.environ.get("SLICER_CONSOLE_SCREENSHOTS", "/tmp/slicer-console-screenshots"))
# One small group: its service vm-1, and the sandbox the test creates, both restored from the
# group's template (the session's template cache has one of this machine: the main daemon's sbx).
CONFIG = """
config:
  host_groups:
  - name: vm
    count: 1
    vcpu: 1
    ram_mb: 384
    storage_size: 2G
  api:
    bind_address: 127.0.0.1
    port: PORT
    auth:
      enabled: true
"""
BOOT = 240_000  # ms: a VM's boot under TCG, with room
AUTH_OFF = CONFIG.replace("count: 1", "count: 0").replace("enabled: true", "enabled: false")


class Console:
    def __init__(self, daemon: Daemon, browser, page, requests: list[str], errors: list[str]) -> None:
        self.daemon = daemon
        self.browser = browser
        self.page = page
        self.requests = requests
        self.errors = errors

    def shot(self, name: str, full_page: bool = False) -> None:
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)

    def goto(self, route: str) -> None:
        self.page.goto(f"{self.daemon.url}/ui#/{route}")

    def row(self, hostname: str):
        return self.page.locator("#vms-body tr").filter(has=self.page.get_by_role("link", name=hostname, exact=True))

    def terminal_text(self) -> str:
        return self.page.locator("#terminal .xterm-rows").inner_text()

    def run_in_terminal(self, command: str) -> None:
        self.page.locator("#terminal").click()
        self.page.keyboard.type(command)
        self.page.keyboard.press("Enter")


@pytest.fixture(scope="module")
def daemon(guest_image):
    d = Daemon(CONFIG).start()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def console(daemon):
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    print(f"\nconsole screenshots: {SHOTS}")
    requests: list[str] = []
    errors: list[str] = []  # uncaught exceptions in the page's scripts
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1360, "height": 860}, accept_downloads=True)
        context.on("request", lambda r: requests.append(r.url))
        page = context.new_page()
        page.on("websocket", lambda ws: requests.append(ws.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.set_default_timeout(30_000)
        expect.set_options(timeout=30_000)  # its own default is 5 s: short for a shell or an exec under TCG
        try:
            yield Console(daemon, browser, page, requests, errors)
        finally:
            context.close()
            browser.close()


def test_sign_in_refuses_a_wrong_token_and_takes_the_right_one(console):
    page = console.page
    page.goto(f"{console.daemon.url}/ui")
    expect(page.get_by_label("API token")).to_be_visible()
    console.shot("01-sign-in")
    page.get_by_label("API token").fill("not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#signin-error")).to_contain_text("not this daemon's API token")
    console.shot("02-sign-in-wrong-token")

    page.get_by_label("API token").fill(console.daemon.token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(console.row("vm-1")).to_be_visible()
    cookie, = [c for c in page.context.cookies() if c["name"] == "slicer_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert console.daemon.token not in page.content()  # neither kept in the field nor anywhere in the page


def test_vm_table_shows_vm1_live_without_redrawing_rows(console):
    with console.daemon.client() as api:
        wait_agent(api, "vm-1")
    row = console.row("vm-1")
    expect(row.locator(".badge")).to_have_text("Running", timeout=BOOT)
    expect(row).to_contain_text("192.168.")
    expect(row.locator("[data-label=CPU]")).to_contain_text("load", timeout=60_000)  # the agent's stats
    expect(row.locator("[data-label='Mem use']")).to_contain_text("%")
    expect(row.get_by_role("link", name="Terminal")).to_be_visible()
    for name in ("Pause", "Suspend", "Fork", "Shutdown", "Delete"):
        expect(row.get_by_role("button", name=name)).to_be_visible()
    expect(row.get_by_role("button", name="Resume")).to_have_count(0)  # only what the state allows
    console.shot("03-vms")

    # Refreshes update cells in place: the same row element, at the same place, of the same size.
    row.evaluate("tr => { tr.dataset.probe = 'kept' }")
    before = row.bounding_box()
    console.page.wait_for_timeout(7_000)  # two refreshes, one with stats
    assert row.get_attribute("data-probe") == "kept"
    assert row.bounding_box() == before


def test_pause_and_resume_from_the_table(console):
    row = console.row("vm-1")
    row.get_by_role("button", name="Pause").click()
    expect(row.locator(".badge")).to_have_text("Paused", timeout=15_000)
    expect(row.get_by_role("button", name="Pause")).to_have_count(0)
    console.shot("03b-vms-paused")
    row.get_by_role("button", name="Resume").click()
    expect(row.locator(".badge")).to_have_text("Running", timeout=15_000)
    expect(row.get_by_role("button", name="Resume")).to_have_count(0)


def test_terminal_runs_a_command_resizes_and_reconnects(console):
    page = console.page
    console.row("vm-1").get_by_role("link", name="Terminal").click()
    expect(page.locator("#term-state")).to_have_text("connected", timeout=60_000)
    console.run_in_terminal("echo console-$((6*7))")
    expect(page.locator("#terminal .xterm-rows")).to_contain_text("console-42", timeout=30_000)
    console.shot("04-terminal")

    def size() -> tuple[int, int]:
        marker = f"sz{time.monotonic_ns() % 10**6}"
        console.run_in_terminal(f"echo {marker}-$(stty size | tr ' ' x)")
        expect(page.locator("#terminal .xterm-rows")).to_contain_text(re.compile(marker + r"-\d+x\d+"))
        rows, cols = re.search(marker + r"-(\d+)x(\d+)", console.terminal_text()).groups()
        return int(rows), int(cols)

    wide = size()
    page.set_viewport_size({"width": 900, "height": 700})  # the window size frame follows the page
    page.wait_for_timeout(500)
    narrow = size()
    assert narrow[1] < wide[1] and narrow[0] < wide[0], (wide, narrow)
    page.set_viewport_size({"width": 1360, "height": 860})

    console.run_in_terminal("exit")
    reconnect = page.get_by_role("button", name="Reconnect")
    expect(reconnect).to_be_visible()
    reconnect.click()
    expect(page.locator("#term-state")).to_have_text("connected")
    console.run_in_terminal("echo again-$((40+2))")
    expect(page.locator("#terminal .xterm-rows")).to_contain_text("again-42")


def test_console_log_is_read_and_followed(console):
    page = console.page
    page.get_by_role("link", name="Console log").click()
    page.get_by_label("Lines").select_option("0")
    expect(page.locator("#log-content")).to_contain_text("Linux version")
    expect(page.get_by_label("Follow")).to_be_checked()
    console.shot("05-console-log")


def test_file_upload_and_download(console, tmp_path):
    page = console.page
    console.goto("vm/vm-1/files")
    content = b"uploaded through the console\n" + bytes(range(256))
    page.get_by_label("File to upload").set_input_files(
        files=[{"name": "console-up.bin", "mimeType": "application/octet-stream", "buffer": content}])
    page.get_by_label("Destination path").fill("/root/")
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator("#status")).to_contain_text("Uploaded /root/console-up.bin")
    assert console.daemon.client().get("/vm/vm-1/cp", params={"path": "/root/console-up.bin"}).content == content

    page.get_by_label("Path to download").fill("/root/console-up.bin")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download", exact=True).click()
    assert download.value.suggested_filename == "console-up.bin"
    assert Path(download.value.path()).read_bytes() == content
    page.get_by_role("button", name="List").click()
    expect(page.locator("#browse-body")).to_contain_text("console-up.bin")
    console.shot("06-files")


def test_background_exec_and_its_log(console):
    page = console.page
    page.get_by_role("link", name="Background execs").click()
    page.get_by_label("Command").fill("echo bg-$((2+3)); echo oops >&2")
    page.get_by_role("button", name="Run in background").click()
    expect(page.locator("#exec-log")).to_contain_text("bg-5")
    expect(page.locator("#exec-log .stderr")).to_contain_text("oops")
    expect(page.locator("#exec-log")).to_contain_text("[exited 0]")
    expect(page.locator("#execs-body")).to_contain_text("bg-$((2+3))")
    console.shot("07-background-execs")


def test_create_and_delete_a_sandbox(console):
    page = console.page
    api = console.daemon.client()
    console.goto("vms")
    # A service is protected: the API's refusal is shown as it said it.
    row = console.row("vm-1")
    row.get_by_role("button", name="Delete").click()
    row.get_by_role("button", name="Confirm delete").click()
    expect(page.get_by_role("alert")).to_contain_text("is a service from the config file")
    page.get_by_role("button", name="Dismiss error").click()

    page.get_by_label("Sandbox tags").fill("made-by=console")
    page.get_by_role("button", name="Create sandbox").click()
    expect(page.locator("#status")).to_contain_text("Creating a sandbox in vm")
    console.shot("08-creating-sandbox")
    expect(page.locator("#status")).to_contain_text(re.compile(r"Created vm-\d+"), timeout=BOOT)
    made, = api.get("/nodes", params={"tag": "made-by=console"}).json()
    sandbox = console.row(made["hostname"])
    expect(sandbox.locator(".badge")).to_have_text("Running")
    expect(sandbox).to_contain_text("made-by=console")
    console.shot("09-sandbox-created")

    sandbox.get_by_role("button", name="Delete").click()
    sandbox.get_by_role("button", name="Confirm delete").click()
    expect(sandbox).to_have_count(0, timeout=120_000)
    assert api.get(f"/vm/{made['hostname']}").status_code == 404


def test_secrets_show_metadata_never_values(console):
    page = console.page
    console.goto("secrets")
    page.get_by_label("Name", exact=True).fill("console-secret")
    page.get_by_label("Secret value").fill("hunter2-console-value")
    page.get_by_role("button", name="Add secret").click()
    row = page.locator("#secrets-body tr").filter(has_text="console-secret")
    expect(row).to_contain_text("21 B")
    assert "hunter2-console-value" not in page.content()
    console.shot("10-secrets")
    row.get_by_role("button", name="Delete").click()
    row.get_by_role("button", name="Confirm delete").click()
    expect(row).to_have_count(0)


def test_groups_storage_and_daemon_pages(console):
    page = console.page
    page.get_by_role("link", name="Host groups").click()
    expect(page.locator("#groups-body")).to_contain_text("vm")
    console.shot("11-host-groups")
    page.get_by_role("link", name="Storage").click()
    expect(page.locator("#storage-content")).to_contain_text("vm-1")
    console.shot("12-storage")
    page.get_by_role("link", name="Daemon").click()
    expect(page.locator("#info-facts")).to_contain_text("version")
    console.shot("13-daemon-info")


def test_phone_width(console):
    page = console.page
    page.set_viewport_size({"width": 390, "height": 844})
    console.goto("vms")
    expect(console.row("vm-1")).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # nothing sideways
    expect(page.get_by_role("link", name="Secrets")).to_be_hidden()
    console.shot("14-phone-vms", full_page=True)
    page.get_by_role("button", name="Menu").click()
    expect(page.get_by_role("link", name="Secrets")).to_be_visible()
    console.shot("15-phone-menu")
    page.get_by_role("link", name="VMs").click()
    console.goto("vm/vm-1/terminal")
    expect(page.locator("#term-state")).to_have_text("connected", timeout=60_000)
    expect(page.locator("#vm-status")).to_have_text("Running")
    expect(page.locator("#terminal .xterm-rows")).to_contain_text("root@vm-1")
    console.shot("16-phone-terminal")
    page.set_viewport_size({"width": 1360, "height": 860})


def test_sign_out(console):
    page = console.page
    console.goto("vms")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API token")).to_be_visible()
    assert page.evaluate("fetch('/nodes').then(r => r.status)") == 401
    console.shot("17-signed-out")


def test_no_sign_in_when_auth_is_off(console):
    d = Daemon(AUTH_OFF).start()
    try:
        context = console.browser.new_context(viewport={"width": 1360, "height": 860})
        page = context.new_page()
        page.goto(f"{d.url}/ui")
        expect(page.get_by_role("heading", name="Virtual machines")).to_be_visible()
        expect(page.locator("#vms-empty")).to_be_visible()
        expect(page.get_by_label("API token")).to_be_hidden()
        expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
        page.screenshot(path=str(SHOTS / "18-auth-off.png"))
        context.close()
    finally:
        d.cleanup()


def test_every_request_went_to_the_daemon(console):
    origin = urlsplit(console.daemon.url).netloc
    assert any(u.startswith("ws://") for u in console.requests), "the terminal's WebSocket was not seen"
    outside = [u for u in console.requests
               if not u.startswith(("data:", "blob:")) and urlsplit(u).netloc != origin]
    assert not outside, outside
    assert not console.errors, console.errors
