"""Notebook 03's eps/momentum dashboard in a real browser: JupyterLab driven by Chromium.

``make test-browser`` runs this after the committed notebooks have been trusted. The test
copies ``notebooks/03_scratch.ipynb`` into a temporary folder (JupyterLab's autosave must
never touch the committed file), serves it with the project's own JupyterLab and checks:

1. on open, before anything runs: the notebook is not marked modified, and its saved
   dashboard renders as widgets from the widget state saved in the notebook's metadata
   (JupyterLab does that only for trusted notebooks: this also proves the trust step);
2. Run All finishes, in FAST mode, with no error and no stderr output;
3. moving the eps slider, then the momentum slider, by one step redraws the dashboard's
   figure and updates its title;
4. nothing failed out of sight: no error in JupyterLab's log console (where errors of
   widget callbacks land), none sent by the kernel at all, none in the browser's console.

Screenshots and the server log go to ``build/browser/`` (or ``$BNLAB_BROWSER_ARTIFACTS``).
A missing Chromium or Playwright fails the test: a skip would read as a pass.
"""

from __future__ import annotations

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
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "03_scratch.ipynb"
# Debian's Chromium (Playwright's own browser download is not available here).
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
REMEDY = "`make test-browser` installs both Chromium and Playwright"

# There is no GPU; and without the background-networking flags Chromium keeps calling Google
# services, which on a closed network only adds noise. (--no-sandbox: see chromium_args.)
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}


def chromium_args(euid: int | None = None) -> list[str]:
    """CHROMIUM_ARGS, and --no-sandbox only as root (``euid`` 0), where Chromium needs it:
    a user's Chromium keeps the sandbox that isolates the pages it renders."""
    euid = os.geteuid() if euid is None else euid
    return CHROMIUM_ARGS + (["--no-sandbox"] if euid == 0 else [])


# Deadlines, so that a hang fails fast and says where. The whole test takes 20-30 s on two
# cores; each limit is a few times what its step needs there.
SERVER_START_S = 60
PAGE_LOAD_MS = 60_000
KERNEL_READY_MS = 60_000
RUN_ALL_S = 90  # FAST mode: ~10 s
UPDATE_MS = 20_000  # one slider move: a kernel round trip and a matplotlib redraw
DEFAULT_MS = 15_000  # any other single browser action
SERVER_STOP_S = 15

# The dashboard's title as bnlab.widgets.Dashboard.caption() writes it (numbers `:.3g`): at
# the defaults (which the notebook's last dashboard cell restores), after one step of the
# eps slider (0.25 in log10: 10**-4.75 = 1.778e-05), then one step of momentum (0.01).
TITLE_DEFAULT = "eps=1e-05 · momentum=0.1 · batch size=16"
TITLE_EPS_STEP = "eps=1.78e-05 · momentum=0.1 · batch size=16"
TITLE_MOMENTUM_STEP = "eps=1.78e-05 · momentum=0.11 · batch size=16"
DASHBOARD_CELL = "widgets.dashboard("  # how the dashboard's cell is found: by its source

# JavaScript that finds the notebook's panel among JupyterLab's main-area widgets by path;
# `name` is the argument of the function it is pasted into.
JS_PANEL = (
    "const panel = [...window.jupyterapp.shell.widgets('main')]"
    ".find(w => w.context && w.context.path === name);"
)
# JupyterLab 4 renders stderr streams and error outputs (tracebacks) with this mime type.
STDERR_MIME = "application/vnd.jupyter.stderr"


# --- artifacts ----------------------------------------------------------------------------


# The files this test writes into the artifacts folder (and removes there before a run).
OUR_FILES = re.compile(
    r"\d\d-(opened|saved|run|eps|momentum|log|last)-[a-z-]+\.png|jupyterlab\.log"
)


@dataclass
class Artifacts:
    """The folder for screenshots and the server log; what was written and noted."""

    folder: Path
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def shot(self, name: str, target: Any) -> Path:
        """Screenshot ``target`` (a Playwright page or locator) to ``<folder>/<name>.png``."""
        path = self.folder / f"{name}.png"
        target.screenshot(path=str(path), timeout=DEFAULT_MS, animations="disabled")
        self.written.append(path)
        return path

    def keep(self, source: Path, name: str) -> Path:
        """Copy a file (the server log) into the folder."""
        path = self.folder / name
        shutil.copyfile(source, path)
        self.written.append(path)
        return path


