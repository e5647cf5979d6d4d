"""Notebook 03's eps/momentum dashboard in a real browser: JupyterLab driven by Chromium.

``make test-browser`` runs this after ``jupyter trust`` on the committed notebooks. The test
copies ``notebooks/03_scratch.ipynb`` into a temporary folder (JupyterLab's autosave must
never touch the committed file), serves it with the project's own JupyterLab and checks:

1. on open, before anything runs: the notebook is not marked modified, and its saved
   dashboard renders as widgets from the widget state saved in the notebook's metadata
   (which needs the notebook to be trusted, so this also proves the trust step worked);
2. Run All finishes, in FAST mode, with no error and no stderr output;
3. moving the eps slider, then the momentum slider, by one step redraws the dashboard's
   figure and updates its title;
4. JupyterLab's log console (where widget callbacks' errors land) holds no error entries,
   and the page itself logged no errors.

Screenshots and the server log go to ``build/browser/`` (or ``$BNLAB_BROWSER_ARTIFACTS``).
A missing Chromium or Playwright fails the test: a skip would read as a pass.
"""

from __future__ import annotations

import json
import os
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
CHROMIUM = Path("/usr/bin/chromium")
REMEDY = "`make test-browser` installs them"

# Flags for Debian's Chromium: as root it needs --no-sandbox; there is no GPU; and without
# the background-networking flags it keeps retrying Google services on a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}

# Deadlines, so that a hang fails fast and says where. The whole test takes ~30 s on two
# cores; each limit is a few times what its step needs there.
SERVER_START_S = 60
PAGE_LOAD_MS = 60_000
KERNEL_READY_MS = 60_000
RUN_ALL_S = 90
UPDATE_MS = 20_000  # one slider move: a kernel round trip plus a matplotlib redraw
DEFAULT_MS = 15_000  # any other single browser action
SERVER_STOP_S = 15

# The dashboard's title as bnlab.widgets.Dashboard.caption() writes it (numbers `:.3g`), at
# its defaults (which the notebook's last dashboard cell restores), after one step of the
# eps slider (10**-4.75 = 1.778e-05) and after one step more of the momentum slider.
TITLE_DEFAULT = "eps=1e-05 · momentum=0.1 · batch size=16"
TITLE_EPS_STEP = "eps=1.78e-05 · momentum=0.1 · batch size=16"
TITLE_MOMENTUM_STEP = "eps=1.78e-05 · momentum=0.11 · batch size=16"

# JavaScript that finds the notebook's panel among JupyterLab's main-area widgets by path;
# `name` is the argument of the function it is pasted into.
JS_PANEL = (
    "const panel = [...window.jupyterapp.shell.widgets('main')]"
    ".find(w => w.context && w.context.path === name);"
)
# JupyterLab 4 renders both stderr streams and error outputs (tracebacks) with this mime type.
STDERR_MIME = "application/vnd.jupyter.stderr"


# --- artifacts ----------------------------------------------------------------------------


@dataclass
class Artifacts:
    """The folder where screenshots and the server log go, and what was written there."""

    folder: Path
    written: list[Path] = field(default_factory=list)

    def shot(self, name: str, target: Any) -> Path:
        """Screenshot ``target`` (a Playwright page or locator) to ``<folder>/<name>.png``."""
        path = self.folder / f"{name}.png"
        if hasattr(target, "scroll_into_view_if_needed"):
            target.scroll_into_view_if_needed(timeout=DEFAULT_MS)
            target.screenshot(path=str(path), timeout=DEFAULT_MS, animations="disabled")
        else:
            target.screenshot(path=str(path), timeout=DEFAULT_MS)
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

    Its previous ``*.png`` and ``jupyterlab.log`` are removed first, so that a screenshot
    left by an earlier run is never mistaken for this run's. The paths written are printed
    at the end, passing or failing.
    """
    folder = Path(os.environ.get("BNLAB_BROWSER_ARTIFACTS") or ROOT / "build" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("[0-9][0-9]-*.png"), folder / "jupyterlab.log"]:
        old.unlink(missing_ok=True)
    arts = Artifacts(folder.resolve())
    yield arts
    with capsys.disabled():  # shown without -s, and also when the test passes
        print(f"\nbrowser test artifacts in {arts.folder}:")
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
    """User settings for a hermetic JupyterLab: no news or update checks.

    Both would ask the network (closed here) and show a toast over the page's screenshots.
    Everything else keeps JupyterLab's defaults: a separate settings folder only keeps the
    user's own ~/.jupyter/lab settings out of the test.
    """
    target = folder / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    target.parent.mkdir(parents=True)
    target.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))


def log_tail(log: Path, lines: int = 40) -> str:
    """The end of the server log, for failure messages."""
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_server(url: str, token: str, proc: subprocess.Popen, log: Path) -> None:
    """Poll ``/api/status`` until the server answers with the token, or fail at the deadline."""
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
    """Stop the server (it shuts its kernels down on SIGTERM); kill its group if it hangs."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=SERVER_STOP_S)
    except subprocess.TimeoutExpired:
        # The server runs in its own session, so this takes down its kernels too.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=SERVER_STOP_S)


