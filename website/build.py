"""Build the course as a static website in ``build/site`` (``make site``).

Three steps, each its own command so that the Makefile can run the one that needs the
network apart from the ones that must not:

``vendor``
    Fetch MathJax 3 and the Jupyter widgets HTML manager from the npm registry (``npm
    pack``: the package tarballs only, no dependency tree) into ``build/site-vendor``. Run
    once; the copies are reused until the pinned versions below change, so every later
    build is offline. The built site loads both from its own ``_static/vendor``.
``stage``
    Copy the committed, executed notebooks and the two reference pages into
    ``build/site-src`` with the same layout as the repository, so that the notebooks' own
    relative links (``../docs/glossary.md``, ``05_lenet.ipynb``) resolve unchanged, and
    write the home page: the README's course map in the course's order, with each
    notebook's main-path and deep-dive minutes from :mod:`bnlab.teaching.path`.
``html``
    Run Sphinx (MyST-NB, Sphinx Book Theme) with warnings as errors on the staged sources.
    Notebooks are never executed (``nb_execution_mode = "off"`` in ``conf.py``). Then
    check that no page, style sheet or script names a resource outside the site.

``python website/build.py all`` runs the three in order.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEBSITE = ROOT / "website"
BUILD = ROOT / "build"
VENDOR = BUILD / "site-vendor"
SOURCE = BUILD / "site-src"
DOCTREES = BUILD / "site-doctrees"
SITE = BUILD / "site"
# Written last, when a build passed every check: what `make test-site` waits for.
BUILT = SITE / ".built"

# Pinned: a new version is fetched only when these change.
NPM_PACKAGES = {"mathjax": "3.2.2", "@jupyter-widgets/html-manager": "1.0.15"}
NPM_TIMEOUT_S = 180
# From each tarball (paths under its "package/" folder): what the site serves.
# MathJax: the TeX+MathML input, CommonHTML output component that Sphinx loads, and the
# parts it loads on demand (TeX extensions, its fonts, the menu and accessibility tools).
MATHJAX_FILES = re.compile(
    r"LICENSE|es5/(tex-mml-chtml\.js|input/.*|output/chtml\.js|output/chtml/.*|ui/.*"
    r"|a11y/.*|sre/.*|adaptors/.*)"
)
# The widget manager: its standalone bundle (base, controls and output widgets built in,
# no RequireJS) and the icon fonts its style sheets point at.
WIDGETS_FILES = re.compile(r"LICENSE|dist/(embed\.js|embed\.js\.LICENSE\.txt|[0-9a-f]{20}\.woff2?)")

DOCS = ("glossary.md", "bad-inputs.md")

sys.path.insert(0, str(ROOT))


def _stamp() -> str:
    """What the vendored copy was made from: a change to any of it fetches again."""
    rules = [MATHJAX_FILES.pattern, WIDGETS_FILES.pattern]
    return json.dumps({"packages": NPM_PACKAGES, "files": rules}, sort_keys=True)


def vendored() -> Path:
    """The folder that becomes the site's ``_static/vendor``."""
    return VENDOR / "static" / "vendor"