@pytest.fixture
def artifacts(capsys):
    """Artifacts folder: ``$BNLAB_BROWSER_ARTIFACTS`` or ``build/browser`` (git-ignored).

    This test's earlier screenshots and log are removed first, so that a file left by an
    earlier run is never taken for this run's. What was written is printed at the end,
    passing or failing.
    """
    folder = Path(os.environ.get("BNLAB_BROWSER_ARTIFACTS") or ROOT / "build" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if OUR_FILES.fullmatch(old.name):
            old.unlink()
    arts = Artifacts(folder.resolve())
    yield arts
    with capsys.disabled():  # shown without -s, and also when the test passes
        print()
        for note in arts.notes:
            print(f"browser test: {note}")
        print(f"browser test artifacts in {arts.folder}:")
        for path in arts.written:
            print(f"  {path}")


# --- the JupyterLab server ----------------------------------------------------------------


@dataclass
class Lab:
    """A running JupyterLab server that serves ``root``."""

    base_url: str
    token: str
    root: Path

    def tree_url(self, name: str) -> str:
        """The URL that opens ``name`` (relative to ``root``) in JupyterLab."""
        return f"{self.base_url}lab/tree/{name}?token={self.token}"


def free_port() -> int:
    """A local TCP port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jupyter_executable() -> Path:
    """The project environment's ``jupyter``: next to the Python that runs the tests."""
    path = Path(sys.executable).parent / "jupyter"
    if not path.exists():
        pytest.fail(f"no {path}: run the tests with the project's .venv/bin/python ({REMEDY})")
    return path


def write_lab_settings(folder: Path) -> None:
    """User settings for a hermetic JupyterLab: no news, no update checks.

    Both would call the network (closed here) and put a toast over the screenshots. Apart
    from that JupyterLab keeps its defaults; the separate folder only keeps the user's own
    ~/.jupyter/lab settings out of the test.
    """
    target = folder / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


def log_tail(log: Path, lines: int = 40) -> str:
    """The end of the server log, for failure messages."""
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_server(url: str, token: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll ``/api/status`` until the server answers the token, or fail at the deadline."""
    deadline = time.monotonic() + SERVER_START_S
    request = urllib.request.Request(
        f"{url}api/status", headers={"Authorization": f"token {token}"}
    )
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {proc.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet
        time.sleep(0.25)
    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{log_tail(log)}")


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server (on SIGTERM it shuts its kernel down); kill its group if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=SERVER_STOP_S)
    except subprocess.TimeoutExpired:
        # The server leads its own process group (start_new_session): this ends the kernel too.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=SERVER_STOP_S)


@pytest.fixture
def lab(tmp_path, artifacts):
    """JupyterLab serving a copy of notebook 03, in FAST mode; stopped, log kept, at the end."""
    root = tmp_path / "root"
    root.mkdir()
    # A byte-identical copy: trust is keyed by the notebook's content in the user's Jupyter
    # data folder, so the copy is trusted exactly when the committed notebook is.
    shutil.copyfile(NOTEBOOK, root / NOTEBOOK.name)
    settings = tmp_path / "lab-settings"
    write_lab_settings(settings)
    port, token = free_port(), secrets.token_hex(24)
    command = [
        str(jupyter_executable()),
        "lab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",  # fail on a taken port rather than serve on another
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}",  # no restored layout
        "--expose-app-in-browser",  # window.jupyterapp: run JupyterLab's commands, read models
    ]
    if os.getuid() == 0:
        command.append("--allow-root")
    env = {**os.environ, "BNLAB_FAST": "1"}  # the notebook's FAST sizes: Run All in ~10 s
    log = tmp_path / "jupyterlab.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # see stop_server
        )
    try:
        base_url = f"http://127.0.0.1:{port}/"
        wait_for_server(base_url, token, proc, log)
        yield Lab(base_url, token, root)
    finally:
        stop_server(proc)
        artifacts.keep(log, "jupyterlab.log")


# --- the browser --------------------------------------------------------------------------


@dataclass
class Browser:
    """A Chromium page, and the errors it reported: console errors, uncaught exceptions."""

    page: Any
    console_errors: list[str] = field(default_factory=list)
    uncaught: list[str] = field(default_factory=list)


def sync_playwright_or_fail():
    """Playwright's sync API; fails (never skips) with the remedy when it is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright Python package is missing: {REMEDY}")
    return sync_playwright


def describe(message) -> str:
    """A console message, with where it came from."""
    where = message.location or {}
    return f"{message.text} ({where.get('url', '?')}:{where.get('lineNumber', '?')})"


@pytest.fixture
def browser(lab, artifacts):
    """A page of Debian's Chromium that records its errors; closed at the end.

    Depends on ``lab`` so that the browser closes before the server stops. The page's last
    state is saved as ``99-last-page.png``, passing or failing: it shows where a failure was.
    """
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: {REMEDY}")
    playwright = sync_playwright_or_fail()().start()
    try:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=chromium_args(), timeout=DEFAULT_MS
        )
        try:
            page = chromium.new_page(viewport=VIEWPORT)
            page.set_default_timeout(DEFAULT_MS)
            result = Browser(page)
            page.on(
                "console",
                lambda m: m.type == "error" and result.console_errors.append(describe(m)),
            )
            page.on("pageerror", lambda e: result.uncaught.append(str(e)))
            yield result
            try:
                artifacts.shot("99-last-page", page)
            except Exception as error:  # a crashed page must not hide the test's own failure
                artifacts.notes.append(f"no last screenshot: {error}")
        finally:
            chromium.close()
    finally:
        playwright.stop()


# --- JupyterLab, from the page ------------------------------------------------------------


def evaluate_async(page, body: str, name: str, what: str, timeout_s: float = DEFAULT_MS / 1000):
    """Run ``body``, the body of an async JS function that sees ``name``, with a deadline.

    ``page.evaluate`` has no timeout of its own: a promise that never settles (a command
    that hangs) would hang the test, so the page races it against a timer.
    """
    script = (
        "async ([name, ms, what]) => {"
        "  const work = (async () => {" + body + "})();"
        "  const timer = new Promise((_, reject) => setTimeout("
        "    () => reject(new Error(`timed out after ${ms / 1000} s: ${what}`)), ms));"
        "  return await Promise.race([work, timer]);"
        "}"
    )
    return page.evaluate(script, [name, timeout_s * 1000, what])


def open_notebook(page, lab: Lab, name: str) -> None:
    """Open ``name`` and wait until its kernel is idle and JupyterLab has applied its info.

    On opening JupyterLab starts the kernel, then copies the kernel's kernelspec and
    language_info into the notebook's metadata; only after that does "modified" mean
    anything. The page also starts recording the kernel's error and stderr messages.
    """
    page.goto(lab.tree_url(name), wait_until="domcontentloaded", timeout=PAGE_LOAD_MS)
    page.wait_for_function(
        "(name) => { if (!window.jupyterapp) return false;" + JS_PANEL + " return !!panel; }",
        arg=name,
        timeout=PAGE_LOAD_MS,
    )
    want = evaluate_async(
        page,
        JS_PANEL
        + """
        await panel.context.ready;
        await panel.sessionContext.ready;
        const kernel = panel.sessionContext.session.kernel;
        // Every error and stderr message from the kernel, whatever its origin: a cell, or a
        // widget callback (those reach the page outside any cell, see kernel_errors()).
        window.bnlabKernelErrors = [];
        kernel.iopubMessage.connect((_, msg) => {
            const type = msg.header.msg_type, c = msg.content;
            if (type === 'error' || (type === 'stream' && c.name === 'stderr')) {
                window.bnlabKernelErrors.push({
                    type, parent: msg.parent_header.msg_type,
                    text: type === 'error' ? `${c.ename}: ${c.evalue}` : c.text.slice(0, 500),
                });
            }
        });
        const info = await kernel.info;  // JupyterLab waits on the same promises, earlier
        const spec = await kernel.spec;
        return {display_name: spec.display_name, language: info.language_info.name,
                version: info.language_info.version};
        """,
        name,
        "the notebook's kernel to start and send its info",
        KERNEL_READY_MS / 1000,
    )
    wait_for_kernel_idle(page, name, KERNEL_READY_MS)
    page.wait_for_function(
        "([name, want]) => {"
        + JS_PANEL
        + """
        const spec = panel.model.getMetadata('kernelspec') || {};
        const lang = panel.model.getMetadata('language_info') || {};
        return spec.display_name === want.display_name && lang.name === want.language
            && lang.version === want.version;
        }""",
        arg=[name, want],
        timeout=DEFAULT_MS,
    )


def wait_for_kernel_idle(page, name: str, timeout_ms: float) -> None:
    """Wait until the notebook's kernel is connected and idle."""
    page.wait_for_function(
        "(name) => {"
        + JS_PANEL
        + """
        const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
        return !!kernel && kernel.connectionStatus === 'connected' && kernel.status === 'idle';
        }""",
        arg=name,
        timeout=timeout_ms,
    )


def modified_state(page, name: str) -> dict:
    """Whether the notebook is modified, in its model and on its tab; and its metadata.

    JupyterLab marks a modified document with ``jp-mod-dirty`` on its tab in the main area
    (the title's class); the tab repaints on an animation frame, hence the two frames.
    """
    return evaluate_async(
        page,
        JS_PANEL
        + """
        await new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
        const tabs = [...document.querySelectorAll('#jp-main-dock-panel .lm-TabBar-tab')]
            .filter(t => t.textContent.trim() === name);
        return {
            model_dirty: panel.model.dirty,
            tabs: tabs.length,
            dirty_tabs: tabs.filter(t => t.classList.contains('jp-mod-dirty')).length,
            kernelspec: panel.model.getMetadata('kernelspec'),
            language_info: panel.model.getMetadata('language_info'),
        };
        """,
        name,
        "reading the notebook's modified state",
    )


def metadata_changes(saved: dict, now: dict) -> list[str]:
    """What differs between the saved and the current kernelspec and language_info."""
    changes = []
    for key in ("kernelspec", "language_info"):
        old, new = saved.get(key) or {}, now.get(key) or {}
        for field_ in sorted(set(old) | set(new)):
            if old.get(field_) != new.get(field_):
                changes.append(
                    f"{key}.{field_}: saved {old.get(field_)!r}, now {new.get(field_)!r}"
                )
    return changes


def mark_cell(page, name: str, source_part: str, mark: str) -> None:
    """Put ``data-bnlab-test=<mark>`` on the one code cell whose source has ``source_part``.

    Found by source, not index, so cells added above it do not matter; the cell's node stays
    the same when Run All replaces its outputs, so the mark keeps naming it.
    """
    found = evaluate_async(
        page,
        JS_PANEL
        + """
        const [part, mark] = ARGS;
        const cells = panel.content.widgets.filter(
            c => c.model.type === 'code' && c.model.sharedModel.getSource().includes(part));
        if (cells.length === 1) cells[0].node.dataset.bnlabTest = mark;
        return cells.length;
        """.replace("ARGS", json.dumps([source_part, mark])),
        name,
        "marking a cell",
    )
    assert found == 1, f"expected one code cell containing {source_part!r}, found {found}"


def code_cells_trusted(page, name: str) -> bool:
    """Whether JupyterLab trusts every code cell (the server marks them all from the file)."""
    return evaluate_async(
        page,
        JS_PANEL + "return panel.content.widgets.filter(c => c.model.type === 'code')"
        ".every(c => c.model.trusted);",
        name,
        "reading trust",
    )


def scroll_to(locator) -> None:
    """Scroll ``locator`` to the middle of its scroller, so that a page screenshot shows it.

    Twice: cells out of view are laid out with estimated heights (content-visibility), so
    the first scroll can shift what lies above the target.
    """
    for _ in range(2):
        locator.evaluate(
            "el => new Promise(r => { el.scrollIntoView({block: 'center'});"
            " requestAnimationFrame(() => requestAnimationFrame(r)); })"
        )


def run_all(page, name: str) -> bool:
    """Run All; return JupyterLab's verdict (false when a cell failed).

    The command's promise settles when every cell has been executed, so waiting for it
    is waiting for the end of the run; the prompts are checked afterwards all the same.
    """
    return evaluate_async(
        page,
        JS_PANEL
        + """
        window.jupyterapp.shell.activateById(panel.id);
        return await window.jupyterapp.commands.execute('notebook:run-all-cells');
        """,
        name,
        "Run All",
        RUN_ALL_S,
    )


def cell_report(page, name: str) -> list[dict]:
    """Every code cell with source: index, prompt as shown, execution count, outputs.

    Read from the models as well as the DOM: with JupyterLab's windowing, a cell far out of
    view may not be rendered, but its model always holds its outputs.
    """
    return evaluate_async(
        page,
        JS_PANEL
        + """
        const report = [];
        panel.content.widgets.forEach((cell, index) => {
            if (cell.model.type !== 'code' || !cell.model.sharedModel.getSource().trim()) return;
            const outputs = [];
            for (let i = 0; i < cell.model.outputs.length; i++) {
                outputs.push(cell.model.outputs.get(i).toJSON());
            }
            const prompt = cell.node.querySelector('.jp-InputPrompt');
            report.push({index, prompt: prompt ? prompt.textContent.trim() : null,
                         count: cell.model.executionCount, outputs});
        });
        return report;
        """,
        name,
        "reading the cells",
    )


def kernel_errors(page) -> tuple[list[dict], list[dict]]:
    """The kernel's error and stderr messages since the notebook opened: (errors, noise).

    A second channel besides the log console: an error in a widget callback reaches the page
    as a kernel message outside any cell, which ipywidgets should forward to the log console.

    Noise, not ours and set apart: on connecting, ipywidgets' manager asks the kernel for
    existing widgets over a ``jupyter.widget.control`` comm that the page opens. A fresh
    kernel has not imported ipywidgets yet, so ipykernel answers on stderr "No such comm
    target registered: jupyter.widget.control", then "No such comm: <id>" for that comm's
    later messages. Comms the page opens have dashed UUIDs; the widgets' comms, opened by
    the kernel, have 32 hex digits, so a dead dashboard widget would still count as an error.
    """
    errors, noise = [], []
    for message in page.evaluate("() => window.bnlabKernelErrors"):
        text = message["text"].strip()
        probe = text == "No such comm target registered: jupyter.widget.control" or (
            re.fullmatch(r"No such comm: [0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", text)
        )
        (noise if message["type"] == "stream" and probe else errors).append(message)
    return errors, noise


def log_console(page, name: str) -> dict:
    """Open JupyterLab's log console on the notebook; return its entries and placeholder.

    ipywidgets logs what widget callbacks print there: errors and stderr at level "error",
    stdout at "warning". Each entry's prompt carries ``data-log-level``; an empty console
    shows a placeholder ("No log messages.").
    """
    evaluate_async(
        page,
        "await window.jupyterapp.commands.execute('logconsole:open', {source: name});",
        name,
        "opening the log console",
    )
    page.locator(".jp-LogConsolePanel").first.wait_for(state="visible")
    return page.evaluate("""() => {
        const panel = document.querySelector('.jp-LogConsolePanel');
        const entries = [...panel.querySelectorAll('[data-log-level]')].map(p => ({
            level: p.dataset.logLevel,
            text: ((p.closest('.jp-OutputArea-child') || p).querySelector('.jp-OutputArea-output')
                || p).textContent.trim().slice(0, 500),
        }));
        const holder = panel.querySelector('.jp-LogConsoleListPlaceholder');
        return {entries, placeholder: holder ? holder.textContent.trim() : null};
    }""")


# --- the dashboard ------------------------------------------------------------------------


def title_text(dashboard) -> str:
    """The dashboard's title as the reader sees it."""
    return dashboard.locator(".bnlab-title").text_content().strip()


def wait_for_dashboard(page, dashboard, title: str, old_src: str | None, what: str) -> str:
    """Wait until the title reads ``title`` and the figure is not ``old_src``; return its src.

    The figure is the one ``<img>`` in the dashboard's Output widget; its ``src`` is the
    PNG as a data: URL. The kernel sets the title before it draws: both are waited for.
    """
    try:
        page.wait_for_function(
            """([el, title, oldSrc]) => {
                const t = el.querySelector('.bnlab-title');
                const imgs = el.querySelectorAll('.bnlab-output img');
                return !!t && t.textContent.trim() === title && imgs.length === 1
                    && imgs[0].getAttribute('src') !== oldSrc;
            }""",
            arg=[dashboard.element_handle(), title, old_src],
            timeout=UPDATE_MS,
        )
    except Exception as error:  # Playwright's TimeoutError: say what was seen instead
        images = dashboard.locator(".bnlab-output img").count()
        pytest.fail(
            f"{what}: expected the title {title!r} and a new figure within {UPDATE_MS} ms; "
            f"the title is {title_text(dashboard)!r}, with {images} <img> ({error})"
        )
    return dashboard.locator(".bnlab-output img").get_attribute("src")


def nudge(dashboard, part: str) -> str:
    """Move the slider ``.bnlab-<part>`` one step right with the keyboard; return its readout.

    ipywidgets 8 draws sliders with noUiSlider, whose focused handle moves by exactly one
    ``step`` per ArrowRight (a mouse drag would move by a distance that depends on layout).
    """
    handle = dashboard.locator(f".bnlab-{part} .noUi-handle")
    assert handle.count() == 1, f"expected one slider handle in .bnlab-{part}"
    handle.focus()
    handle.press("ArrowRight")
    return dashboard.locator(f".bnlab-{part} .widget-readout").text_content().strip()


# --- the test -----------------------------------------------------------------------------


def check_opens_clean(page, name: str, saved_metadata: dict) -> None:
    """Step 1a: right after opening (kernel started, its info applied), nothing is modified."""
    state = modified_state(page, name)
    assert state["tabs"] == 1, f"expected one tab named {name}, found {state['tabs']}"
    if state["model_dirty"] or state["dirty_tabs"]:
        changes = metadata_changes(saved_metadata, state) or [
            "kernelspec and language_info unchanged: something else modified it"
        ]
        pytest.fail(
            f"{name} is marked modified on opening, before anything ran (model dirty: "
            f"{state['model_dirty']}, tab jp-mod-dirty: {bool(state['dirty_tabs'])}):\n  "
            + "\n  ".join(changes)
        )


def check_saved_dashboard(page, name: str, cell, artifacts: Artifacts) -> None:
    """Step 1b: the saved dashboard shows as widgets (generic classes: any saved version)."""
    assert code_cells_trusted(page, name), (
        f"{name} is not trusted, so JupyterLab shows its saved widgets as text: trust the "
        "committed notebooks first (`make setup` does, and `make test-browser` runs it)"
    )
    saved = cell.locator(".jp-OutputArea-output .widget-vbox").first
    try:
        saved.wait_for(state="attached")
    except Exception:
        text = cell.locator(".jp-OutputArea").text_content()
        pytest.fail(f"the dashboard's saved output is not drawn as widgets: {text[:300]!r}")
    scroll_to(saved)  # and out-of-view cells skip rendering (content-visibility)
    labels = [
        label.strip() for label in cell.locator(".widget-slider .widget-label").all_text_contents()
    ]
    assert labels == ["eps", "batch size", "momentum (PyTorch)"], f"saved sliders: {labels}"
    assert cell.locator(".widget-output img").count() == 1, "the saved dashboard has no figure"
    shown = page.evaluate(
        "() => [...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.textContent)"
    )
    as_text = [t for t in shown if "VBox(children=" in t]
    assert not as_text, f"a widget shows as its text form: {as_text[0][:300]!r}"
    broken = [t for t in shown if "Error displaying widget" in t]
    assert not broken, f"a saved widget cannot be drawn: {broken[0][:300]!r}"
    artifacts.shot("01-opened-page", page)
    artifacts.shot("01-saved-dashboard", saved)


def describe_output(output: dict) -> str:
    """An error output as ``Name: value``, a stream output as its text (shortened)."""
    if output["output_type"] == "error":
        return f"{output['ename']}: {output['evalue']}"
    return "".join(output.get("text", ""))[:500]


def check_run_all(page, name: str, artifacts: Artifacts) -> None:
    """Step 2: Run All runs every code cell, with no error and no stderr output."""
    started = time.monotonic()
    verdict = run_all(page, name)
    wait_for_kernel_idle(page, name, DEFAULT_MS)
    artifacts.notes.append(f"Run All took {time.monotonic() - started:.1f} s")
    cells = cell_report(page, name)
    unfinished = [
        (c["index"], c["prompt"]) for c in cells if c["count"] is None or "*" in (c["prompt"] or "")
    ]
    assert not unfinished, f"code cells not run by Run All (index, prompt): {unfinished}"
    bad = [
        f"cell {c['index']}: {describe_output(o)}"
        for c in cells
        for o in c["outputs"]
        if o["output_type"] == "error" or (o["output_type"] == "stream" and o["name"] == "stderr")
    ]
    assert not bad, "error or stderr output after Run All:\n" + "\n".join(bad)
    assert verdict, "Run All reported a failure though no cell shows an error"
    # The same as drawn: what the reader sees in red.
    for selector in (
        f'.jp-OutputArea-output[data-mime-type="{STDERR_MIME}"]',
        f'.jp-RenderedText[data-mime-type="{STDERR_MIME}"]',
    ):
        drawn = page.locator(selector)
        assert drawn.count() == 0, f"{selector} after Run All: {drawn.first.text_content()[:500]}"


def test_dashboard_in_jupyterlab(lab, browser, artifacts):
    """Open clean with the saved dashboard drawn; Run All; two slider steps; no errors."""
    name, page = NOTEBOOK.name, browser.page
    saved_metadata = json.loads((lab.root / name).read_text())["metadata"]

    # 1. Before running anything.
    open_notebook(page, lab, name)
    check_opens_clean(page, name, saved_metadata)
    mark_cell(page, name, DASHBOARD_CELL, "dashboard-cell")
    cell = page.locator('[data-bnlab-test="dashboard-cell"]')
    check_saved_dashboard(page, name, cell, artifacts)

    # 2. Run All. Mark the saved widget views first: the live dashboard must be a new view.
    page.evaluate(
        "() => document.querySelectorAll('.jupyter-widgets').forEach(e => e.dataset.saved = 1)"
    )
    check_run_all(page, name, artifacts)
    live = cell.locator(".bnlab-dashboard:not([data-saved])")
    assert live.count() == 1, f"expected one new .bnlab-dashboard in its cell, found {live.count()}"
    assert page.locator(".jupyter-widgets[data-saved]").count() == 0, "saved views still shown"
    dashboard = live.first
    src = wait_for_dashboard(page, dashboard, TITLE_DEFAULT, None, "after Run All")
    scroll_to(dashboard)
    figure = dashboard.locator(".bnlab-output")
    shots = [artifacts.shot("02-run-figure", figure)]
    artifacts.shot("02-run-dashboard", dashboard)

    # 3. One step of eps, then one of momentum: a new figure and title each time. The figure
    # is compared, not the page, so the moved slider handle alone cannot pass.
    for step, part, title in ((3, "eps", TITLE_EPS_STEP), (4, "momentum", TITLE_MOMENTUM_STEP)):
        readout = nudge(dashboard, part)
        src = wait_for_dashboard(page, dashboard, title, src, f"one step of {part}")
        shots.append(artifacts.shot(f"0{step}-{part}-figure", figure))
        artifacts.shot(f"0{step}-{part}-dashboard", dashboard)
        artifacts.shot(f"0{step}-{part}-page", page)
        assert shots[-1].read_bytes() != shots[-2].read_bytes(), f"{part}: figure looks the same"
        artifacts.notes.append(f"one step of {part}: readout {readout!r}, title {title!r}")

    # 4. Nothing failed out of sight.
    log = log_console(page, name)
    artifacts.shot("05-log-console-page", page)
    artifacts.notes.append(f"log console: {log['entries'] or log['placeholder']}")
    assert log["placeholder"] != "No source selected.", "the log console shows no notebook"
    errors = [e for e in log["entries"] if e["level"] in ("error", "critical")]
    assert not errors, f"error entries in JupyterLab's log console: {errors}"
    sent, noise = kernel_errors(page)
    probe = sorted({m["text"].strip() for m in noise})
    artifacts.notes.append(
        f"left out {len(noise)} kernel stderr lines of ipywidgets' probe: {probe}"
    )
    assert not sent, f"error or stderr messages from the kernel (parent: request type): {sent}"
    assert not browser.uncaught, f"uncaught errors in the page: {browser.uncaught}"
    assert not browser.console_errors, f"errors in the browser console: {browser.console_errors}"


@pytest.mark.parametrize("euid, sandboxed", [(0, False), (1000, True)], ids=["root", "user"])
def test_chromium_keeps_its_sandbox_unless_it_runs_as_root(euid, sandboxed):
    """Chromium refuses to start as root with its sandbox on; a user's keeps it."""
    args = chromium_args(euid)
    assert ("--no-sandbox" not in args) == sandboxed
    assert "--disable-gpu" in args