@pytest.fixture
def lab(tmp_path, artifacts):
    """JupyterLab serving a copy of notebook 03, in FAST mode; stopped, log kept, at the end."""
    root = tmp_path / "root"
    root.mkdir()
    # A byte-identical copy: notebook trust is keyed by content hash in the user's Jupyter
    # data folder, so the copy is trusted exactly when `jupyter trust` trusted the original.
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
        "--ServerApp.port_retries=0",  # fail on a taken port instead of serving elsewhere
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp_path / 'lab-workspaces'}",  # no restored layout
        "--expose-app-in-browser",  # window.jupyterapp, to run JupyterLab commands
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
            start_new_session=True,  # its own process group, see stop_server
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
class PageErrors:
    """Errors the page reported: console messages of type error and uncaught exceptions."""

    console: list[str] = field(default_factory=list)
    uncaught: list[str] = field(default_factory=list)


def sync_playwright_or_fail():
    """Playwright's sync API; fails (never skips) with the remedy when it is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright Python package is missing: {REMEDY}")
    return sync_playwright


@dataclass
class Browser:
    """A Chromium page and the errors it has reported so far."""

    page: Any
    errors: PageErrors


@pytest.fixture
def browser(lab, artifacts):
    """A page of Debian's Chromium that records its errors, closed at the end.

    Depends on ``lab`` so that the browser closes before the server stops. The page's last
    state is saved as ``99-last-page.png``, passing or failing: it shows where a failure was.
    """
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: {REMEDY}")
    playwright = sync_playwright_or_fail()().start()
    try:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=DEFAULT_MS
        )
        try:
            page = chromium.new_page(viewport=VIEWPORT)
            page.set_default_timeout(DEFAULT_MS)
            errors = PageErrors()
            page.on("console", lambda m: m.type == "error" and errors.console.append(describe(m)))
            page.on("pageerror", lambda e: errors.uncaught.append(str(e)))
            yield Browser(page, errors)
            try:
                artifacts.shot("99-last-page", page)
            except Exception as error:  # a crashed page must not hide the test's own failure
                print(f"no last screenshot: {error}")
        finally:
            chromium.close()
    finally:
        playwright.stop()


def describe(message) -> str:
    """A console message with where it came from."""
    where = message.location or {}
    return f"{message.text} ({where.get('url', '?')}:{where.get('lineNumber', '?')})"


# --- steps in the page --------------------------------------------------------------------


def evaluate_async(page, body: str, arg: Any, timeout_s: float, what: str) -> Any:
    """Run ``body`` (an async JS function body that sees ``name = arg``) with a deadline.

    ``page.evaluate`` itself has no timeout: a promise that never settles (a command that
    hangs) would hang the test, so the page races it against a timer.
    """
    script = (
        "async ([name, ms, what]) => {"
        "  const work = (async () => {" + body + "})();"
        "  const timer = new Promise((_, reject) => setTimeout("
        "    () => reject(new Error(`timed out after ${ms / 1000} s: ${what}`)), ms));"
        "  return await Promise.race([work, timer]);"
        "}"
    )
    return page.evaluate(script, [arg, timeout_s * 1000, what])


def open_notebook(page, lab: Lab, name: str) -> dict:
    """Open ``name``, wait until its kernel has started and sent its info; return that info.

    The info matters for the "modified" check: JupyterLab writes the kernel's kernelspec
    and language_info into the notebook's metadata, and only a mismatch marks it modified.
    """
    page.goto(lab.tree_url(name), wait_until="domcontentloaded", timeout=PAGE_LOAD_MS)
    page.wait_for_function(
        "(name) => { if (!window.jupyterapp) return false;" + JS_PANEL + " return !!panel; }",
        arg=name,
        timeout=PAGE_LOAD_MS,
    )
    info = evaluate_async(
        page,
        JS_PANEL
        + """
        await panel.context.ready;
        await panel.sessionContext.ready;
        const kernel = panel.sessionContext.session.kernel;
        const info = await kernel.info;
        const spec = await kernel.spec;
        return {display_name: spec.display_name, language: info.language_info.name};
        """,
        name,
        KERNEL_READY_MS / 1000,
        "the notebook's kernel to start and send its info",
    )
    wait_for_kernel_idle(page, name, KERNEL_READY_MS)
    # JupyterLab copies the kernel's info into the metadata when it arrives: wait for that,
    # so that the modified check below sees the state after it, not before.
    page.wait_for_function(
        "([name, want]) => {"
        + JS_PANEL
        + """
        const spec = panel.model.getMetadata('kernelspec') || {};
        const lang = panel.model.getMetadata('language_info') || {};
        return spec.display_name === want.display_name && lang.name === want.language;
        }""",
        arg=[name, info],
        timeout=DEFAULT_MS,
    )
    return info


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
    """Whether the notebook is modified: in its model and as JupyterLab shows it.

    JupyterLab puts ``jp-mod-dirty`` on the document's tab in the main area (its title's
    class); the tab repaints on the next animation frame, hence the two frames waited.
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
            metadata: {
                kernelspec: panel.model.getMetadata('kernelspec'),
                language_info: panel.model.getMetadata('language_info'),
            },
        };
        """,
        name,
        DEFAULT_MS / 1000,
        "reading the notebook's modified state",
    )


def mark_cell(page, name: str, source_part: str, mark: str) -> int:
    """Give the code cell whose source contains ``source_part`` ``data-bnlab-test=<mark>``.

    Finding the cell by its source, not its index, survives cells added above it; the mark
    then names the cell's node, which stays the same when Run All replaces its outputs.
    """
    index = evaluate_async(
        page,
        JS_PANEL
        + """
        const [part, mark] = MARK_ARGS;
        const cells = panel.content.widgets.filter(
            c => c.model.type === 'code' && c.model.sharedModel.getSource().includes(part));
        if (cells.length !== 1) return -cells.length - 1;
        cells[0].node.dataset.bnlabTest = mark;
        return panel.content.widgets.indexOf(cells[0]);
        """.replace("MARK_ARGS", json.dumps([source_part, mark])),
        name,
        DEFAULT_MS / 1000,
        "marking the dashboard cell",
    )
    assert index >= 0, f"expected one code cell containing {source_part!r}, found {-index - 1}"
    return index


def notebook_outputs(page, name: str) -> list[dict]:
    """Every cell's outputs from the notebook's model (also those of cells not in the DOM)."""
    return evaluate_async(
        page,
        JS_PANEL
        + """
        const found = [];
        panel.content.widgets.forEach((cell, index) => {
            if (cell.model.type !== 'code') return;
            const outputs = cell.model.outputs;
            for (let i = 0; i < outputs.length; i++) {
                const out = outputs.get(i).toJSON();
                found.push({cell: index, prompt: cell.model.executionCount, ...out});
            }
        });
        return found;
        """,
        name,
        DEFAULT_MS / 1000,
        "reading the notebook's outputs",
    )


def run_all(page, name: str) -> bool:
    """Run All; return JupyterLab's verdict (false when a cell failed).

    The command's promise settles when every cell has been executed, so no polling of
    prompts is needed for "finished"; the prompts are checked afterwards all the same.
    """
    return evaluate_async(
        page,
        JS_PANEL
        + """
        window.jupyterapp.shell.activateById(panel.id);
        return await window.jupyterapp.commands.execute('notebook:run-all-cells');
        """,
        name,
        RUN_ALL_S,
        "Run All",
    )


def code_cell_prompts(page, name: str) -> list[tuple[int, str, Any]]:
    """(index, prompt text, execution count) of every code cell that has source."""
    return [
        tuple(row)
        for row in evaluate_async(
            page,
            JS_PANEL
            + """
            return panel.content.widgets
                .map((cell, index) => [cell, index])
                .filter(([cell]) => cell.model.type === 'code'
                                    && cell.model.sharedModel.getSource().trim() !== '')
                .map(([cell, index]) => [index,
                    cell.node.querySelector('.jp-InputPrompt').textContent.trim(),
                    cell.model.executionCount]);
            """,
            name,
            DEFAULT_MS / 1000,
            "reading the cells' prompts",
        )
    ]


def title_text(dashboard) -> str:
    """The dashboard's title as the reader sees it."""
    return dashboard.locator(".bnlab-title").text_content(timeout=DEFAULT_MS).strip()


