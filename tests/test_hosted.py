"""The hosted team demo in a real browser: sign-in with st.login against a real OpenID Connect
provider (oidc-provider-mock, started here on 127.0.0.1), two users in two browser contexts,
each with their own runs, saved form and buttons; and the read-only demo mode.

The servers are this module's own (they need [auth] secrets and settings the shared e2e
server must not have): the secrets file lies in the test's temporary folder, named to
Streamlit by STREAMLIT_SECRETS_FILES, never in the repository. The test holds each runs
folder's supervisor lock, so a launched run stays queued and nothing trains.

Needs /usr/bin/chromium (`apt-get install chromium`; never `playwright install`).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from dashboard_fixtures import (
    CHROMIUM,
    CHROMIUM_ARGS,
    free_port,
    kill_server,
    start_server,
    wait_idle,
    write_group,
    write_run,
)
from playwright.sync_api import sync_playwright

from finetune_core import runner, store

ALICE, BOB = "alice@example.com", "bob@example.com"
HOSTED_SETTINGS = (
    "FINETUNE_DEMO",
    "FINETUNE_ADMINS",
    "FINETUNE_USER_CLAIM",
    "FINETUNE_HIDE_OTHERS_RUNS",
    "FINETUNE_SHARE_IMAGES",
    "FINETUNE_USER_MAX_QUEUED",
    "FINETUNE_USER_DISK_GB",
)


def _wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}: {log.read_text()}")
        try:
            with direct.open(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s: {log.read_text()}")


def _hold_supervisor_lock(runs: Path) -> int:
    """Takes the runs folder's supervisor lock, so that queued runs stay queued."""
    runs.mkdir(parents=True, exist_ok=True)
    fd = os.open(runs / runner.SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _server_env(base: Path, runs: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in HOSTED_SETTINGS}
    env.update(
        FINETUNE_RUNS_DIR=str(runs),
        TORCH_HOME=str(base / "torch"),
        FINETUNE_DATA_DIR=os.environ.get("FINETUNE_DATA_DIR", str(base / "data")),
        OMP_WAIT_POLICY="PASSIVE",
        NO_PROXY="127.0.0.1,localhost",  # the token request goes to the provider directly
        **extra,
    )
    return env


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def hosted(tmp_path_factory, browser):
    """An OpenID Connect provider and a Streamlit server signing in through it."""
    base = tmp_path_factory.mktemp("hosted")
    runs = base / "runs"
    lock = _hold_supervisor_lock(runs)
    provider_port, port = free_port(), free_port()
    provider_log = base / "provider.log"
    provider = subprocess.Popen(
        [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1"]
        + ["--port", str(provider_port)],
        stdout=open(provider_log, "wb"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    issuer = f"http://127.0.0.1:{provider_port}"
    secrets = base / "secrets.toml"  # the README's [auth] block, for this provider
    secrets.write_text(
        "[auth]\n"
        f'redirect_uri = "http://127.0.0.1:{port}/oauth2callback"\n'
        'cookie_secret = "a-test-cookie-secret-of-32-bytes-or-more"\n'
        'client_id = "finetune-dashboard"\n'
        'client_secret = "any-secret-the-mock-accepts"\n'
        f'server_metadata_url = "{issuer}/.well-known/openid-configuration"\n'
    )
    server = None
    try:
        _wait_for(f"{issuer}/.well-known/openid-configuration", provider, provider_log)
        env = _server_env(base, runs, STREAMLIT_SECRETS_FILES=str(secrets))
        server = start_server(env, port, base / "server.log")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", runs=runs, browser=browser)
    finally:
        if server is not None:
            kill_server(server)
        provider.kill()
        provider.wait()
        os.close(lock)


def _context(browser):
    """A browser context of its own (its own cookies: one user); requests to any host but
    this machine are refused (the provider's page asks a CDN for its stylesheet)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.route(re.compile(r"^(?!http://127\.0\.0\.1[:/]).*"), lambda route: route.abort())
    return context


def sign_in(page, url: str, user: str) -> None:
    page.goto(url)
    wait_idle(page)
    assert page.get_by_text("Runs (").count() == 0, "a visitor who is not signed in sees runs"
    page.get_by_role("button", name="Sign in").click()
    page.get_by_placeholder("sub").fill(user)  # the provider's form: who signs in
    page.get_by_role("button", name="Authorize").click()
    page.get_by_text(f"Signed in as {user}").wait_for(timeout=60_000)
    wait_idle(page)


def open_page(page, url: str) -> None:
    page.goto(url)
    wait_idle(page, timeout=120)
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")


def epochs_shown(page, url: str) -> str:
    """Returns the Epochs field of New run as the page shows it, once the page is drawn."""
    open_page(page, f"{url}/New_run")
    button(page, "Launch").wait_for(timeout=60_000)  # the last section: the form is drawn
    wait_idle(page)
    field = page.get_by_label("Epochs", exact=True)
    deadline = time.time() + 30  # on a loaded machine the restored form may draw a moment later
    while field.input_value() in ("", "0") and time.time() < deadline:
        time.sleep(0.2)
    return field.input_value()


def button(page, name: str):
    return page.get_by_role("button", name=name, exact=True)


def test_two_users_sign_in_own_their_runs_and_forms_and_sign_out(hosted):
    url, runs = hosted.url, hosted.runs
    a_context, b_context = _context(hosted.browser), _context(hosted.browser)
    a, b = a_context.new_page(), b_context.new_page()
    try:
        # A signs in, sets Epochs to 5 (saved: her form), and launches the comparison.
        sign_in(a, url, ALICE)
        assert epochs_shown(a, url) == "3"
        a.get_by_text("None (random init)").click()
        wait_idle(a)
        box = a.get_by_label("Epochs", exact=True)
        box.fill("5")
        box.press("Enter")
        wait_idle(a)
        button(a, "Launch").click()
        a.wait_for_url(re.compile(r".*/Training\?run=\d{8}-\d{6}-[0-9a-f]{6}"), timeout=60_000)
        run_id = a.url.rsplit("=", 1)[1]
        wait_idle(a)
        assert store.read_config(runs / run_id)["owner"] == ALICE
        assert store.read_status(runs / run_id)["state"] == "queued"
        assert button(a, "Cancel").count() == 1

        # B sees A's run but no Cancel, Stop, Rename or Delete; the functions refuse him too.
        sign_in(b, url, BOB)
        open_page(b, f"{url}/Training?run={run_id}")
        assert b.get_by_text("only its owner or an admin").count() == 1
        for name in ("Cancel", "Stop", "Resume"):
            assert button(b, name).count() == 0, name
        assert b.get_by_role("button", name=re.compile("Stop the group")).count() == 0
        open_page(b, url)
        assert b.get_by_text("only its owner or an admin").count() == 1
        assert button(b, "Delete…").count() == 0 and button(b, "Rename").count() == 0
        with pytest.raises(store.RunError, match=f"belongs to {ALICE}"):
            runner.cancel_run(runs / run_id, actor=BOB)
        assert epochs_shown(b, url) == "3", "B sees A's saved form"

        # A can: she stops her group (its queued runs are cancelled) and deletes a run.
        a.get_by_role("button", name=re.compile(r"Stop the group \(3 live\)")).click()
        deadline = time.time() + 30
        while time.time() < deadline and any(s == "queued" for s in store.list_runs(runs)["state"]):
            time.sleep(0.2)
        assert set(store.list_runs(runs)["state"]) == {"stopped"}
        open_page(a, url)
        newest = store.list_runs(runs)["run_id"].iloc[0]
        button(a, "Delete…").click()
        wait_idle(a)
        button(a, "Yes, delete").click()
        wait_idle(a)
        assert not (runs / newest).exists() and len(store.list_runs(runs)) == 2

        # each sees their own saved form, in a new tab too
        again = a_context.new_page()
        assert epochs_shown(again, url) == "5"
        again.close()
        assert len(list(runs.glob(".users/alice@example.com-*/.form_state.json"))) == 1
        assert not (runs / ".form_state.json").exists(), "a form saved for everyone"

        # sign-out: the next visit asks to sign in again
        open_page(a, url)
        a.get_by_role("button", name="Sign out").click()
        a.wait_for_url(re.compile(r".*/oauth2/end_session.*"), timeout=30_000)  # the provider's
        a.goto(url)
        button(a, "Sign in").wait_for(timeout=60_000)
        assert a.get_by_text("Signed in as").count() == 0
    finally:
        for page, name in ((a, "alice"), (b, "bob")):
            page.screenshot(path=runs.parent / f"last-{name}.png")
        a_context.close()
        b_context.close()


@pytest.fixture
def demo(tmp_path, browser):
    """A server in the read-only demo mode (no sign-in), with a finished group and a queued
    run to browse."""
    runs = tmp_path / "runs"
    lock = _hold_supervisor_lock(runs)
    ids = write_group(runs)
    write_run(runs, "20250102-120000-00000a", state="queued", accs=(0.5,))
    port = free_port()
    server = start_server(_server_env(tmp_path, runs, FINETUNE_DEMO="1"), port, tmp_path / "log")
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", runs=runs, ids=ids)
    finally:
        kill_server(server)
        os.close(lock)


def test_the_demo_mode_opens_every_page_and_offers_no_launch_upload_stop_or_delete(demo, browser):
    context = _context(browser)
    page = context.new_page()
    before = {p.name for p in demo.runs.iterdir()}
    try:
        open_page(page, demo.url)
        assert page.get_by_text("browse and compare the runs here").count() == 1  # sidebar
        assert page.get_by_text("runs can be browsed and compared, not changed").count() == 1
        for name in ("Delete…", "Rename", "Clone into New run"):
            assert button(page, name).count() == 0, name
        open_page(page, f"{demo.url}/New_run")
        assert page.get_by_text("new runs cannot be launched here").count() == 1
        assert button(page, "Launch").count() == 0
        assert page.locator('[data-testid="stFileUploader"]').count() == 0
        for run_id in ("20250102-120000-00000a", demo.ids[0]):
            open_page(page, f"{demo.url}/Training?run={run_id}")
            assert page.get_by_text("runs can be browsed and compared, not changed").count()
            for name in ("Cancel", "Stop", "Resume"):
                assert button(page, name).count() == 0, name
        open_page(page, f"{demo.url}/Compare")
        page.get_by_text("Final metrics").wait_for(timeout=60_000)
        assert {p.name for p in demo.runs.iterdir()} == before
        assert store.read_status(demo.runs / "20250102-120000-00000a")["state"] == "queued"
    finally:
        page.screenshot(path=demo.runs.parent / "last.png")
        context.close()
