"""End to end in a real browser: JupyterLab opens notebook 06, the dashboard's Step button
trains one experiment, and the dashboard's status, results table and chart update.

Needs Debian's chromium (`apt-get install -y chromium`) and the `playwright` package (no
`playwright install`: the system browser is used); the test skips without them. The dashboard's
widgets carry CSS classes (`ar-step`, `ar-status`, `ar-results`, `ar-chart`, `ar-dashboard`), so
the test finds them without depending on JupyterLab's own markup. Screenshots go to
$AUTORESEARCH_ARTIFACTS, or else artifacts/ at the top of the repository.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "06_run_agent_loop.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow
if not CHROMIUM.exists():
    if os.environ.get("CI"):  # CI installs it (.ci/run): missing there is a failure, not a skip
        raise RuntimeError("CI has no /usr/bin/chromium: `apt-get install -y chromium` failed?")
    pytest.skip("no /usr/bin/chromium: install it with `apt-get install -y chromium`",
                allow_module_level=True)
if os.environ.get("CI"):
    import playwright.sync_api as sync_api  # a test dependency: must be there in CI
else:
    sync_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install playwright")


def artifacts_dir() -> Path:
    path = Path(os.environ.get("AUTORESEARCH_ARTIFACTS") or ROOT / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """End the server we started and the kernels it started (its own process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def dismiss_dialogs(page) -> None:
    """Answer what JupyterLab may ask on a fresh profile: which kernel (the notebook's), news (no)."""
    for dialog, button in ((".jp-Dialog", "Select"), (".Toastify", "No")):
        answer = page.locator(dialog).get_by_role("button", name=button, exact=True)
        if answer.count() and answer.first.is_visible():
            answer.first.click()


def run_cell(page, cell) -> None:
    """Click into the cell's editor, press Ctrl+Enter, wait until it has run.

    Tried again while the cell is not even queued: a dialog may have taken the key press.
    """
    prompt = cell.locator(".jp-InputPrompt")
    for _ in range(3):
        dismiss_dialogs(page)
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Control+Enter")
        try:
            sync_api.expect(prompt).not_to_have_text(re.compile(r"\[ \]"), timeout=10_000)
            break
        except AssertionError:
            continue
    # the execution count is there: the cell ran, and the layout below it stops moving
    sync_api.expect(prompt).to_have_text(re.compile(r"\[\d+\]"), timeout=120_000)


def code_cells_to_dashboard(path: Path) -> list[int]:
    """Indexes of the code cells up to the one that shows the dashboard (included)."""
    cells = json.loads(path.read_text())["cells"]
    end = next(i for i, c in enumerate(cells)
               if c["cell_type"] == "code" and "Dashboard(ws)" in "".join(c["source"]))
    return [i for i, c in enumerate(cells[:end + 1]) if c["cell_type"] == "code"]


@pytest.fixture
def lab(tmp_path, cache, prepared):
    """JupyterLab on localhost serving a copy of notebooks/, in quick mode: (url, log path)."""
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks",
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs"))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, AUTORESEARCH_QUICK="1", AUTORESEARCH_CACHE=str(cache),
               JUPYTER_CONFIG_DIR=str(tmp_path / "config"),  # no user settings, no saved layout
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    log = tmp_path / "jupyter.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={tmp_path / 'notebooks'}", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, f"jupyter lab exited:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, f"jupyter lab did not start:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        yield f"{base}/lab/tree/{NOTEBOOK}?token={token}", log
    finally:
        stop_group(server)


def test_step_in_the_browser_runs_one_experiment(lab):
    url, log = lab
    shots = artifacts_dir()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        try:
            page.goto(url)
            idle = page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
            idle.wait_for(timeout=90_000)  # the kernel has started
            # run the code cells up to the dashboard's, one at a time: click into the cell's
            # editor, Ctrl+Enter, wait for its execution count (so the layout stops moving)
            for index in code_cells_to_dashboard(ROOT / "notebooks" / NOTEBOOK):
                run_cell(page, page.locator(f".jp-Notebook .jp-Cell[data-windowed-list-index='{index}']"))
            step = page.locator("button.ar-step")
            sync_api.expect(step).to_be_enabled(timeout=120_000)
            idle.wait_for(timeout=60_000)
            status, table = page.locator(".ar-status"), page.locator(".ar-results")
            chart = page.locator(".ar-chart")
            sync_api.expect(table).to_contain_text("results.tsv is empty")
            sync_api.expect(status).to_contain_text("idle")
            before = chart.get_attribute("src")
            step.scroll_into_view_if_needed()
            step.click()
            sync_api.expect(status).to_contain_text("experiment #0", timeout=20_000)
            sync_api.expect(step).to_be_disabled()  # running: one run at a time
            page.screenshot(path=str(shots / "browser_dashboard_running.png"))
            row = table.locator("tr", has=page.locator("td", has_text="baseline"))
            sync_api.expect(row).to_contain_text("keep", timeout=120_000)  # the first row
            sync_api.expect(status).to_contain_text("1 experiment, 1 kept", timeout=30_000)
            sync_api.expect(step).to_be_enabled()
            sync_api.expect(chart).not_to_have_attribute("src", before or "", timeout=10_000)
            assert chart.evaluate("img => img.complete && img.naturalWidth > 0")
            page.locator(".ar-dashboard").screenshot(path=str(shots / "browser_dashboard.png"))
        except Exception:
            page.screenshot(path=str(shots / "browser_dashboard_failure.png"))
            print(log.read_text()[-5000:])  # shown by pytest with the failure
            raise
        finally:
            browser.close()