def figure_src(dashboard) -> str:
    """The ``src`` (a data: URL) of the single figure in the dashboard's Output widget."""
    images = dashboard.locator(".bnlab-output img")
    assert images.count() == 1, f"expected one <img> in .bnlab-output, found {images.count()}"
    return images.get_attribute("src", timeout=DEFAULT_MS)


def wait_for_dashboard(page, dashboard, title: str, old_src: str | None, what: str) -> str:
    """Wait until the title reads ``title`` and the figure is not ``old_src``; return its src.

    The kernel sets the title before it draws, so both are waited for, together.
    """
    handle = dashboard.element_handle(timeout=DEFAULT_MS)
    try:
        page.wait_for_function(
            """([el, title, oldSrc]) => {
                const t = el.querySelector('.bnlab-title');
                const imgs = el.querySelectorAll('.bnlab-output img');
                return !!t && t.textContent.trim() === title && imgs.length === 1
                    && imgs[0].getAttribute('src') !== oldSrc;
            }""",
            arg=[handle, title, old_src],
            timeout=UPDATE_MS,
        )
    except Exception as error:  # Playwright's TimeoutError: say what was seen instead
        seen = title_text(dashboard)
        pytest.fail(
            f"{what}: expected title {title!r} and a new figure; title is {seen!r} ({error})"
        )
    return figure_src(dashboard)


