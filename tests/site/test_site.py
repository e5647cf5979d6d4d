"""The course's website (``make site``) in a real browser: Debian's Chromium, offline.

``make test-site`` runs this after building ``build/site``. The site is served on a free
local port by a server in this process, and Chromium is driven with Playwright, as the
JupyterLab test does (its launch helpers are reused). Every request that leaves the local
server is failed and recorded: the site must load nothing from outside itself. Checked:

1. every page loads with no console error and no uncaught exception; every ``.math``
   element is typeset by MathJax (no TeX error); every image decoded; figures at the size
   they were stored; long code scrolls inside its block, never the page;
2. every link inside the site resolves, to a page and to an id on it (read from the files);
3. the deep dives are closed ``<details>``, and open when a link leads into them;
4. notebook 03's saved dashboard shows its widget view, and with the widget manager
   blocked, its stored PNG;
5. Chinese text is drawn with a CJK font (Chromium's own account of the fonts it used);
6. the search page finds ``running_var``.

Screenshots go to ``build/site-shots/`` (or ``$BNLAB_SITE_SHOTS``). This file is not
collected by the unit run (``pytest tests`` ignores ``tests/site``, see pyproject.toml):
it needs the built site and the browser, which ``make test-site`` provides.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import threading
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import pytest
from browser.test_lab import (
    CHROMIUM,
    DEFAULT_MS,
    VIEWPORT,
    chromium_args,
    describe,
    sync_playwright_or_fail,
)

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "build" / "site"
BUILT = SITE / ".built"  # written by website/build.py when a build passed all its checks
REMEDY = "`make test-site` builds the site and installs Chromium and the CJK fonts"
PAGE_LOAD_MS = 60_000
MATHJAX_MS = 60_000  # typesetting the longest page on two busy cores takes a few seconds

# Families that hold Chinese glyphs: Debian's Noto CJK, and the system fonts the site's
# style sheet names for readers on other systems.
CJK_FAMILY = re.compile(
    r"CJK|Source Han|PingFang|Hiragino|YaHei|WenQuanYi|Droid Sans Fallback|Noto Sans SC", re.I
)
HAN = re.compile(r"[\u3400-\u9fff]")
DASHBOARD_LABELS = ["eps", "batch size", "momentum (PyTorch)"]


def content_pages() -> list[str]:
    """Every page of the site, relative to its root (the theme's own fragments left out)."""
    return sorted(
        str(p.relative_to(SITE)) for p in SITE.rglob("*.html") if "_static" not in p.parts
    )


# --- the server ---------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the test reports what matters itself
        pass


@pytest.fixture(scope="module")
def site_url():
    """build/site served on 127.0.0.1, a free port, from a thread; stopped at the end."""
    if not BUILT.exists():
        pytest.fail(f"no built site at {SITE} (no {BUILT.name}): {REMEDY}")
    handler = functools.partial(QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# --- the browser --------------------------------------------------------------------------


@dataclass
class Tab:
    """A Chromium page and what went wrong in it since the last ``take_problems``."""

    page: Any
    base: str
    console_errors: list[str] = field(default_factory=list)
    uncaught: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    blocked_inside: list[str] = field(default_factory=list)

    def take_problems(self) -> list[str]:
        problems = [f"console error: {e}" for e in self.console_errors]
        problems += [f"uncaught: {e}" for e in self.uncaught]
        problems += [f"request outside the site: {u}" for u in self.outside]
        for found in (self.console_errors, self.uncaught, self.outside):
            found.clear()
        return problems

    def open(self, path: str) -> None:
        self.page.goto(self.base + path, wait_until="load", timeout=PAGE_LOAD_MS)


@pytest.fixture(scope="module")
def shots():
    folder = Path(os.environ.get("BNLAB_SITE_SHOTS") or ROOT / "build" / "site-shots")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    written: list[Path] = []
    yield lambda name, target: _shot(folder, written, name, target)
    print(f"\nsite test screenshots in {folder}: {len(written)}")


def _shot(folder: Path, written: list[Path], name: str, target) -> Path:
    path = folder / f"{name}.png"
    target.screenshot(path=str(path), timeout=DEFAULT_MS, animations="disabled")
    written.append(path)
    return path


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: {REMEDY}")
    playwright = sync_playwright_or_fail()().start()
    try:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=chromium_args(), timeout=DEFAULT_MS
        )
        try:
            yield browser
        finally:
            browser.close()
    finally:
        playwright.stop()


def new_tab(chromium, site_url: str, block_inside: tuple[str, ...] = ()) -> Tab:
    """A fresh page whose requests outside ``site_url`` are failed and recorded.

    ``block_inside``: paths of the site to fail as well (to see what a reader sees when a
    script cannot load).
    """
    context = chromium.new_context(viewport=VIEWPORT, service_workers="block")
    page = context.new_page()
    page.set_default_timeout(DEFAULT_MS)
    tab = Tab(page, site_url)

    def route(r) -> None:
        url = r.request.url
        if url.startswith(("data:", "blob:")):
            r.continue_()
        elif not url.startswith(site_url):
            tab.outside.append(url)
            r.abort("blockedbyclient")
        elif any(urlsplit(url).path.endswith(p) for p in block_inside):
            tab.blocked_inside.append(url)
            r.abort("blockedbyclient")
        else:
            r.continue_()

    context.route("**/*", route)
    page.on("console", lambda m: m.type == "error" and tab.console_errors.append(describe(m)))
    page.on("pageerror", lambda e: tab.uncaught.append(str(e)))
    return tab


@pytest.fixture(scope="module")
def tab(chromium, site_url):
    tab = new_tab(chromium, site_url)
    yield tab
    tab.page.context.close()


# --- what a page shows --------------------------------------------------------------------


def wait_for_math(page) -> dict:
    """Wait for MathJax's first typeset; count the math elements and the typeset ones.

    ``page.evaluate`` has no deadline of its own, so the wait for MathJax to start has one.
    """
    return page.evaluate(
        """async (ms) => {
        const math = [...document.querySelectorAll('.math')];
        if (!math.length) return {math: 0, typeset: 0, errors: [], mathjax: !!window.MathJax};
        const started = Date.now();
        while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
            if (Date.now() - started > ms) return {math: math.length, typeset: 0,
                errors: ['MathJax did not start'], mathjax: false};
            await new Promise(r => setTimeout(r, 100));
        }
        const timer = new Promise((_, reject) => setTimeout(
            () => reject(new Error('MathJax did not finish typesetting')), ms));
        await Promise.race([MathJax.startup.promise, timer]);
        return {
            math: math.length,
            typeset: math.filter(m => m.querySelector('mjx-container')).length,
            errors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent),
            mathjax: true,
        };
        }""",
        MATHJAX_MS,
    )


IMAGES_JS = """() => [...document.images].map(img => {
    const box = img.parentElement, style = getComputedStyle(box);
    return {
        src: (img.currentSrc || img.src).slice(0, 120),
        complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
        shown: [img.width, img.height],
        hidden: getComputedStyle(img).display === 'none' || !img.offsetParent,
        figure: !!img.closest('div.cell_output'),
        column: box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight),
    };
})"""


def figure_size_problem(img: dict) -> str | None:
    """A figure is shown at its stored size; one wider than its column, shrunk to fit it
    with its proportions (the reader can click it to its stored size)."""
    (width, height), (shown_w, shown_h) = img["natural"], img["shown"]
    if width <= img["column"] + 1:
        fits = (shown_w, shown_h) == (width, height)
    else:
        fits = abs(shown_w - img["column"]) <= 1 and abs(shown_h - shown_w * height / width) <= 1
    return (
        None
        if fits
        else f"figure shown at {img['shown']}, stored {img['natural']}, "
        + (f"column {img['column']:.0f}: {img['src']}")
    )


LAYOUT_JS = """() => {
    const pres = [...document.querySelectorAll('pre')];
    const wide = pres.filter(p => p.scrollWidth > p.clientWidth + 1);
    const toc = document.querySelector('.bd-sidebar-secondary');
    return {
        page: [document.documentElement.scrollWidth, window.innerWidth],
        toc: toc ? [toc.scrollWidth, toc.clientWidth] : [0, 0],
        widePre: wide.length,
        notScrollable: wide.filter(p => !['auto', 'scroll'].includes(getComputedStyle(p).overflowX))
            .map(p => p.textContent.slice(0, 80)),
    };
}"""


def page_problems(tab: Tab, path: str) -> tuple[list[str], dict]:
    """Load ``path`` and say what is wrong with it; and what was seen."""
    page = tab.page
    tab.open(path)
    math = wait_for_math(page)
    images = page.evaluate(IMAGES_JS)
    layout = page.evaluate(LAYOUT_JS)
    problems = tab.take_problems()
    if math["math"] and math["typeset"] != math["math"]:
        problems.append(f"{math['math'] - math['typeset']} of {math['math']} math not typeset")
    problems += [f"MathJax error: {e}" for e in math["errors"]]
    for img in images:
        if not img["complete"] or img["natural"][0] == 0:
            problems.append(f"image not decoded: {img['src']}")
        elif img["figure"] and not img["hidden"] and figure_size_problem(img):
            problems.append(figure_size_problem(img))
    if layout["page"][0] > layout["page"][1] + 1:
        problems.append(f"the page scrolls sideways: {layout['page']}")
    if layout["toc"][0] > layout["toc"][1] + 1:
        problems.append(f"the table of contents is wider than its column: {layout['toc']}")
    problems += [f"long code that does not scroll: {t!r}" for t in layout["notScrollable"]]
    seen = {
        "math": math["math"],
        "figures": sum(i["figure"] for i in images),
        "images": len(images),
        "wide code": layout["widePre"],
    }
    return [f"{path}: {p}" for p in problems], seen


def shot_name(path: str) -> str:
    return "page-" + path.removesuffix(".html").replace("/", "-")


# --- the tests ----------------------------------------------------------------------------


def test_every_page_loads_offline_clean(tab, shots, capsys):
    """Console, requests, math, images, figure sizes and code blocks on every page."""
    pages = content_pages()
    assert "index.html" in pages and len(pages) >= 13, f"too few pages: {pages}"
    problems, seen = [], {}
    for path in pages:
        found, seen[path] = page_problems(tab, path)
        problems += found
        shots(shot_name(path), tab.page)
        figure = tab.page.locator("div.cell_output img")
        if figure.count():  # the first figure, with the text around it
            figure.first.evaluate("img => img.scrollIntoView({block: 'center'})")
            shots(shot_name(path) + "-figure", tab.page)
    with capsys.disabled():
        print()
        for path, what in seen.items():
            print(f"site test: {path}: {what}")
    notebooks = [p for p in pages if p.startswith("notebooks/")]
    assert len(notebooks) == len(list((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")))
    assert sum(seen[p]["math"] for p in notebooks) > 100, "hardly any math on the pages"
    assert all(seen[p]["figures"] for p in notebooks[:9]), "a teaching notebook has no figure"
    assert not problems, "\n".join(problems)


def test_a_shrunk_figure_shows_at_its_stored_size_on_a_click(tab, shots):
    """01's histograms are wider than the column: shrunk to fit, a click gives their pixels."""
    page = tab.page
    tab.open("notebooks/01_concepts.html")
    wide = page.locator("div.cell_output img.bnlab-zoomable").first
    wide.scroll_into_view_if_needed()
    size = "img => [img.width, img.naturalWidth, img.parentElement.clientWidth]"
    shown, stored, column = wide.evaluate(size)
    assert shown < stored and abs(shown - column) <= 1, (shown, stored, column)
    wide.click()
    shown, stored, _ = wide.evaluate(size)
    assert shown == stored, "a click did not show the figure at its stored size"
    shots("figure-01-stored-size", page)
    wide.click()
    assert wide.evaluate(size)[0] < stored, "a second click did not fit it to the column again"
    assert not tab.take_problems()


class Links(HTMLParser):
    """The ids and the hrefs of one page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])


def test_every_link_inside_the_site_resolves():
    """Each relative link names a file of the site, and its #fragment an id on that page."""
    parsed: dict[str, Links] = {}
    for path in content_pages():
        links = Links()
        links.feed((SITE / path).read_text())
        parsed[path] = links
    broken, checked = [], 0
    for path, links in parsed.items():
        for href in links.hrefs:
            if urlsplit(href).scheme or href.startswith(("//", "mailto:")):
                continue  # a link out, which a reader may follow: not loaded by the page
            target = urlsplit(urljoin("http://site/" + path, href))
            name = unquote(target.path).lstrip("/") or "index.html"
            checked += 1
            if not (SITE / name).is_file():
                broken.append(f"{path}: {href} (no {name})")
            elif target.fragment and name in parsed:
                if unquote(target.fragment) not in parsed[name].ids:
                    broken.append(f"{path}: {href} (no id {target.fragment!r} on {name})")
    assert checked > 200, f"only {checked} links inside the site"
    glossary = [h for p, lk in parsed.items() if p.startswith("notebooks/") for h in lk.hrefs]
    assert any(h.endswith("docs/glossary.html") for h in glossary), "no notebook links the glossary"
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:40])


def deep_dive_pages() -> dict[str, bool]:
    """notebook page -> whether the reading-time tool finds a deep dive in it."""
    from bnlab.teaching.path import deep_dive_start

    found = {}
    for path in sorted((ROOT / "build" / "site-src" / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        found[f"notebooks/{path.stem}.html"] = deep_dive_start(nb) < len(nb["cells"])
    return found


def test_deep_dives_are_closed_and_open_on_a_link(tab, shots):
    """One closed <details> per deep dive; a click opens it; so does a link into it."""
    expected = deep_dive_pages()
    assert any(expected.values()) and not all(expected.values()), expected
    page = tab.page
    for path, has_deep_dive in expected.items():
        tab.open(path)
        details = page.locator("details.bnlab-deep-dive")
        assert details.count() == int(has_deep_dive), f"{path}: {details.count()} deep dives"
        if not has_deep_dive:
            continue
        assert details.get_attribute("open") is None, f"{path}: the deep dive starts open"
        heading = details.locator("section h2").first
        assert not heading.is_visible(), f"{path}: the closed deep dive shows its heading"
        assert details.locator("summary").inner_text().startswith("Deep dive")
    path = next(p for p, has in expected.items() if has)
    tab.open(path)
    summary = page.locator("details.bnlab-deep-dive > summary")
    summary.scroll_into_view_if_needed()
    shots("deep-dive-closed", summary)
    summary.click()
    assert page.locator("details.bnlab-deep-dive section h2").first.is_visible()
    # A link into it (the page's table of contents, a search result) opens it too.
    section_id = page.locator("details.bnlab-deep-dive section").first.get_attribute("id")
    tab.open(path + "#" + section_id)
    page.wait_for_function(
        "() => document.querySelector('details.bnlab-deep-dive').open", timeout=DEFAULT_MS
    )
    assert not tab.take_problems()


def dashboard_state(page) -> dict:
    """What the 03 dashboard's output shows: its widget view, and its stored PNG."""
    return page.evaluate(
        """() => {
        const png = document.querySelector('img.bnlab-widget-fallback');
        const cell = png && png.closest('div.cell_output');
        const view = cell && cell.querySelector('.widget-subarea');
        const figure = view && view.querySelector('img');
        return {
            png: !!png, pngShown: !!png && !!png.offsetParent && png.naturalWidth > 0,
            view: !!view, labels: view ? [...view.querySelectorAll('.widget-slider .widget-label')]
                .map(l => l.textContent.trim()) : [],
            viewFigure: !!figure && figure.naturalWidth > 0 && !!figure.offsetParent,
            text: view ? view.textContent.slice(0, 200) : '',
        };
    }"""
    )


def test_dashboard_shows_its_widget_view_or_its_png(chromium, site_url, tab, shots):
    page = tab.page
    tab.open("notebooks/03_scratch.html")
    page.wait_for_selector("div.cell_output .widget-subarea .widget-slider", state="attached")
    page.wait_for_function(
        "() => { const v = document.querySelector('div.cell_output .widget-subarea');"
        " const i = v && v.querySelector('img'); return !!i && i.complete; }"
    )
    state = dashboard_state(page)
    assert state["view"] and state["labels"] == DASHBOARD_LABELS, state
    assert state["viewFigure"], f"the dashboard's view shows no figure: {state}"
    assert state["png"] and not state["pngShown"], f"the PNG shows beside the view: {state}"
    view = page.locator("div.cell_output .widget-subarea").first
    view.scroll_into_view_if_needed()
    shots("dashboard-03-widget-view", view)
    shots("dashboard-03-page", page)
    assert not tab.take_problems()

    # Without the widget manager (a script that failed to load), the stored PNG shows.
    blocked = new_tab(chromium, site_url, block_inside=("vendor/html-manager/embed.js",))
    try:
        blocked.open("notebooks/03_scratch.html")
        state = dashboard_state(blocked.page)
        assert blocked.blocked_inside, "the widget manager was not requested"
        assert state["png"] and state["pngShown"] and not state["view"], state
        png = blocked.page.locator("img.bnlab-widget-fallback")
        png.scroll_into_view_if_needed()
        shots("dashboard-03-png-without-widgets", png)
        assert not blocked.outside
    finally:
        blocked.page.context.close()


CJK_MARK_JS = """() => {
    // The first element of the article whose own text is a Chinese passage (8 or more Han
    // characters), else the first with any: marked for CDP.
    const han = (t) => (t.match(/[\\u3400-\\u9fff]/g) || []).length;
    const texts = [];
    const walker = document.createTreeWalker(
        document.querySelector('article') || document.body, NodeFilter.SHOW_TEXT);
    for (let n = walker.nextNode(); n; n = walker.nextNode()) {
        if (han(n.textContent) && n.parentElement.offsetParent) texts.push(n);
    }
    const n = texts.find(t => han(t.textContent) >= 8) || texts[0];
    if (!n) return null;
    const el = n.parentElement;
    el.setAttribute('data-bnlab-cjk', '1');
    el.scrollIntoView({block: 'center'});
    return [...el.childNodes].filter(c => c.nodeType === 3).map(c => c.textContent).join('');
}"""


@pytest.mark.parametrize("path", ["index.html", "docs/glossary.html", "notebooks/01_concepts.html"])
def test_chinese_is_drawn_in_a_cjk_font(tab, shots, path):
    """Chromium's own account (DevTools' CSS.getPlatformFontsForNode) of the fonts it drew
    a Chinese passage with: a CJK font drew at least one glyph per Han character (without
    one, the characters are drawn as empty boxes by the Latin font)."""
    page = tab.page
    tab.open(path)
    text = page.evaluate(CJK_MARK_JS)
    assert text, f"{path}: no Chinese text found"
    cdp = page.context.new_cdp_session(page)
    try:
        cdp.send("DOM.enable")
        cdp.send("CSS.enable")
        root = cdp.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": "[data-bnlab-cjk]"})
        fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node["nodeId"]})["fonts"]
    finally:
        cdp.detach()
    han = len(HAN.findall(text))
    cjk = sum(f["glyphCount"] for f in fonts if CJK_FAMILY.search(f["familyName"]))
    used = {f["familyName"]: f["glyphCount"] for f in fonts}
    assert han and cjk >= han, (
        f"{path}: {han} Han characters in {text[:60]!r}, {cjk} glyphs from a CJK font; "
        f"fonts used: {used} (Debian: apt install fonts-noto-cjk; {REMEDY})"
    )
    shots(shot_name(path) + "-chinese", page)
    assert not tab.take_problems()


def test_search_finds_running_var(tab, shots):
    page = tab.page
    tab.open("search.html?q=running_var")
    results = page.locator("#search-results ul.search li")
    page.wait_for_function(
        "() => { const s = document.querySelector('#search-results .search-summary');"
        " return !!s && /Search finished/.test(s.textContent); }",
        timeout=PAGE_LOAD_MS,
    )
    found = [
        results.nth(i).locator("a").first.get_attribute("href") for i in range(results.count())
    ]
    shots("search-running_var", page)
    assert found, "searching running_var found nothing"
    # The pages that teach the running statistics are among the results.
    assert any("03_scratch" in h for h in found), found
    assert not tab.take_problems()