def vendor() -> None:
    """Fetch the pinned npm packages once and unpack what the site serves."""
    stamp = VENDOR / "static" / ".versions"
    if stamp.exists() and stamp.read_text() == _stamp():
        print(f"site: vendored {', '.join(f'{n}@{v}' for n, v in NPM_PACKAGES.items())} (cached)")
        return
    if not shutil.which("npm"):
        sys.exit(
            "error: npm is missing; it fetches MathJax and the widget manager once "
            "(Debian: apt install npm)"
        )
    tarballs = VENDOR / "tarballs"
    shutil.rmtree(VENDOR, ignore_errors=True)
    tarballs.mkdir(parents=True)
    specs = [f"{name}@{version}" for name, version in NPM_PACKAGES.items()]
    print(f"site: fetching {' '.join(specs)} with npm pack ...")
    try:
        subprocess.run(
            ["npm", "pack", "--silent", "--pack-destination", str(tarballs)]
            + ["--cache", str(VENDOR / "npm-cache"), *specs],
            check=True,
            timeout=NPM_TIMEOUT_S,
            stdout=subprocess.DEVNULL,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        sys.exit(f"error: npm pack did not fetch {' '.join(specs)}: {error}")
    shutil.rmtree(VENDOR / "npm-cache", ignore_errors=True)
    targets = {
        "mathjax": (vendored() / "mathjax", MATHJAX_FILES),
        "@jupyter-widgets/html-manager": (vendored() / "html-manager", WIDGETS_FILES),
    }
    for name, version in NPM_PACKAGES.items():
        tarball = tarballs / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
        target, wanted = targets[name]
        count = 0
        with tarfile.open(tarball) as archive:
            for member in archive.getmembers():
                inner = member.name.removeprefix("package/")
                if member.isfile() and wanted.fullmatch(inner):
                    member.name = inner.removeprefix("es5/").removeprefix("dist/")
                    archive.extract(member, target, filter="data")
                    count += 1
        if not count:
            sys.exit(f"error: {tarball.name} holds none of the files the site serves")
        print(f"site: {name}@{version}: {count} files in {target.relative_to(ROOT)}")
    stamp.write_text(_stamp())


# --- the sources ------------------------------------------------------------------------


def notebooks() -> list[Path]:
    from bnlab.teaching.notebooks import course_notebooks

    return course_notebooks()


def title_of(notebook: Path) -> str:
    """The notebook's first heading: its page title."""
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            found = re.search(r"^#\s+(.+)$", "".join(cell["source"]), re.M)
            if found:
                return found.group(1).strip()
    return notebook.stem


def _minutes(value: float) -> str:
    return f"{value:.0f} min" if value >= 0.5 else "—"


def chinese_map(readme: str) -> dict[str, str]:
    """The README's 中文 course map: notebook stem -> 你将学到什么."""
    rows = re.findall(r"^\| \[(\d\d_\w+)\]\([^)]*\) \| (.+?) \|$", readme, re.M)
    return dict(rows)


def home_page(paths: list[Path]) -> str:
    """The site's home page: the README's course map, with this build's minutes."""
    from bnlab.teaching import path as learner_path

    readme = (ROOT / "README.md").read_text()
    found = learner_path.COURSE_MAP.search(readme)
    if not found:
        sys.exit("error: the README has no <!-- course-map --> block for the home page")
    what = dict(learner_path.MAP_ROW.findall(found.group(2)))
    chinese = chinese_map(readme)
    heading = re.search(r"^# (.+)$", readme, re.M).group(1)
    intro = readme.split("\n\n")[1].strip()
    rows = learner_path.reading_table(paths)
    teaching = [r for r in rows if learner_path.is_teaching(Path(r[0]))]
    lines = [
        f"# {heading}",
        "",
        intro,
        "",
        "This site shows every notebook as it was last run, outputs and figures included,",
        "so the course can be read before anything is installed. Each notebook's *main path*",
        "is what a learner reads in order; its *deep dive* is optional and collapsed on the",
        "page (open it with a click). Minutes count the prose, code, printed output and",
        "figures of each part.",
        "",
        "## Course map",
        "",
        "| notebook | main path | deep dive | what you learn |",
        "| --- | --- | --- | --- |",
    ]
    for stem, main, deep in rows:
        page = f"notebooks/{stem}.ipynb"
        text = what.get(stem)
        if text is None:
            sys.exit(f"error: the README's course map has no row for {stem}")
        lines.append(
            f"| [{title_of(ROOT / page)}]({page}) | {_minutes(main)} | {_minutes(deep)} | {text} |"
        )
    main_total = sum(r[1] for r in teaching)
    deep_total = sum(r[2] for r in teaching)
    lines += [
        "",
        f"The teaching notebooks take {_minutes(main_total)} on their main paths and "
        f"{_minutes(deep_total)} more in their deep dives; the errata (10) is a reference, "
        "read by card.",
        "",
        "## 课程地图",
        "",
        "每个 notebook 开头都有一段中文摘要；中英对照的术语表见 [术语表](docs/glossary.md)。",
        "",
        "| notebook | 主线 | 你将学到什么 |",
        "| --- | --- | --- |",
    ]
    for stem, main, _ in rows:
        if stem in chinese:
            lines.append(
                f"| [{stem}](notebooks/{stem}.ipynb) | {_minutes(main)} | {chinese[stem]} |"
            )
    lines += [
        "",
        "## Reference",
        "",
        "- [术语表 · Glossary](docs/glossary.md): the course's terms in English and Chinese.",
        "- [Bad inputs](docs/bad-inputs.md): what bnlab refuses, and what it says.",
        "",
        "## Run the notebooks yourself",
        "",
        "The pages show stored outputs. To run and change the code, clone the repository",
        "and run `make lab`: it sets up the environment on first use and opens JupyterLab",
        "on the notebooks (the README says what it installs and how long it takes).",
        "",
        "```{toctree}",
        ":hidden:",
        ":caption: Course",
        "",
        *[f"notebooks/{p.stem}" for p in paths],
        "```",
        "",
        "```{toctree}",
        ":hidden:",
        ":caption: Reference",
        "",
        *[f"docs/{name.removesuffix('.md')}" for name in DOCS],
        "```",
        "",
    ]
    return "\n".join(lines)


def stage() -> list[Path]:
    """Copy the sources into build/site-src, as laid out in the repository; write index.md."""
    paths = notebooks()
    if not paths:
        sys.exit("error: no notebooks found under notebooks/")
    shutil.rmtree(SOURCE, ignore_errors=True)
    (SOURCE / "notebooks").mkdir(parents=True)
    (SOURCE / "docs").mkdir()
    for path in paths:
        shutil.copy2(path, SOURCE / "notebooks" / path.name)
    for name in DOCS:
        shutil.copy2(ROOT / "docs" / name, SOURCE / "docs" / name)
    (SOURCE / "index.md").write_text(home_page(paths))
    return paths


# --- the site ---------------------------------------------------------------------------


# A resource the browser would load from elsewhere: a script, style sheet, image, frame or
# font by absolute URL (links a reader may follow are fine; protocol-relative URLs count).
EXTERNAL_IN_HTML = re.compile(
    r"<(?:script|img|iframe|source|audio|video|embed)\b[^>]*\bsrc=[\"']?(?:https?:)?//"
    r"|<link\b(?=[^>]*\brel=[\"']?(?:stylesheet|preload|modulepreload|icon|prefetch))"
    r"[^>]*\bhref=[\"']?(?:https?:)?//",
    re.I,
)
EXTERNAL_IN_CSS = re.compile(r"url\(\s*[\"']?(?:https?:)?//|@import\s+[\"']?(?:https?:)?//", re.I)


def external_references(site: Path) -> list[str]:
    """Every place in the built pages and style sheets that loads something from outside."""
    found = []
    for path in sorted(site.rglob("*")):
        if path.suffix == ".html":
            pattern = EXTERNAL_IN_HTML
        elif path.suffix == ".css":
            pattern = EXTERNAL_IN_CSS
        else:
            continue
        text = path.read_text(errors="replace")
        # comments are not loaded (the widget style sheets keep a commented-out font import)
        text = re.sub(r"/\*.*?\*/|<!--.*?-->", "", text, flags=re.S)
        for match in pattern.finditer(text):
            found.append(f"{path.relative_to(site)}: {text[match.start() : match.end() + 60]!r}")
    return found


def html() -> None:
    """Sphinx, warnings as errors, into a fresh build/site; then the offline check."""
    from sphinx.cmd.build import build_main

    if not (VENDOR / "static" / ".versions").exists():
        sys.exit("error: MathJax and the widget manager are not vendored: run `make site`")
    shutil.rmtree(SITE, ignore_errors=True)
    shutil.rmtree(DOCTREES, ignore_errors=True)
    started = time.monotonic()
    args = ["-b", "html", "-W", "--keep-going", "-q", "-c", str(WEBSITE), "-d", str(DOCTREES)]
    code = build_main([*args, str(SOURCE), str(SITE)])
    if code:
        sys.exit(f"error: Sphinx failed (exit {code}); its warnings are above")
    # Source maps serve only a browser's developer tools (which fetch them on demand).
    for source_map in SITE.rglob("*.map"):
        source_map.unlink()
    bad = external_references(SITE)
    if bad:
        sys.exit("error: the site loads resources from outside itself:\n  " + "\n  ".join(bad))
    pages = [p for p in SITE.rglob("*.html") if "_static" not in p.relative_to(SITE).parts]
    size = sum(p.stat().st_size for p in SITE.rglob("*") if p.is_file())
    BUILT.write_text(f"{len(pages)} pages\n")
    print(
        f"site: {len(pages)} pages, {size / 2**20:.1f} MiB in {SITE.relative_to(ROOT)} "
        f"({time.monotonic() - started:.0f} s); open {SITE.relative_to(ROOT)}/index.html "
        f"or serve it: python -m http.server -d {SITE.relative_to(ROOT)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["vendor", "stage", "html", "all"])
    step = parser.parse_args(argv).step
    if step in ("vendor", "all"):
        vendor()
    if step in ("stage", "all"):
        stage()
    if step in ("html", "all"):
        html()
    return 0


if __name__ == "__main__":
    sys.exit(main())