def nudge(page, dashboard, part: str) -> str:
    """Move the slider ``.bnlab-<part>`` one step right with the keyboard; return its readout.

    ipywidgets 8 draws sliders with noUiSlider, whose focused handle moves by exactly one
    ``step`` per ArrowRight (a mouse drag would move by a distance that depends on layout).
    """
    handle = dashboard.locator(f".bnlab-{part} .noUi-handle")
    assert handle.count() == 1, f"expected one slider handle in .bnlab-{part}"
    handle.focus(timeout=DEFAULT_MS)
    handle.press("ArrowRight", timeout=DEFAULT_MS)
    return dashboard.locator(f".bnlab-{part} .widget-readout").text_content().strip()


def log_console_entries(page, name: str) -> dict:
    """Open JupyterLab's log console on the notebook; return its entries and placeholder.

    Widget callbacks run outside any cell: ipywidgets sends their errors and stderr there
    (level "error") and their stdout (level "warning"). Each entry's prompt carries
    ``data-log-level``; an empty console shows a placeholder ("No log messages.").
    """
    evaluate_async(
        page,
        "await window.jupyterapp.commands.execute('logconsole:open', {source: name});",
        name,
        DEFAULT_MS / 1000,
        "opening the log console",
    )
    page.locator(".jp-LogConsolePanel").first.wait_for(state="visible", timeout=DEFAULT_MS)
    return page.evaluate("""() => {
        const panel = document.querySelector('.jp-LogConsolePanel');
        const entries = [...panel.querySelectorAll('[data-log-level]')].map(p => ({
            level: p.dataset.logLevel,
            text: (p.closest('.jp-OutputArea-child') || p).innerText.trim().slice(0, 500),
        }));
        const holder = panel.querySelector('.jp-LogConsoleListPlaceholder');
        return {entries, placeholder: holder ? holder.innerText.trim() : null};
    }""")


# --- the test -----------------------------------------------------------------------------


def test_dashboard_in_jupyterlab(lab, browser, artifacts):
    """Open, check the saved state, Run All, move two sliders, check the logs."""
    name, page = NOTEBOOK.name, browser.page

    # 1. Before running anything: not modified, saved dashboard rendered as widgets.
    kernel = open_notebook(page, lab, name)
    state = modified_state(page, name)
    assert state["tabs"] == 1, f"expected one tab named {name}, found {state['tabs']}"
    assert not state["model_dirty"] and not state["dirty_tabs"], (
        f"{name} is marked modified right after opening, before anything ran: its saved "
        f"metadata differs from what JupyterLab writes for this kernel ({kernel}); "
        f"metadata now: {json.dumps(state['metadata'])}"
    )

    mark_cell(page, name, "widgets.dashboard(", "dashboard-cell")
    cell = page.locator('[data-bnlab-test="dashboard-cell"]')
    saved = cell.locator(".jp-OutputArea-output .widget-vbox").first
    try:
        saved.wait_for(state="attached", timeout=DEFAULT_MS)
    except Exception:
        text = cell.locator(".jp-OutputArea").inner_text()
        pytest.fail(
            "the dashboard cell's saved output did not render as widgets (is the notebook "
            f"trusted? `make test-browser` runs `jupyter trust` first); it shows: {text[:300]!r}"
        )
    trusted = evaluate_async(
        page,
        JS_PANEL + "return panel.content.widgets.filter(c => c.model.type === 'code')"
        ".every(c => c.model.trusted);",
        name,
        DEFAULT_MS / 1000,
        "reading trust",
    )
    assert trusted, "the copy of the notebook is not trusted: run `jupyter trust` on it first"
    # Cells out of view skip rendering (content-visibility), and with it innerText: scroll.
    cell.scroll_into_view_if_needed()
    labels = cell.locator(".widget-slider .widget-label").all_text_contents()
    assert [label.strip() for label in labels] == ["eps", "batch size", "momentum (PyTorch)"], (
        f"the saved dashboard's sliders are {labels}"
    )
    assert cell.locator(".widget-output img").count() == 1, "the saved dashboard has no figure"
    as_text = page.locator(".jp-OutputArea-output", has_text="VBox(children=")
    assert as_text.count() == 0, "a widget shows as its text form `VBox(children=...`"
    errors_shown = page.locator(".jp-OutputArea-output", has_text="Error displaying widget")
    assert errors_shown.count() == 0, errors_shown.first.inner_text()
    artifacts.shot("01-opened-page", page)
    artifacts.shot("01-saved-dashboard", saved)

    # 2. Run All. Mark the saved widgets' nodes first: the live dashboard must be a new one.
    page.evaluate(
        "() => document.querySelectorAll('.jupyter-widgets')"
        ".forEach(e => e.dataset.bnlabSaved = '1')"
    )
    started = time.monotonic()
    ok = run_all(page, name)
    wait_for_kernel_idle(page, name, DEFAULT_MS)
    run_s = time.monotonic() - started
    prompts = code_cell_prompts(page, name)
    unfinished = [(i, p) for i, p, count in prompts if count is None or p in ("[*]:", "[ ]:")]
    assert not unfinished, f"code cells not run after Run All (index, prompt): {unfinished}"
    outputs = notebook_outputs(page, name)
    bad = [
        o
        for o in outputs
        if o["output_type"] == "error" or (o["output_type"] == "stream" and o["name"] == "stderr")
    ]
    assert not bad, "error or stderr output after Run All:\n" + "\n".join(
        f"cell {o['cell']}: {o.get('ename') or ''} {o.get('evalue') or o.get('text', '')}"
        for o in bad
    )
    assert ok, "Run All reported a failure though no cell shows an error"
    # The same, as rendered: what a reader would see in red.
    for selector in (
        f'.jp-OutputArea-output[data-mime-type="{STDERR_MIME}"]',
        f'.jp-RenderedText[data-mime-type="{STDERR_MIME}"]',
    ):
        shown = page.locator(selector)
        assert shown.count() == 0, f"{selector} after Run All: {shown.first.inner_text()[:500]}"

    live = cell.locator(".bnlab-dashboard:not([data-bnlab-saved])")
    assert live.count() == 1, f"expected one new .bnlab-dashboard, found {live.count()}"
    assert page.locator("[data-bnlab-saved]").count() == 0, "saved widget views still shown"
    dashboard = live.first
    src = wait_for_dashboard(page, dashboard, TITLE_DEFAULT, None, "after Run All")
    artifacts.shot("02-run-dashboard", dashboard)

    # 3. One step of eps, then one of momentum: new figure, new title each time.
    shots = [artifacts.shot("02-run-figure", dashboard.locator(".bnlab-output"))]
    for part, title, step in (("eps", TITLE_EPS_STEP, 3), ("momentum", TITLE_MOMENTUM_STEP, 4)):
        readout = nudge(page, dashboard, part)
        new_src = wait_for_dashboard(page, dashboard, title, src, f"one step of {part}")
        assert new_src != src
        src = new_src
        shots.append(artifacts.shot(f"0{step}-{part}-figure", dashboard.locator(".bnlab-output")))
        artifacts.shot(f"0{step}-{part}-dashboard", dashboard)
        artifacts.shot(f"0{step}-{part}-page", page)
        assert shots[-1].read_bytes() != shots[-2].read_bytes(), f"{part}: figure looks the same"
        print(f"{part}: readout {readout!r}, title {title!r}")

    # 4. Nothing went wrong out of sight: log console, browser console, uncaught errors.
    log = log_console_entries(page, name)
    artifacts.shot("05-log-console-page", page)
    assert log["placeholder"] != "No source selected.", "the log console shows no notebook"
    errors = [e for e in log["entries"] if e["level"] in ("error", "critical")]
    assert not errors, f"error entries in JupyterLab's log console: {errors}"
    assert not browser.errors.uncaught, f"uncaught errors in the page: {browser.errors.uncaught}"
    assert not browser.errors.console, f"errors in the browser console: {browser.errors.console}"
    print(f"Run All took {run_s:.1f} s; log console: {log}")
